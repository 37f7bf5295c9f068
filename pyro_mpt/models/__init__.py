"""Reference models: the Pyro models every test, tutorial and benchmark of pyro_mpt uses,
with their closed-form log marginal likelihoods and data generators.

Each model is a plain Pyro model ``model(data, ...)``. Parameters passed as tensors are held
fixed; parameters left as ``None`` become ``pyro.param`` sites (learned by SVI) with the names
given in each docstring. Data of shape ``(N, T)`` are ``N`` sequences of ``T`` tokens.
"""

from .hmm import hmm, hmm_log_marginal, sample_hmm
from .latent import bernoulli_latent_linear, gaussian_mixture, gaussian_mixture_log_marginal
from .ppca import (
    multivariate_normal,
    ppca_collapsed,
    ppca_latent,
    ppca_log_marginal,
    ppca_maximum_likelihood,
    sample_ppca,
)
from .regression import (
    bayesian_linear_regression_collapsed,
    bayesian_linear_regression_latent,
    bayesian_linear_regression_log_marginal,
)

__all__ = [
    "bayesian_linear_regression_collapsed",
    "bayesian_linear_regression_latent",
    "bayesian_linear_regression_log_marginal",
    "bernoulli_latent_linear",
    "gaussian_mixture",
    "gaussian_mixture_log_marginal",
    "hmm",
    "hmm_log_marginal",
    "multivariate_normal",
    "ppca_collapsed",
    "ppca_latent",
    "ppca_log_marginal",
    "ppca_maximum_likelihood",
    "sample_hmm",
    "sample_ppca",
]

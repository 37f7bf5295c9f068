"""Bayesian linear regression, collapsed and with an explicit weight latent, and its
closed-form log marginal likelihood.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

__all__ = [
    "bayesian_linear_regression_collapsed",
    "bayesian_linear_regression_latent",
    "bayesian_linear_regression_log_marginal",
]


def bayesian_linear_regression_collapsed(
    y: torch.Tensor,
    features: torch.Tensor,
    prior_scale: float | torch.Tensor = 1.0,
    noise_scale: float | torch.Tensor = 0.5,
) -> None:
    r"""Bayesian linear regression with the weights integrated out: the ``N`` responses form
    one sequence of ``N`` tokens,
    :math:`y \sim \mathcal{N}(0, \alpha^2 \Phi \Phi^\top + \sigma^2 I)`.

    :param torch.Tensor y: ``(N,)`` responses.
    :param torch.Tensor features: :math:`\Phi`, ``(N, D)``.
    :param float prior_scale: :math:`\alpha`.
    :param float noise_scale: :math:`\sigma`.

    Example::

        curve = mpt_curve(bayesian_linear_regression_collapsed, y, Phi)   # y: (N,), Phi: (N, D)
        curve.area, bayesian_linear_regression_log_marginal(y, Phi)
    """
    N = y.shape[-1]
    cov = prior_scale**2 * features @ features.T + noise_scale**2 * torch.eye(
        N, dtype=y.dtype, device=y.device
    )
    pyro.sample("y", dist.MultivariateNormal(torch.zeros_like(y), cov), obs=y)


def bayesian_linear_regression_latent(
    y: torch.Tensor,
    features: torch.Tensor,
    prior_scale: float | torch.Tensor = 1.0,
    noise_scale: float | torch.Tensor = 0.5,
) -> None:
    r"""Bayesian linear regression with a global latent weight vector:
    :math:`w \sim \mathcal{N}(0, \alpha^2 I_D)`,
    :math:`y_i \mid w \sim \mathcal{N}(\phi_i^\top w, \sigma^2)` in plate ``"data"``.

    The global ``w`` couples the data points: score it with ``token_plate="data"``.

    :param torch.Tensor y: ``(N,)`` responses.
    :param torch.Tensor features: :math:`\Phi`, ``(N, D)``, rows :math:`\phi_i`.
    :param float prior_scale: :math:`\alpha`.
    :param float noise_scale: :math:`\sigma`.

    Example::

        curve = mpt_curve(bayesian_linear_regression_latent, y, Phi, token_plate="data")
        curve.area, bayesian_linear_regression_log_marginal(y, Phi)
    """
    D = features.shape[-1]
    zero = torch.zeros(D, dtype=y.dtype, device=y.device)
    w = pyro.sample("w", dist.Normal(zero, prior_scale).to_event(1))
    with pyro.plate("data", y.shape[-1]):
        # (features * w).sum(-1), not features @ w: under a particle plate w has shape
        # (S, 1, D) (the 1 is this plate) and must broadcast against features (N, D)
        pyro.sample("y", dist.Normal((features * w).sum(-1), noise_scale), obs=y)


def bayesian_linear_regression_log_marginal(
    y: torch.Tensor,
    features: torch.Tensor,
    prior_scale: float | torch.Tensor = 1.0,
    noise_scale: float | torch.Tensor = 0.5,
) -> torch.Tensor:
    r"""Exact :math:`\log \mathcal{N}(y; 0, \alpha^2 \Phi\Phi^\top + \sigma^2 I)`.

    :param torch.Tensor y: ``(N,)``.
    :param torch.Tensor features: :math:`\Phi`, ``(N, D)``.
    :returns: a scalar tensor.

    Example::

        bayesian_linear_regression_log_marginal(y, Phi, prior_scale=1.0, noise_scale=0.5)
    """
    N = y.shape[-1]
    cov = prior_scale**2 * features @ features.T + noise_scale**2 * torch.eye(
        N, dtype=y.dtype, device=y.device
    )
    return dist.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y)

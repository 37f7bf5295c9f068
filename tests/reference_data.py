"""Data and closed forms shared by the tests of :mod:`pyro_mpt.reference` (not fixtures:
plain functions, imported by each tests/test_reference_*.py)."""

import warnings

import pyro
import pyro.distributions as dist
import torch

from pyro_mpt.models import ppca_latent, sample_ppca


def ppca_data(N=10, T=4, K=2, noise=1.0, w_scale=0.5, seed=0):
    """Small PPCA data whose posterior over z is not far narrower than the prior, so prior
    importance sampling works with 10^5 draws."""
    g = torch.Generator().manual_seed(seed)
    X, truth = sample_ppca(N, T, K, noise, generator=g)
    truth["W"] = truth["W"] * w_scale
    X = sample_ppca(N, T, K, noise, generator=g)[0]  # redraw under the scaled W below
    z = torch.randn(N, K, generator=g)
    X = z @ truth["W"].T + truth["loc"] + noise * torch.randn(N, T, generator=g)
    return X, truth


def per_row_exact(X, t):
    """``(N,)`` the closed-form PPCA log-density of each row."""
    T = X.shape[-1]
    cov_diag = (t["noise_scale"] ** 2).expand(T)
    return dist.LowRankMultivariateNormal(t["loc"], t["W"], cov_diag).log_prob(X)


def latent_model(t, K=2):
    """Latent-z PPCA with the parameters ``t``, as a model of ``X`` only."""
    return lambda X: ppca_latent(X, K, t["W"], t["loc"], t["noise_scale"])


def quiet(fn, *args, **kwargs):
    """Runs fn, returning (result, list of warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught]


def mixed_model(X, weights, locs, W, sigma):
    """A mixture whose components share a 1-D latent factor: c_n enumerated, z_n continuous,
    x_n | c, z ~ N(locs_c + W z, sigma^2 I)."""
    with pyro.plate("data", X.shape[0]):
        c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(locs[c] + z @ W.T, sigma).to_event(1), obs=X)


def mixed_exact(X, weights, locs, W, sigma):
    """``(N,)`` the closed form of :func:`mixed_model`: a mixture of low-rank Gaussians."""
    T = X.shape[-1]
    comp = dist.LowRankMultivariateNormal(locs, W, (sigma**2).expand(T)).log_prob(X[:, None])
    return torch.logsumexp(comp + weights.log(), -1)  # (N,)

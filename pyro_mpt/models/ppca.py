"""Probabilistic PCA and the full multivariate normal, with closed-form log marginal
likelihoods.

Reference: M. E. Tipping, C. M. Bishop, "Probabilistic Principal Component Analysis",
Journal of the Royal Statistical Society B 61(3), 1999.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from .params import param_or_fixed, positive_param_or_fixed

__all__ = [
    "multivariate_normal",
    "ppca_collapsed",
    "ppca_latent",
    "ppca_log_marginal",
    "ppca_maximum_likelihood",
    "sample_ppca",
]


def sample_ppca(
    num_data: int,
    num_tokens: int,
    latent_dim: int,
    noise_scale: float = 0.5,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Draws PPCA data :math:`x_n = W z_n + \mu + \sigma \epsilon_n`, :math:`z_n, \epsilon_n`
    standard normal.

    :param int num_data: N, the number of sequences.
    :param int num_tokens: T, the observed dimension.
    :param int latent_dim: K.
    :param float noise_scale: :math:`\sigma` (the paper uses precision 5, i.e. 0.447).
    :param torch.Generator generator: optional random generator.
    :returns: ``(X, truth)``: data of shape ``(N, T)`` and a dict with the true
        ``W`` (T, K), ``loc`` (T,) and ``noise_scale`` (scalar tensor).

    Example::

        X, truth = sample_ppca(500, 10, 2, generator=torch.Generator().manual_seed(0))
        X.shape, truth["W"].shape                   # (500, 10), (10, 2)
    """
    kw = dict(dtype=dtype, device=device, generator=generator)
    W = torch.randn(num_tokens, latent_dim, **kw)
    loc = torch.randn(num_tokens, **kw) * 0.5
    z = torch.randn(num_data, latent_dim, **kw)
    eps = torch.randn(num_data, num_tokens, **kw)
    X = z @ W.T + loc + noise_scale * eps
    noise = torch.tensor(noise_scale, dtype=dtype, device=device)
    return X, {"W": W, "loc": loc, "noise_scale": noise}


def ppca_collapsed(
    data: torch.Tensor,
    latent_dim: int,
    W: torch.Tensor | None = None,
    loc: torch.Tensor | None = None,
    noise_scale: torch.Tensor | None = None,
) -> None:
    r"""PPCA with the latent integrated out:
    :math:`x_n \sim \mathcal{N}(\mu, W W^\top + \sigma^2 I)`, a
    :class:`~pyro.distributions.LowRankMultivariateNormal` over the ``T`` tokens of each row.

    Learnable parameters (when not given): ``"W"`` (T, K), ``"loc"`` (T,),
    ``"noise_scale"`` (positive scalar).

    :param torch.Tensor data: ``(N, T)``.
    :param int latent_dim: :math:`K`.

    Example::

        svi = SVI(lambda X: ppca_collapsed(X, 2), None, Adam({"lr": 0.05}), loss=MaskedELBO())
        svi.step(X)                                 # X: (N, T)
        mpt_curve(ppca_collapsed, X, 2).area        # ~ ppca_log_marginal(X, **params)
    """
    N, T = data.shape
    W = param_or_fixed(
        "W", W, lambda: 0.1 * torch.randn(T, latent_dim, dtype=data.dtype, device=data.device)
    )
    loc = param_or_fixed("loc", loc, lambda: torch.zeros(T, dtype=data.dtype, device=data.device))
    sigma = positive_param_or_fixed(
        "noise_scale", noise_scale, lambda: torch.ones((), dtype=data.dtype, device=data.device)
    )
    cov_diag = (sigma**2).expand(T)
    with pyro.plate("data", N):
        pyro.sample("x", dist.LowRankMultivariateNormal(loc, W, cov_diag), obs=data)


def ppca_latent(
    data: torch.Tensor,
    latent_dim: int,
    W: torch.Tensor | None = None,
    loc: torch.Tensor | None = None,
    noise_scale: torch.Tensor | None = None,
) -> None:
    r"""PPCA with an explicit local latent: :math:`z_n \sim \mathcal{N}(0, I_K)`,
    :math:`x_{n,t} \mid z_n \sim \mathcal{N}(W_t^\top z_n + \mu_t, \sigma^2)`.

    Same parameters and the same marginal as :func:`ppca_collapsed`.

    :param torch.Tensor data: ``(N, T)``.
    :param int latent_dim: :math:`K`.

    Example::

        ref = log_marginal_likelihood(ppca_latent, X, 2, **truth)   # X, truth from sample_ppca
        ref.total, ppca_log_marginal(X, **truth)                    # agree up to MC error
    """
    N, T = data.shape
    W = param_or_fixed(
        "W", W, lambda: 0.1 * torch.randn(T, latent_dim, dtype=data.dtype, device=data.device)
    )
    loc = param_or_fixed("loc", loc, lambda: torch.zeros(T, dtype=data.dtype, device=data.device))
    sigma = positive_param_or_fixed(
        "noise_scale", noise_scale, lambda: torch.ones((), dtype=data.dtype, device=data.device)
    )
    zero = torch.zeros(latent_dim, dtype=data.dtype, device=data.device)
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(zero, 1.0).to_event(1))
        mean = z @ W.T + loc
        pyro.sample("x", dist.Normal(mean, sigma).to_event(1), obs=data)


def ppca_log_marginal(
    data: torch.Tensor,
    W: torch.Tensor,
    loc: torch.Tensor,
    noise_scale: torch.Tensor | float,
) -> torch.Tensor:
    r"""Exact :math:`\sum_n \log \mathcal{N}(x_n; \mu, W W^\top + \sigma^2 I)`.

    :param torch.Tensor data: ``(N, T)``.
    :param W: ``(T, K)``.
    :param loc: ``(T,)``.
    :param noise_scale: :math:`\sigma`, a scalar.
    :returns: a scalar tensor.

    Example::

        X, truth = sample_ppca(500, 10, 2)
        ppca_log_marginal(X, **truth)
    """
    T = data.shape[-1]
    cov_diag = (torch.as_tensor(noise_scale, dtype=data.dtype, device=data.device) ** 2).expand(T)
    return dist.LowRankMultivariateNormal(loc, W, cov_diag).log_prob(data).sum()


def ppca_maximum_likelihood(data: torch.Tensor, latent_dim: int) -> dict[str, torch.Tensor]:
    r"""The closed-form maximum-likelihood PPCA fit (Tipping & Bishop 1999, eqs. 7-8):
    :math:`\mu = \bar x`, :math:`\sigma^2 = \frac{1}{T-K}\sum_{k>K}\lambda_k`,
    :math:`W = U_K (\Lambda_K - \sigma^2 I)^{1/2}`, with :math:`\lambda, U` the eigenpairs of
    the sample covariance.

    :param torch.Tensor data: ``(N, T)``.
    :param int latent_dim: :math:`K < T`.
    :returns: dict with ``W`` (T, K), ``loc`` (T,), ``noise_scale`` (scalar).

    Example::

        fit = ppca_maximum_likelihood(X, 2)        # X: (N, T)
        ppca_log_marginal(X, **fit)                 # the maximum of log p(X) over W, loc, sigma
    """
    N, T = data.shape
    loc = data.mean(0)
    centred = data - loc
    cov = centred.T @ centred / N
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma2 = evals[latent_dim:].mean()
    W = evecs[:, :latent_dim] * (evals[:latent_dim] - sigma2).clamp(min=0).sqrt()
    return {"W": W, "loc": loc, "noise_scale": sigma2.sqrt()}


def multivariate_normal(data: torch.Tensor, loc: torch.Tensor, covariance: torch.Tensor) -> None:
    r""":math:`x_n \sim \mathcal{N}(\mu, \Sigma)` with a dense covariance (no latents).

    :param torch.Tensor data: ``(N, T)``.
    :param loc: :math:`\mu`, ``(T,)``.
    :param covariance: :math:`\Sigma`, ``(T, T)`` positive definite.

    Example::

        curve = mpt_curve(multivariate_normal, X, loc, cov)    # exact "gaussian" conditionals
        curve.area                  # ~ dist.MultivariateNormal(loc, cov).log_prob(X).sum()
    """
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.MultivariateNormal(loc, covariance), obs=data)

"""Models with latent variables summed or integrated by the backends: the Bernoulli latent
linear model of the paper's binary experiment and a Gaussian mixture with an enumerated
assignment.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from .params import param_or_fixed, positive_param_or_fixed

__all__ = ["bernoulli_latent_linear", "gaussian_mixture", "gaussian_mixture_log_marginal"]


def bernoulli_latent_linear(
    data: torch.Tensor,
    latent_dim: int = 2,
    W: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    r"""Binary tokens with a local Gaussian latent and a logistic link:
    :math:`z_n \sim \mathcal{N}(0, I_K)`,
    :math:`x_{n,t} \mid z_n \sim \mathrm{Bernoulli}(\mathrm{sigmoid}(W_t^\top z_n + b_t))`.

    Learnable parameters: ``"W"`` (T, K), ``"bias"`` (T,).

    :param torch.Tensor data: ``(N, T)`` zeros and ones.
    :param int latent_dim: :math:`K`.

    Example::

        X, truth = synthetic_binary(num_data=200)   # from pyro_mpt.experiments
        log_marginal_likelihood(bernoulli_latent_linear, X, 2, **truth, method="quadrature")
    """
    N, T = data.shape
    W = param_or_fixed(
        "W", W, lambda: 0.1 * torch.randn(T, latent_dim, dtype=data.dtype, device=data.device)
    )
    bias = param_or_fixed(
        "bias", bias, lambda: torch.zeros(T, dtype=data.dtype, device=data.device)
    )
    zero = torch.zeros(latent_dim, dtype=data.dtype, device=data.device)
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(zero, 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z @ W.T + bias).to_event(1), obs=data)


def gaussian_mixture(
    data: torch.Tensor,
    num_components: int = 3,
    weights: torch.Tensor | None = None,
    locs: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> None:
    r"""A mixture of isotropic Gaussians with a local enumerated assignment:
    :math:`c_n \sim \mathrm{Categorical}(\pi)`,
    :math:`x_{n,t} \mid c_n \sim \mathcal{N}(\mu_{c_n, t}, \sigma^2)`.

    ``c`` is marked ``infer={"enumerate": "parallel"}``. Learnable parameters: ``"weights"``
    (C,, simplex), ``"locs"`` (C, T), ``"scale"`` (positive scalar).

    :param torch.Tensor data: ``(N, T)``.
    :param int num_components: :math:`C`.

    Example::

        est = MaskedELBO(num_masks=4).estimate(gaussian_mixture, None, X, 3)   # X: (N, T)
        est.total                                   # "enumerate" conditionals
    """
    N, T = data.shape
    C = num_components
    if weights is None:
        weights = pyro.param(
            "weights",
            lambda: torch.full((C,), 1.0 / C, dtype=data.dtype, device=data.device),
            constraint=dist.constraints.simplex,
        )
    locs = param_or_fixed(
        "locs", locs, lambda: torch.randn(C, T, dtype=data.dtype, device=data.device)
    )
    scale = positive_param_or_fixed(
        "scale", scale, lambda: torch.ones((), dtype=data.dtype, device=data.device)
    )
    with pyro.plate("data", N):
        c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[c], scale).to_event(1), obs=data)


def gaussian_mixture_log_marginal(
    data: torch.Tensor,
    weights: torch.Tensor,
    locs: torch.Tensor,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    r"""Exact :math:`\sum_n \log \sum_c \pi_c \prod_t \mathcal{N}(x_{n,t}; \mu_{c,t}, \sigma^2)`.

    :param torch.Tensor data: ``(N, T)``.
    :param weights: :math:`\pi`, ``(C,)``.
    :param locs: :math:`\mu`, ``(C, T)``.
    :param scale: :math:`\sigma`, a scalar.
    :returns: a scalar tensor.

    Example::

        gaussian_mixture_log_marginal(X, torch.ones(3) / 3, locs, 0.5)   # locs: (3, T)
    """
    comp = dist.Normal(locs, scale).log_prob(data.unsqueeze(-2)).sum(-1)  # (N, C)
    return torch.logsumexp(comp + weights.log(), -1).sum()

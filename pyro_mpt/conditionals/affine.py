r"""Linear-Gaussian models found and compiled: the affine map from standard-normal noise to
the observed tokens.

A model is *linear-Gaussian* when every latent site is a (multivariate) normal whose mean is
affine in its parents and whose scale does not depend on latents, and every observed site is
normal in the same way. Writing each latent as :math:`z = \mu(\cdot) + L(\cdot)\,\varepsilon`
with :math:`\varepsilon \sim \mathcal N(0, I)`, the mean of every observed token is then
affine in all the noise, :math:`\mathbb E[x_n \mid \varepsilon_n] = b_n + A_n \varepsilon_n`,
so that per sequence

.. math:: x_n \sim \mathcal N\big(b_n,\; A_n A_n^\top + \Sigma_n\big),

with :math:`\Sigma_n` the observation noise (diagonal for ``Normal`` sites, a block for a
``MultivariateNormal`` site). :func:`compile_linear_gaussian` finds :math:`b_n = x`'s mean at
:math:`\varepsilon = 0` and :math:`A_n` by autograd (one batched backward pass over the
tokens; sequences are independent, so the Jacobian of the mean summed over sequences holds
every :math:`A_n`), then checks at a second, random point :math:`\varepsilon'` that the
Jacobian is the same, that the mean is :math:`b_n + A_n\varepsilon'` and that the noise
scales are unchanged; otherwise the model is not linear-Gaussian and
:class:`NotLinearGaussian` says why. :math:`A_n` and :math:`b_n` stay differentiable in
the model's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["LinearGaussian", "NotLinearGaussian", "compile_linear_gaussian", "normal_parts"]

#: Seed of the second point at which linearity is checked (a private generator, so the
#: check neither consumes nor depends on torch's global random stream).
_CHECK_SEED = 20230601


class NotLinearGaussian(ValueError):
    """The model is not linear-Gaussian; the message says which site and why."""


@dataclass
class LinearGaussian:
    r"""A compiled linear-Gaussian model: per sequence
    :math:`x_n \sim \mathcal N(b_n, A_n A_n^\top + \Sigma_n)`.

    :ivar x: ``(N, T)`` the observed tokens.
    :ivar loc: ``(N, T)`` :math:`b_n`.
    :ivar factor: ``(N, T, K)`` :math:`A_n`, ``K`` noise dimensions per sequence.
    :ivar noise_var: ``(N, T)`` the diagonal of :math:`\Sigma_n` (0 on tokens of
        multivariate observed sites).
    :ivar noise_blocks: ``(token slice, (N, T_s, T_s) covariance)`` of each multivariate
        observed site.
    """

    x: torch.Tensor
    loc: torch.Tensor
    factor: torch.Tensor
    noise_var: torch.Tensor
    noise_blocks: list

    @property
    def low_rank(self) -> bool:
        """Whether Woodbury serves it (diagonal positive noise, fewer noise dimensions than
        tokens), so that no ``T x T`` covariance is ever formed."""
        K, T = self.factor.shape[-1], self.factor.shape[-2]
        return not self.noise_blocks and K < T and bool((self.noise_var > 0).all())

    def covariance(self) -> torch.Tensor:
        r"""``(N, T, T)``: :math:`A_n A_n^\top + \Sigma_n`."""
        cov = self.factor @ self.factor.mT + torch.diag_embed(self.noise_var)
        for sl, block in self.noise_blocks:
            pad = torch.zeros_like(cov)
            pad[:, sl, sl] = block
            cov = cov + pad
        return cov


def normal_parts(fn) -> tuple[str, torch.Tensor, torch.Tensor] | None:
    """``("diag", loc, scale)`` of a (possibly ``Independent``) ``Normal``, ``("tril", loc,
    scale_tril)`` of a (low-rank) multivariate normal, ``None`` for anything else."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    if isinstance(fn, Normal):
        return "diag", fn.loc, fn.scale
    if isinstance(fn, (MultivariateNormal, LowRankMultivariateNormal)):
        return "tril", fn.loc, fn.scale_tril
    return None


def _same_scale(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.equal(*torch.broadcast_tensors(torch.as_tensor(a), torch.as_tensor(b)))
    return a == b


def _refuse_weighting(name: str, site: dict, role: str, scale) -> None:
    """A masked site, or one scaled unlike the observations, is not scored as a plain
    Gaussian: refuse it rather than ignore the weighting."""
    mask = site["mask"]
    if mask is not None and mask is not True and not (torch.is_tensor(mask) and mask.all()):
        raise NotLinearGaussian(
            f"{role} site {name!r} is masked (poutine.mask or obs_mask), which this route "
            "does not support"
        )
    if not _same_scale(site["scale"], scale):
        raise NotLinearGaussian(
            f"{role} site {name!r} has scale {site['scale']} (poutine.scale or a subsampled "
            f"plate), unlike the observations' {scale}"
        )


def _refuse_sites(trace, layout: TokenLayout) -> None:
    """Structural refusals, before any computation: the kind of every site, its mask and
    its scale."""
    scale = trace.nodes[layout.sites[0].name]["scale"]
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("is_auxiliary"):
            continue
        if name in layout.enumerated:
            raise NotLinearGaussian(f"latent site {name!r} is enumerated (discrete)")
        observed = site["is_observed"]
        if not observed and name not in layout.latents:
            continue  # a subsample site
        fn = site["fn"]
        role = "observed" if observed else "latent"
        if normal_parts(fn) is None:
            base = fn
            while isinstance(base, Independent):
                base = base.base_dist
            raise NotLinearGaussian(
                f"{role} site {name!r} is a {type(base).__name__}, not a Normal or "
                "MultivariateNormal"
            )
        _refuse_weighting(name, site, role, scale)
        if observed and layout.token_plate is not None and fn.event_dim:
            raise NotLinearGaussian(
                f"observed site {name!r} has vector tokens (event shape "
                f"{tuple(fn.event_shape)}) inside token_plate {layout.token_plate!r}"
            )


class _Reparameterize(Messenger):
    r"""Sets every latent site to :math:`\mu + L\varepsilon` for the given noise, every
    observed value to a copy that requires grad (to see whether observations are parents)
    and every subsample site to its value in the ``fixed`` trace (each run must see the
    same data points)."""

    def __init__(self, eps: dict, observed: dict, fixed: dict):
        super().__init__()
        self.eps, self.observed, self.fixed = eps, observed, fixed

    def _pyro_sample(self, msg):
        name = msg["name"]
        if name in self.fixed and not msg["is_observed"]:
            msg["value"], msg["done"] = self.fixed[name], True
            return
        if msg["is_observed"]:
            if name in self.observed:
                msg["value"] = self.observed[name]
            return
        if name not in self.eps:
            return
        kind, loc, scale = normal_parts(msg["fn"])
        eps = self.eps[name]
        if kind == "diag":
            value = loc + scale * eps
        else:
            value = loc + (scale @ eps.unsqueeze(-1)).squeeze(-1)
        msg["value"] = value
        msg["done"] = True


def _per_sequence(t: torch.Tensor, event_dim: int, layout: TokenLayout, lead: int = 0):
    """``(*lead dims, N, k)``: the trailing ``(batch, event)`` dims of ``t`` laid out by
    sequence, the ``k`` elements of each in token order (the token plate's element, then
    the event, in C order)."""
    P = layout.max_plate_nesting
    head, body = tuple(t.shape[:lead]), tuple(t.shape[lead:])
    if len(body) > P + event_dim:
        raise NotLinearGaussian(
            f"a site has batch shape {body[: len(body) - event_dim]} with more dims than "
            f"the model's {P} plates"
        )
    t = t.reshape(head + (1,) * (P + event_dim - len(body)) + body)
    seq = P
    if layout.token_plate is not None:
        t = t.movedim(lead + P + layout.token_dim, lead + P - 1)  # after the sequence dims
        seq = P - 1
    t = t.reshape(*t.shape[: lead + seq], -1)
    t = t.expand(*head, *layout.seq_shape, t.shape[-1])
    return t.reshape(*head, layout.num_sequences, t.shape[-1])


def _observed_parts(trace, layout: TokenLayout):
    """``(loc (N, T), var (N, T), blocks)`` of the observed sites in token order."""
    locs, variances, blocks = [], [], []
    for info in layout.sites:
        site = trace.nodes[info.name]
        fn = site["fn"]
        kind, loc, scale = normal_parts(fn)
        shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
        locs.append(_per_sequence(loc.expand(shape), fn.event_dim, layout))
        if kind == "diag":
            variances.append(_per_sequence((scale**2).expand(shape), fn.event_dim, layout))
            continue
        variances.append(torch.zeros_like(locs[-1]))
        cov = scale @ scale.mT
        cov = cov.expand(*fn.batch_shape, *cov.shape[-2:])
        flat = _per_sequence(cov, 2, layout).reshape(layout.num_sequences, *cov.shape[-2:])
        blocks.append((layout.site_slice(info), flat))
    return torch.cat(locs, -1), torch.cat(variances, -1), blocks


def _run(model, args, kwargs, eps: dict, observed: dict, base):
    """A trace of the model at noise ``eps``, with the subsample indices of ``base``."""
    fixed = {n: s["value"] for n, s in base.nodes.items() if site_is_subsample(s)}
    with poutine.block(), poutine.trace() as tracer, _Reparameterize(eps, observed, fixed):
        model(*args, **kwargs)
    return tracer.trace


def _jacobian(mean: torch.Tensor, inputs: list, create_graph: bool) -> list:
    """The Jacobian of the ``(N, T)`` means summed over sequences, ``(T, *input)`` per
    input (``None`` where unused): one backward pass batched over the ``T`` tokens."""
    total = mean.sum(0)
    if not total.requires_grad:  # the means depend on no noise at all
        return [None] * len(inputs)
    eye = torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
    return torch.autograd.grad(
        total, inputs, eye, is_grads_batched=True, create_graph=create_graph, allow_unused=True
    )


def _factor(grads, trace, names, layout: TokenLayout) -> torch.Tensor:
    """``(N, T, K)`` from the per-site Jacobians ``(T, *site)``."""
    cols = []
    for name, g in zip(names, grads):
        site = trace.nodes[name]
        if g is None:
            like = {"dtype": layout.dtype, "device": layout.device}
            g = torch.zeros((layout.num_tokens, *site["value"].shape), **like)
        cols.append(_per_sequence(g, site["fn"].event_dim, layout, lead=1))
    if not cols:  # no latents: the tokens' Gaussian is their likelihood alone
        N, T = layout.num_sequences, layout.num_tokens
        return torch.zeros(N, T, 0, dtype=layout.dtype, device=layout.device)
    return torch.cat(cols, -1).permute(1, 0, 2)


def _evaluate(problem, noise: dict, create_graph: bool):
    """One run of the model at the standard-normal ``noise`` of each latent site:
    ``(mean (N, T), var (N, T), blocks, factor (N, T, K))``.

    :raises NotLinearGaussian: when an observed mean depends on another observed value."""
    model, args, kwargs, base, layout = problem
    eps = {n: e.detach().clone().requires_grad_() for n, e in noise.items()}
    observed = {
        info.name: base.nodes[info.name]["value"].detach().clone().requires_grad_()
        for info in layout.sites
    }
    names = list(noise)
    with torch.enable_grad():  # the reference and the curve run under no_grad
        trace = _run(model, args, kwargs, eps, observed, base)
        missing = sorted(set(noise) - set(trace.nodes))
        if missing:
            raise NotLinearGaussian(f"the latent site(s) {missing} did not recur when rerun")
        mean, var, blocks = _observed_parts(trace, layout)
        inputs = [eps[n] for n in names] + list(observed.values())
        grads = _jacobian(mean, inputs, create_graph)
    for name, g in zip(observed, grads[len(names) :]):
        if g is not None and bool((g != 0).any()):
            raise NotLinearGaussian(
                f"an observed site's mean depends on the observed value of {name!r} "
                "(observations that are parents of other tokens)"
            )
    factor = _factor(grads[: len(names)], trace, names, layout)
    if not create_graph:
        mean, var = mean.detach(), var.detach()
        blocks = [(sl, b.detach()) for sl, b in blocks]
    return mean, var, blocks, factor


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Equal within ``rtol`` of the larger magnitude (at least 1)."""
    if a.numel() == 0:
        return True
    a, b = a.detach(), b.detach()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
    return float((a - b).abs().max()) <= rtol * scale


def compile_linear_gaussian(
    model, args: tuple, kwargs: dict, layout: TokenLayout, trace, max_elements: int
) -> LinearGaussian:
    r"""The per-sequence Gaussian :math:`\mathcal N(b_n, A_n A_n^\top + \Sigma_n)` of the
    tokens of a linear-Gaussian model (see the module docstring).

    :param model: the Pyro model; ``args`` and ``kwargs`` are passed to it.
    :param layout: its :class:`~pyro_mpt.tokens.TokenLayout`.
    :param trace: a plain trace of the model.
    :param int max_elements: memory budget: the Jacobian (``T`` by the noise of all
        sequences) must fit in it, and one ``N x T x T`` covariance unless the model is
        low-rank (:attr:`LinearGaussian.low_rank`, served by Woodbury).
    :returns: a :class:`LinearGaussian`, differentiable in the model's parameters when
        gradients are enabled.
    :raises NotLinearGaussian: naming the site and the reason when the model is not
        linear-Gaussian or is too large for a dense covariance.
    """
    _refuse_sites(trace, layout)
    shapes = {n: tuple(trace.nodes[n]["value"].shape) for n in layout.latents}
    N, T = layout.num_sequences, layout.num_tokens
    noise = sum(int(torch.Size(s).numel()) for s in shapes.values())
    _check_budget(T * noise, N, T, noise, max_elements)  # the Jacobian
    problem = (model, args, kwargs, trace, layout)
    like = {"dtype": layout.dtype, "device": layout.device}
    zero = {n: torch.zeros(s, **like) for n, s in shapes.items()}
    create_graph = torch.is_grad_enabled()
    first = _evaluate(problem, zero, create_graph)
    # the second point: a private generator, so that the check neither consumes nor
    # depends on torch's global random stream
    generator = torch.Generator().manual_seed(_CHECK_SEED)
    point = {
        n: torch.randn(s, generator=generator, dtype=layout.dtype).to(layout.device)
        for n, s in shapes.items()
    }
    second = _evaluate(problem, point, False)
    eps = [_per_sequence(e, trace.nodes[n]["fn"].event_dim, layout) for n, e in point.items()]
    _check_affine(first, second, torch.cat(eps, -1) if eps else None)
    mean, var, blocks, factor = first
    if create_graph:
        # b and the noise again from a run whose noise and observations need no grad, so
        # that they depend on the parameters only (the first run's hang on its leaves);
        # the factor is a derivative, free of those leaves once the map is affine
        mean, var, blocks = _observed_parts(_run(model, args, kwargs, zero, {}, trace), layout)
    x = [
        _per_sequence(_value(trace.nodes[i.name]), _event_dim(trace, i), layout)
        for i in layout.sites
    ]
    # Pyro's log_prob promotes float32 parameters to float64 data: so do the kernels
    dtype = torch.promote_types(mean.dtype, layout.dtype)
    blocks = [(sl, b.to(dtype)) for sl, b in blocks]
    compiled = LinearGaussian(
        torch.cat(x, -1).to(dtype), mean.to(dtype), factor.to(dtype), var.to(dtype), blocks
    )
    if not compiled.low_rank:  # served by a dense N x T x T covariance
        _check_budget(N * T * T, N, T, noise, max_elements)
    return compiled


def _check_budget(need: int, N: int, T: int, noise: int, max_elements: int) -> None:
    """:raises NotLinearGaussian: when ``need`` elements exceed ``max_elements``."""
    if need > max_elements:
        raise NotLinearGaussian(
            f"its dense token covariance and Jacobian need {need:,} elements (N={N} "
            f"sequences, T={T} tokens, {noise} noise dimensions), over max_elements="
            f"{max_elements:,}; the Markov-structured route for long chains is not built yet"
        )


def _value(site) -> torch.Tensor:
    return site["value"].expand(site["fn"].shape())


def _event_dim(trace, info) -> int:
    return trace.nodes[info.name]["fn"].event_dim


def _check_affine(first, second, eps) -> None:
    """Raises :class:`NotLinearGaussian` unless the run at noise ``eps`` (``(N, K)``) has
    the Jacobian, the noise and the mean :math:`b + A\\varepsilon` of the run at 0."""
    mean, var, blocks, factor = first
    mean2, var2, blocks2, factor2 = second
    rtol = 10 * torch.finfo(mean.dtype).eps ** 0.5
    if not _close(factor, factor2, rtol):
        raise NotLinearGaussian(
            "the observed means are not affine in the latents: their Jacobian differs "
            "between two points (a nonlinear mean, or a latent scale that depends on latents)"
        )
    predicted = mean if eps is None else mean + (factor @ eps.unsqueeze(-1)).squeeze(-1)
    if not _close(predicted, mean2, rtol):
        raise NotLinearGaussian(
            "the observed means are not affine in the latents: the mean at a random point "
            "is not b + A eps (a nonlinear mean, or latents shared across sequences)"
        )
    same_blocks = all(_close(b1, b2, rtol) for (_, b1), (_, b2) in zip(blocks, blocks2))
    if not (_close(var, var2, rtol) and same_blocks):
        raise NotLinearGaussian("an observation's scale depends on the latents")

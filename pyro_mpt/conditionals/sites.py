r"""From the observed sites of a particle trace to token kernels.

Each observed site becomes one kernel (:mod:`pyro_mpt.conditionals.kernels`) over its slice
of the tokens: a table :math:`l_{s,n,t} = \log p(x_{n,t} \mid z_s)` for a factorized site
(independent tokens given the particle), or the particle's Gaussian
:math:`\mathcal N(\mu_s, W W^\top + D)` / :math:`\mathcal N(\mu_s, \Sigma)` for a low-rank or
dense ``MultivariateNormal`` site, conditioned per mask in closed form.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..compat import gaussian_parts
from .hmm_sites import DiscreteHMMKernel, gaussian_hmm_joint, hmm_factors, is_whole_sequence
from .kernels import DenseGaussianKernel, FactorizedKernel, LowRankGaussianKernel
from .particles import flatten_particles, particle_shape

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["build_kernels", "site_token_log_probs"]


def site_token_log_probs(site: dict, layout: TokenLayout) -> torch.Tensor:
    """Per-token log-probabilities of a factorized observed site, with the token axis last:
    ``(*lead, *seq dims, T_site)``."""
    fn, value = site["fn"], site["value"]
    if layout.token_plate is not None:
        lp = fn.log_prob(value)
        P = layout.max_plate_nesting
        lp = lp.reshape((1,) * max(0, P - lp.dim()) + tuple(lp.shape))
        return lp.movedim(layout.token_dim, -1)
    if fn.event_dim == 0:
        return fn.log_prob(value).unsqueeze(-1)
    base = fn.base_dist
    lp = base.log_prob(value)
    n_tok = len(fn.event_shape) - len(base.event_shape)
    return lp.reshape(*lp.shape[: lp.dim() - n_tok], -1)


def _unbroadcast(t, core_ndim):
    """Drops leading batch dims that are pure expansions (stride 0) of a parameter."""
    while t.dim() > core_ndim and (t.shape[0] == 1 or t.stride(0) == 0):
        t = t[0]
    return t


def _gaussian_kernel(fn, x, layout, lead):
    """The kernel of a ``LowRankMultivariateNormal`` / ``MultivariateNormal`` site: its
    parameters kept shared (``(T, K)``, ``(T,)``, ``(T, T)``) unless they vary by particle or
    sequence, then flattened to ``(S, N, ...)``."""
    loc = flatten_particles(fn.loc, layout, lead, 1)
    parts = gaussian_parts(fn)
    if parts[0] == "lowrank":
        W, D = _unbroadcast(parts[1], 2), _unbroadcast(parts[2], 1)
        if W.dim() > 2 or D.dim() > 1:
            W = flatten_particles(fn.cov_factor, layout, lead, 2)
            D = flatten_particles(fn.cov_diag, layout, lead, 1)
        return LowRankGaussianKernel(x, loc, W, D)
    tril = _unbroadcast(parts[1], 2)
    if tril.dim() > 2:
        tril = flatten_particles(fn.scale_tril, layout, lead, 2)
    tril = tril.tril()  # MVN reads only the lower triangle of its scale_tril
    return DenseGaussianKernel(x, loc, tril @ tril.mT)


def build_kernels(trace, layout: TokenLayout, extra_tensors=()) -> tuple[list, tuple]:
    """Token kernels for every observed site of ``trace``, flattened to ``(S, N, ...)``.

    :param trace: a particle trace (:func:`~pyro_mpt.conditionals.particles.particle_trace`).
    :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout`.
    :param extra_tensors: ``(tensor, extra_ndim)`` pairs (latent log-weights) whose leading
        dims take part in the particle shape.
    :returns: ``(kernels, lead)``: a list of ``(token slice, kernel)`` and the particle shape.
    """
    P_seq = layout.max_plate_nesting - (1 if layout.token_plate is not None else 0)
    per_site = []
    for info in layout.sites:
        site = trace.nodes[info.name]
        if info.kind == "factorized":
            per_site.append((info, site_token_log_probs(site, layout)))
        elif info.kind == "hmm":
            per_site.append((info, hmm_factors(site["fn"], site["value"])))
        elif is_whole_sequence(site["fn"]):  # a GaussianHMM: its joint over time steps
            per_site.append((info, gaussian_hmm_joint(site["fn"], info.event_shape[0])))
        else:
            per_site.append((info, site["fn"]))
    shapes = []
    for info, obj in per_site:
        if info.kind == "hmm":
            shapes.extend(obj)
        else:
            shapes.append((obj if info.kind == "factorized" else obj.loc, 1))
    lead = particle_shape(shapes + list(extra_tensors), P_seq)

    kernels = []
    for info, obj in per_site:
        sl = layout.site_slice(info)
        # masked-out tokens are never observed nor scored; their values (NaN for missing
        # data) are replaced so that no 0 * NaN reaches a sum
        present = None if layout.present is None else layout.present[:, sl]
        if info.kind == "factorized":
            lp = flatten_particles(obj, layout, lead, 1)
            lp = lp if present is None else torch.where(present, lp, 0.0)
            kernels.append((sl, FactorizedKernel(lp)))
        elif info.kind == "hmm":
            flat = [flatten_particles(t, layout, lead, extra) for t, extra in obj]
            kernels.append((sl, DiscreteHMMKernel(*flat)))
        else:
            value = trace.nodes[info.name]["value"]
            value = value.flatten(-len(info.event_shape)) if info.event_shape else value
            x = flatten_particles(value, layout, (), 1)[0]  # observations: (N, T)
            x = x if present is None else torch.where(present, x, 0.0)
            kernels.append((sl, _gaussian_kernel(obj, x, layout, lead)))
    return kernels, lead

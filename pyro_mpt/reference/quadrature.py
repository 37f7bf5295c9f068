r"""The quadrature reference: a midpoint grid of :math:`G^d` points over the continuous
latents (:math:`d \le 3` per sequence, :func:`pyro_mpt.conditionals.grid.midpoint_grid`),

.. math:: \log p(x_n) \approx \log \sum_s p(z_s)\,\lvert\det \partial T/\partial u
    \rvert_{u_s}\,\Delta^d\, p(x_n \mid z_s),\qquad z_s = T(u_s),

the grid laid on each latent's unconstrained scale (:mod:`~pyro_mpt.conditionals.grid`)

as in :class:`~pyro_mpt.conditionals.quadrature.QuadratureConditionals`. Its error is not estimated; a sequence that
puts more than :data:`MAX_EDGE_MASS` of its posterior mass on the grid's outer cells is
flagged (the bounds cut off mass).
"""

from __future__ import annotations

import torch

from ..conditionals.grid import midpoint_grid, unconstrained_sizes
from ..conditionals.quadrature import QuadratureConditionals
from .result import LMLEstimate, fixed_estimate, flag_nonfinite, flag_unreliable
from .sampler import Sampler
from .streaming import stream

__all__ = ["MAX_EDGE_MASS", "quadrature_grid", "quadrature_reference"]

#: Share of a sequence's quadrature mass on the grid's outer cells above which it warns.
MAX_EDGE_MASS = 1e-3


def quadrature_grid(problem, num_points, bounds):
    """The grid over the model's continuous latents.

    :raises ValueError: for a latent dimension above 3 per sequence, no continuous latent,
        or a discrete latent that is not enumerated."""
    quad = QuadratureConditionals(num_points, bounds)
    trace, layout = problem.trace, problem.layout
    sizes, events, supports = unconstrained_sizes(trace, list(quad.check(layout, trace)))
    return midpoint_grid(
        sizes, events, quad.num_points, quad.bounds, layout.dtype, layout.device, supports
    )


def _check_edge_mass(stats, messages):
    """Flags sequences with too much mass on the outer cells; returns ``trustworthy``."""
    edge_mass = torch.exp(stats.lse_edge - stats.lse1)
    n_bad = int((edge_mass > MAX_EDGE_MASS).sum())
    if not n_bad:
        return True
    return flag_unreliable(
        messages,
        f"{n_bad} of {edge_mass.numel()} sequences put more than {MAX_EDGE_MASS:g} of their "
        f"posterior mass on the outer cells of the quadrature grid (up to "
        f"{float(edge_mass.max()):.3g}): widen quadrature_bounds",
    )


def quadrature_reference(problem, options, messages) -> LMLEstimate:
    """Midpoint quadrature of every sequence's :math:`\\log p(x_n)` with
    ``options.quadrature_points`` points per axis on ``options.quadrature_bounds``.

    :warns UserWarning: when the grid cuts off posterior mass, or an estimate is not
        finite."""
    p, G = problem, options.quadrature_points
    grid = quadrature_grid(p, G, options.quadrature_bounds)
    S, d = grid.points.shape
    sampler = Sampler(
        p.model,
        p.args,
        p.kwargs,
        p.layout,
        "grid",
        list(grid.values),
        grid=grid.values,
        log_jacobian=grid.log_jacobian,
    )
    messages.append(
        f"quadrature: a midpoint grid of {G}^{d} = {S} points on "
        f"{list(options.quadrature_bounds)} per axis over {list(grid.values)}; its error is "
        "not estimated (compare with more points or wider bounds)"
    )
    stats = stream(
        p,
        sampler,
        S,
        options,
        keep=False,
        tail_k=0,
        edge=grid.edge,
        desc="log p(x) quadrature",
        messages=messages,
    )
    per_seq = stats.lse1 + grid.log_volume
    trustworthy = _check_edge_mass(stats, messages)
    trustworthy = flag_nonfinite(per_seq, messages) and trustworthy
    return fixed_estimate(
        per_seq,
        p.layout.scale,
        "quadrature",
        messages,
        p.layout.device,
        num_samples=S,
        trustworthy=trustworthy,
    )

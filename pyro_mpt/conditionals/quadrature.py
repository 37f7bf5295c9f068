r"""Quadrature conditionals: the latents on a grid (the theory page of the docs, section 2).

For continuous latents of total dimension :math:`d \le 3` per sequence, ``G`` midpoints per
axis on ``[low, high]`` of each latent's unconstrained scale (:mod:`~pyro_mpt.conditionals.grid`)
give :math:`G^d` particles :math:`z_s = T(u_s)` with weights
:math:`w^0_s = p(z_s)\,\lvert\det \partial T/\partial u\rvert_{u_s}\,\Delta^d`
(:math:`\Delta` the cell width; the Jacobian is 1 for real latents). The conditionals are exact up
to the grid's error. The paper's binary experiment uses a 20 x 20 grid on :math:`[-5, 5]^2`.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..options import check_positive_int, resolve_max_elements
from .base import Conditionals
from .chunked import chunked_particle_scorer, particle_chunk_size, particle_elements
from .grid import midpoint_grid, unconstrained_sizes
from .importance import check_discrete_latents
from .particles import ParticleScorer, combine_log_weights, latent_log_prob, particle_trace
from .sites import build_kernels

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["QuadratureConditionals", "check_bounds"]

#: The largest latent dimension a grid is built for.
MAX_QUADRATURE_DIM = 3


def check_bounds(name: str, value) -> tuple[float, float]:
    """``value`` as ``(low, high)`` floats with finite ``low < high``.

    :raises ValueError: naming ``name`` and the value received.
    """
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{name} must be a pair (low, high) of finite low < high, got {value!r}")
    return low, high


class QuadratureConditionals(Conditionals):
    r"""A midpoint grid over the continuous latents.

    :param int num_points: ``G``, points per latent dimension.
    :param tuple bounds: ``(low, high)`` of every axis, finite, ``low < high``, on the
        unconstrained scale of each latent's support.
    :param int max_elements: memory budget of one chunk of grid points
        (:mod:`~pyro_mpt.conditionals.chunked`); ``None``: the device's default.
    :raises ValueError: for ``num_points < 1`` or bad ``bounds``.

    With grid points :math:`z_g` and cell volume :math:`\Delta` (:math:`G^K` points for
    :math:`K` latent dimensions), :math:`p(x_j \mid x_O) \approx \sum_g \bar w_g\,
    p(x_j \mid x_O, z_g)`, :math:`\bar w_g \propto p(z_g)\, p(x_O \mid z_g)\, \Delta`.

    Example::

        elbo = MaskedELBO(conditionals=QuadratureConditionals(num_points=30, bounds=(-4.0, 4.0)))
        elbo.estimate(bernoulli_latent_linear, None, X, 2).total   # X: (N, T) of 0. / 1.
    """

    name = "quadrature"
    draws_latents = True
    options = {
        "quadrature_points": "num_points",
        "quadrature_bounds": "bounds",
        "max_elements": "max_elements",
    }

    def __init__(
        self,
        num_points: int = 20,
        bounds: tuple[float, float] = (-5.0, 5.0),
        max_elements: int | None = None,
    ):
        self.num_points = check_positive_int("num_points", num_points)
        self.bounds = check_bounds("bounds", bounds)
        self.max_elements = check_positive_int("max_elements", max_elements, allow_none=True)

    def _continuous(self, layout):
        return [n for n in layout.latents if n not in layout.enumerated]

    def check(self, layout: TokenLayout, trace) -> dict:
        """Also returns the continuous latents' dimensions: name -> size."""
        check_discrete_latents(trace, layout, self.name)
        dims, _, _ = unconstrained_sizes(trace, self._continuous(layout))
        if sum(dims.values()) > MAX_QUADRATURE_DIM:
            raise ValueError(
                f"conditionals='quadrature' builds a grid over the latents {dims} of total "
                f"dimension {sum(dims.values())} per sequence, more than {MAX_QUADRATURE_DIM}: "
                "use conditionals='importance'"
            )
        if not dims:
            raise ValueError(
                "conditionals='quadrature' needs a continuous latent site; the model has none"
            )
        return dims

    def scorer(
        self, model, args: tuple, kwargs: dict, layout: TokenLayout, trace
    ) -> ParticleScorer:
        dims, events, supports = unconstrained_sizes(trace, list(self.check(layout, trace)))
        grid = midpoint_grid(
            dims, events, self.num_points, self.bounds, layout.dtype, layout.device, supports
        )
        S = grid.points.shape[0]
        budget = resolve_max_elements(self.max_elements, layout.device)
        chunk = particle_chunk_size(S, particle_elements(trace, layout), budget, self.name)

        def draw(start: int, size: int):
            rows = slice(start, start + size)

            def build() -> ParticleScorer:
                values = {name: v[rows] for name, v in grid.values.items()}
                tr = particle_trace(model, args, kwargs, layout, num_particles=size, values=values)
                names = list(dims) + layout.enumerated
                parts = [(lp, 0) for lp in latent_log_prob(tr, names, layout)]
                kernels, lead = build_kernels(tr, layout, parts)
                log_w0 = combine_log_weights(parts, layout, lead, base=grid.log_volume)
                # the unconstrained scale's Jacobian, per grid point: the particle dim is
                # the last of the flattened (enumerated support, grid points) dims
                jacobian = grid.log_jacobian[rows].unsqueeze(-1)
                log_w0 = (log_w0.reshape(-1, size, log_w0.shape[-1]) + jacobian).flatten(0, 1)
                return ParticleScorer(kernels, layout, log_w0)

            return build(), lambda: build().kernels

        return chunked_particle_scorer(layout, S, chunk, draw)

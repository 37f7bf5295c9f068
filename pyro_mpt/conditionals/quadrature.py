r"""Quadrature conditionals: the latents on a grid (THEORY.md, 2).

For continuous latents of total dimension :math:`d \le 3` per sequence, ``G`` midpoints per
axis on ``[low, high]`` give :math:`G^d` particles :math:`z_s` with weights
:math:`w^0_s = p(z_s)\,\Delta^d` (:math:`\Delta` the cell width). The conditionals are exact up
to the grid's error. The paper's binary experiment uses a 20 x 20 grid on :math:`[-5, 5]^2`.
"""

from .base import (
    Conditionals,
    ParticleScorer,
    build_kernels,
    combine_log_weights,
    latent_log_prob,
    particle_trace,
)
from .grid import midpoint_grid
from .importance import check_discrete_latents

__all__ = ["QuadratureConditionals"]

#: The largest latent dimension a grid is built for.
MAX_QUADRATURE_DIM = 3


class QuadratureConditionals(Conditionals):
    r"""A midpoint grid over the continuous latents.

    :param int num_points: ``G``, points per latent dimension.
    :param tuple bounds: ``(low, high)`` of every axis.

    With grid points :math:`z_g` and cell volume :math:`\Delta` (:math:`G^K` points for
    :math:`K` latent dimensions), :math:`p(x_j \mid x_O) \approx \sum_g \bar w_g\,
    p(x_j \mid z_g)`, :math:`\bar w_g \propto p(z_g)\, p(x_O \mid z_g)\, \Delta`.

    Example::

        elbo = MaskedELBO(conditionals=QuadratureConditionals(num_points=30, bounds=(-4.0, 4.0)))
        elbo.estimate(bernoulli_latent_linear, None, X, 2).total   # X: (N, T) of 0. / 1.

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """

    name = "quadrature"

    def __init__(self, num_points=20, bounds=(-5.0, 5.0)):
        self.num_points = int(num_points)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        if self.num_points < 1 or not self.bounds[0] < self.bounds[1]:
            raise ValueError(
                f"quadrature needs num_points >= 1 and low < high, got {num_points}, {bounds}"
            )

    def _continuous(self, layout):
        return [n for n in layout.latents if n not in layout.enumerated]

    def check(self, layout, trace):
        check_discrete_latents(trace, layout, self.name)
        dims = {
            n: max(1, trace.nodes[n]["fn"].event_shape.numel()) for n in self._continuous(layout)
        }
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

    def scorer(self, model, args, kwargs, layout, trace):
        dims = self.check(layout, trace)
        events = {n: tuple(trace.nodes[n]["fn"].event_shape) for n in dims}
        grid = midpoint_grid(
            dims, events, self.num_points, self.bounds, layout.dtype, layout.device
        )
        values = grid.values
        tr = particle_trace(
            model, args, kwargs, layout, num_particles=grid.points.shape[0], values=values
        )
        parts = [(lp, 0) for lp in latent_log_prob(tr, list(dims) + layout.enumerated, layout)]
        kernels, lead = build_kernels(tr, layout, parts)
        log_w0 = combine_log_weights(parts, layout, lead, base=grid.log_volume)
        return ParticleScorer(kernels, layout, log_w0)

r"""Particle samplers: one chunk of ``size`` draws of the latents, returned as their
``(size, N)`` log-weights

.. math:: \log w_{s,n} = \log p(x_n, z_{s,n}) - \log q(z_{s,n}),

with :math:`q` the prior (then :math:`\log w_{s,n} = \log p(x_n \mid z_{s,n})`), a guide, or
a grid (then :math:`\log w_{s,n} = \log p(x_n, z_s)` and the cell volume is added by the
caller). Enumerated latents are summed out inside each weight.
"""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from ..conditionals.base import particle_trace
from ..conditionals.elimination import contract_evidence
from ..tokens import PARTICLE_PLATE
from .guide import guide_sites

__all__ = ["Sampler", "per_particle_cost", "site_log_prob"]


def per_sequence(lp, layout, size, name):
    """``(size, N)`` from a log-density of shape ``(size|1, *plate dims)`` (left-padded):
    summed over the token plate, if any, and broadcast over the sequences."""
    P = layout.max_plate_nesting
    if lp.dim() > P + 1:
        raise ValueError(
            f"site {name!r} has a log-density of shape {tuple(lp.shape)} with batch dims left "
            f"of the model's {P} plate dim(s); declare every batch dim with pyro.plate "
            "(or pass max_plate_nesting)"
        )
    lp = lp.reshape((1,) * (P + 1 - lp.dim()) + tuple(lp.shape))
    if layout.token_plate is not None:
        lp = lp.sum(layout.token_dim)
    try:
        lp = lp.expand(size, *layout.seq_shape)
    except RuntimeError:
        raise ValueError(
            f"site {name!r} has a log-density of shape {tuple(lp.shape)} that does not reduce "
            f"to one value per particle and sequence (sequences: {layout.seq_shape}); its "
            "batch dims must be plates of the sequences"
        ) from None
    return lp.reshape(size, layout.num_sequences)


def site_log_prob(fn, value):
    """A site's log-density; the function ``compile="log_prob"`` compiles."""
    return fn.log_prob(value)


def masked_log_prob(site, log_prob=site_log_prob):
    """A site's log-density with its mask applied."""
    lp = log_prob(site["fn"], site["value"])
    return scale_and_mask(lp, mask=site["mask"]) if site["mask"] is not None else lp


def log_joint(trace, layout, size, latents, log_prob=site_log_prob):
    r"""``(size, N)``: :math:`\log p(x_n \mid z_s) + \sum_{\text{latents}} \log p(z_s)`, the
    enumerated latents summed out."""
    if layout.enumerated:
        return contract_evidence(trace, layout, PARTICLE_PLATE, size, latents)
    total = 0.0
    for info in layout.sites:
        site = trace.nodes[info.name]
        total = total + per_sequence(masked_log_prob(site, log_prob), layout, size, info.name)
    for name in latents:
        site = trace.nodes[name]
        total = total + per_sequence(masked_log_prob(site), layout, size, name)
    return total


def _log_q(guide_trace, layout, size):
    total = 0.0
    for name, site in guide_sites(guide_trace).items():
        total = total + per_sequence(masked_log_prob(site), layout, size, name)
    return total


class Sampler:
    """Draws ``size`` particles and returns their log-weights ``(size, N)``.

    :param str kind: ``"prior"``, ``"guide"`` or ``"grid"``.
    :param latents: the continuous latents whose :math:`\\log p(z)` enters the weight
        (``"guide"``, ``"grid"``).
    :param guide: the proposal of ``kind="guide"``.
    :param dict grid: ``kind="grid"``: site name -> ``(G**d, *event_shape)`` grid values.
    :param log_jacobian: ``kind="grid"``: ``(G**d,)`` the log-Jacobian of each point of a
        grid on the unconstrained scale (:mod:`~pyro_mpt.conditionals.grid`), or ``None``.

    ``inputs(start, size)`` are the tensors a chunk depends on (the grid rows), passed to
    ``__call__`` after ``size``.
    """

    def __init__(
        self,
        model,
        args,
        kwargs,
        layout,
        kind,
        latents=(),
        guide=None,
        grid=None,
        log_jacobian=None,
    ):
        self.model, self.args, self.kwargs = model, tuple(args), dict(kwargs)
        self.layout, self.kind = layout, kind
        self.latents = list(latents)
        self.guide, self.grid = guide, grid
        self.log_jacobian = log_jacobian  # (G**d,) of a grid on the unconstrained scale

    def inputs(self, start: int, size: int) -> tuple:
        if self.grid is None:
            return ()
        rows = [v[start : start + size] for v in self.grid.values()]
        if self.log_jacobian is not None:
            rows.append(self.log_jacobian[start : start + size])
        return tuple(rows)

    def __call__(self, size: int, *inputs, log_prob=None) -> torch.Tensor:
        log_prob = log_prob or site_log_prob
        if self.kind == "prior":
            tr = self._trace(self.model, size)
            return log_joint(tr, self.layout, size, [], log_prob)
        if self.kind == "grid":
            values = dict(zip(self.grid, inputs))
            tr = self._trace(self.model, size, values)
            joint = log_joint(tr, self.layout, size, self.latents, log_prob)
            if self.log_jacobian is None:
                return joint
            return joint + inputs[len(self.grid)].unsqueeze(-1)
        gtr = self._guide_trace(size)
        tr = self._trace(poutine.replay(self.model, trace=gtr), size)
        joint = log_joint(tr, self.layout, size, self.latents, log_prob)
        return joint - _log_q(gtr, self.layout, size)

    def _trace(self, model, size, values=None):
        return particle_trace(
            model, self.args, self.kwargs, self.layout, num_particles=size, values=values
        )

    def _guide_trace(self, size):
        guide, dim = self.guide, -self.layout.max_plate_nesting - 1

        def particle_guide(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, size, dim=dim):
                return guide(*args, **kwargs)

        return poutine.trace(particle_guide).get_trace(*self.args, **self.kwargs)


def per_particle_cost(model, args, kwargs, layout, trace) -> int:
    """Elements of the largest tensor of one particle (all sequences, enumerated)."""
    if layout.enumerated:
        trace = particle_trace(model, args, kwargs, layout)
    cost = 1
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        fn, value = site["fn"], site["value"]
        vshape = tuple(value.shape) if torch.is_tensor(value) else ()
        shape = torch.broadcast_shapes(tuple(fn.batch_shape) + tuple(fn.event_shape), vshape)
        # a site's log-density per token: (batch, tokens); Gaussian events are T x T at most
        cost = max(cost, math.prod(shape))
    return cost

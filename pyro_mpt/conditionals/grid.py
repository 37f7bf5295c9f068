r"""The midpoint quadrature grid over a sequence's continuous latents, built once for the
quadrature conditionals and the quadrature reference.

With :math:`G` points per axis on :math:`[a, b]` and :math:`d` dimensions, cell width
:math:`h = (b - a)/G`, points :math:`a + h(i + \tfrac12)` and
:math:`\int f(z)\,dz \approx h^d \sum_{\text{points}} f(z_s)`.

The grid is laid on the unconstrained scale of each latent's support (given
``supports``): with :math:`z = T(u)`, :math:`T` = ``biject_to(support)`` (the identity for
a real latent, ``exp`` for a positive one, a sigmoid for the unit interval, stick-breaking
for the simplex),

.. math:: \int f(z)\,dz = \int f(T(u))\,\lvert\det \partial T/\partial u\rvert\,du
    \approx h^d \sum_s f(T(u_s))\,\lvert\det \partial T/\partial u\rvert_{u_s},

so the points are :math:`T(u_s)` and each carries its log-Jacobian
(the grid's ``log_jacobian``): every point lies inside the support (a Gamma latent
on ``[-5, 5]`` no longer meets negative values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributions import biject_to

__all__ = ["MidpointGrid", "midpoint_grid", "unconstrained_sizes"]


@dataclass
class MidpointGrid:
    """The grid's points and what the integral needs.

    :ivar torch.Tensor points: ``(G**d, d)`` the grid.
    :ivar torch.Tensor edge: bool ``(G**d,)``, points on the outer cells.
    :ivar float log_volume: :math:`d \\log h`, the log of one cell's volume.
    :ivar dict values: site name -> ``(G**d, *event_shape)``, the points cut into the
        sites' values (mapped into each site's support).
    :ivar torch.Tensor log_jacobian: ``(G**d,)`` :math:`\\log\\lvert\\det \\partial T /
        \\partial u\\rvert` of each point (0 for real latents), or ``None`` without supports.
    """

    points: torch.Tensor
    edge: torch.Tensor
    log_volume: float
    values: dict
    log_jacobian: torch.Tensor | None = None


def unconstrained_sizes(trace, names) -> tuple[dict, dict, dict]:
    """``(sizes, events, supports)`` of the latent sites ``names`` on the unconstrained
    scale: name -> dimension, event shape (a ``K``-simplex has ``K - 1``) and support."""
    sizes, events, supports = {}, {}, {}
    for name in names:
        fn = trace.nodes[name]["fn"]
        event = tuple(biject_to(fn.support).inverse_shape(fn.event_shape))
        sizes[name] = max(1, math.prod(event))
        events[name], supports[name] = event, fn.support
    return sizes, events, supports


def midpoint_grid(sizes, events, num_points, bounds, dtype, device, supports=None) -> MidpointGrid:
    """The grid over the latent sites ``sizes`` (name -> dimension, in order), whose values
    have event shapes ``events`` (name -> shape), on the unconstrained scale of
    ``supports`` (name -> constraint, from :func:`unconstrained_sizes`; ``None``: the grid
    as it is, every latent real).

    The first site's first coordinate varies slowest (``meshgrid`` with ``"ij"``)."""
    G, (low, high) = num_points, bounds
    width = (high - low) / G
    axis = low + width * (0.5 + torch.arange(G, dtype=dtype, device=device))
    d = sum(sizes.values())
    index = torch.stack(
        torch.meshgrid(*([torch.arange(G, device=device)] * d), indexing="ij"), -1
    ).reshape(-1, d)
    points = axis[index]
    edge = ((index == 0) | (index == G - 1)).any(-1)
    values, offset = {}, 0
    S = points.shape[0]
    log_jacobian = None if supports is None else points.new_zeros(S)
    for name, k in sizes.items():
        values[name] = points[:, offset : offset + k].reshape(S, *events[name])
        offset += k
        if supports is not None:
            transform = biject_to(supports[name])
            u, values[name] = values[name], transform(values[name])
            ladj = transform.log_abs_det_jacobian(u, values[name])
            log_jacobian = log_jacobian + ladj.reshape(S, -1).sum(-1)
    return MidpointGrid(points, edge, d * math.log(width), values, log_jacobian)

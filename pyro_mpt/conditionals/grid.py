r"""The midpoint quadrature grid over a sequence's continuous latents, built once for the
quadrature conditionals and the quadrature reference.

With :math:`G` points per axis on :math:`[a, b]` and :math:`d` dimensions, cell width
:math:`h = (b - a)/G`, points :math:`a + h(i + \tfrac12)` and
:math:`\int f(z)\,dz \approx h^d \sum_{\text{points}} f(z_s)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MidpointGrid", "midpoint_grid"]


@dataclass
class MidpointGrid:
    """The grid's points and what the integral needs.

    :ivar torch.Tensor points: ``(G**d, d)`` the grid.
    :ivar torch.Tensor edge: bool ``(G**d,)``, points on the outer cells.
    :ivar float log_volume: :math:`d \\log h`, the log of one cell's volume.
    :ivar dict values: site name -> ``(G**d, *event_shape)``, the points cut into the
        sites' values.
    """

    points: torch.Tensor
    edge: torch.Tensor
    log_volume: float
    values: dict


def midpoint_grid(sizes, events, num_points, bounds, dtype, device) -> MidpointGrid:
    """The grid over the latent sites ``sizes`` (name -> dimension, in order), whose values
    have event shapes ``events`` (name -> shape).

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
    for name, k in sizes.items():
        values[name] = points[:, offset : offset + k].reshape(points.shape[0], *events[name])
        offset += k
    return MidpointGrid(points, edge, d * math.log(width), values)

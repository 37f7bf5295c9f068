r"""Tests of :func:`pyro_mpt.conditionals.grid.midpoint_grid` against a grid written by hand,
and of its quadrature rule :math:`\int f \approx h^d \sum_s f(z_s)` on a Gaussian density."""

import math

import torch

from pyro_mpt.conditionals.grid import midpoint_grid
from tests.conftest import assert_close


def test_grid_points_edges_and_volume_match_hand_grid():
    """G = 3 on [-3, 3]: width h = 2, axis (-2, 0, 2); in 2 dims the first coordinate varies
    slowest, only the centre (0, 0) is not on an outer cell, and log-volume = 2 log 2."""
    grid = midpoint_grid({"z": 2}, {"z": (2,)}, 3, (-3.0, 3.0), torch.float64, None)
    axis = [-2.0, 0.0, 2.0]
    hand = torch.tensor([[a, b] for a in axis for b in axis], dtype=torch.float64)
    assert_close(grid.points, hand, atol=0.0)
    assert grid.edge.tolist() == [True] * 4 + [False] + [True] * 4
    assert math.isclose(grid.log_volume, 2 * math.log(2.0), abs_tol=1e-15)
    assert_close(grid.values["z"], hand, atol=0.0)


def test_grid_values_cut_points_by_site():
    """Two sites, a scalar ``u`` and a 2-vector ``v``: the 3-dim points are cut in site
    order, ``u`` the first coordinate and ``v`` the other two; every cell is an edge cell
    for G = 2."""
    grid = midpoint_grid({"u": 1, "v": 2}, {"u": (), "v": (2,)}, 2, (0.0, 1.0), torch.float64, None)
    assert grid.points.shape == (8, 3)
    assert_close(grid.values["u"], grid.points[:, 0], atol=0.0)
    assert_close(grid.values["v"], grid.points[:, 1:], atol=0.0)
    assert grid.values["u"].shape == (8,) and grid.values["v"].shape == (8, 2)
    assert_close(grid.points[:, 0], torch.tensor([0.25] * 4 + [0.75] * 4), atol=0.0)
    assert bool(grid.edge.all())
    assert math.isclose(grid.log_volume, 3 * math.log(0.5), abs_tol=1e-15)


def test_grid_integrates_gaussian_density_to_one():
    """40 points per axis on [-6, 6]^2 (h = 0.3): the midpoint rule integrates a standard
    bivariate normal density to 1 within 1e-8 (the mass outside the box is ~4e-9, the rule's
    error for a Gaussian far smaller)."""
    grid = midpoint_grid({"z": 2}, {"z": (2,)}, 40, (-6.0, 6.0), torch.float64, None)
    density = torch.distributions.Normal(0.0, 1.0).log_prob(grid.points).sum(-1)
    integral = torch.logsumexp(density + grid.log_volume, 0).exp()
    assert_close(integral, 1.0, atol=1e-8)
    # shifted and scaled: 1.3e-5 of its mass lies below -6 (4.2 sd), hence 1e-4
    f64 = dict(dtype=torch.float64)
    shifted = torch.distributions.Normal(
        torch.tensor([0.5, -1.0], **f64), torch.tensor([0.8, 1.2], **f64)
    )
    integral = torch.logsumexp(shifted.log_prob(grid.points).sum(-1) + grid.log_volume, 0).exp()
    assert_close(integral, 1.0, atol=1e-4)

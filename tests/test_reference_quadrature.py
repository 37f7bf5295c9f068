"""The quadrature reference (pyro_mpt.reference.quadrature) against closed forms, its grid
(the one midpoint grid of pyro_mpt.conditionals.grid), and its warnings."""

import math

import pytest
import torch

from pyro_mpt.models import (
    bayesian_linear_regression_latent,
    bayesian_linear_regression_log_marginal,
    ppca_latent,
)
from pyro_mpt.reference import log_marginal_likelihood
from tests.conftest import assert_close
from tests.reference_data import (
    latent_model,
    mixed_exact,
    mixed_model,
    per_row_exact,
    ppca_data,
    quiet,
)


def _old_quadrature_grid(dims, points, bounds, dtype, device):
    """The grid pyro_mpt.evaluation built before it used conditionals.grid (verbatim)."""
    G, (low, high) = points, bounds
    width = (high - low) / G
    axis = low + width * (0.5 + torch.arange(G, dtype=dtype, device=device))
    d = sum(k for k, _ in dims.values())
    index = torch.stack(
        torch.meshgrid(*([torch.arange(G, device=device)] * d), indexing="ij"), -1
    ).reshape(-1, d)
    grid = axis[index]
    edge = ((index == 0) | (index == G - 1)).any(-1)
    return grid, edge, d * math.log(width)


@pytest.mark.parametrize(
    "sizes, events",
    [({"z": 2}, {"z": (2,)}), ({"a": 1, "b": 2}, {"a": (), "b": (2,)}), ({"w": 3}, {"w": (3,)})],
)
@pytest.mark.parametrize("G, bounds", [(7, (-5.0, 5.0)), (20, (-0.5, 2.0))])
def test_grid_equals_the_previous_grid(sizes, events, G, bounds):
    """The reference's grid (conditionals.grid.midpoint_grid) is the previous one bit for
    bit: points, edge cells, log cell volume, and each site's slice of the points."""
    from pyro_mpt.reference.quadrature import midpoint_grid

    grid = midpoint_grid(sizes, events, G, bounds, torch.float64, torch.device("cpu"))
    dims = {n: (k, events[n]) for n, k in sizes.items()}
    points, edge, log_norm = _old_quadrature_grid(dims, G, bounds, torch.float64, "cpu")
    assert torch.equal(grid.points, points) and torch.equal(grid.edge, edge)
    assert grid.log_volume == log_norm
    offset = 0
    for name, k in sizes.items():
        want = points[:, offset : offset + k].reshape(points.shape[0], *events[name])
        assert torch.equal(grid.values[name], want)
        offset += k
    # the midpoints themselves: low + h (i + 1/2)
    h = (bounds[1] - bounds[0]) / G
    assert_close(points[:G, -1], bounds[0] + h * (torch.arange(G) + 0.5), atol=1e-14)


def test_quadrature_2d_latent_matches_collapsed_exact():
    X, t = ppca_data(N=8, T=5, w_scale=1.0, noise=0.5)
    est = log_marginal_likelihood(
        latent_model(t), X, method="quadrature", quadrature_points=80, quadrature_bounds=(-7.0, 7.0)
    )
    assert est.method == "quadrature" and est.num_samples == 6400 and est.trustworthy
    assert est.ess is None and est.khat is None and est.stderr == 0.0
    assert_close(est.per_sequence, per_row_exact(X, t), atol=1e-6)
    assert any("a midpoint grid of 80^2 = 6400 points" in m for m in est.messages)
    assert str(est).endswith("(quadrature, 6400 grid points)")


def test_quadrature_chunked_equals_unchunked():
    """The grid has no randomness: any chunking gives the same sum (to rounding)."""
    X, t = ppca_data(N=4)
    kw = dict(method="quadrature", quadrature_points=30)
    one = log_marginal_likelihood(latent_model(t), X, **kw)
    many = log_marginal_likelihood(latent_model(t), X, chunk_size=77, **kw)
    assert_close(many.per_sequence, one.per_sequence, atol=1e-12)


def test_quadrature_with_token_plate_bayesian_linear_regression():
    """A global 2-D weight vector, the data points as tokens of one sequence."""
    features = torch.randn(12, 2)
    y = features @ torch.tensor([0.8, -0.5]) + 0.5 * torch.randn(12)
    est = log_marginal_likelihood(
        bayesian_linear_regression_latent,
        y,
        features,
        method="quadrature",
        token_plate="data",
        quadrature_points=120,
        quadrature_bounds=(-6.0, 6.0),
    )
    assert est.per_sequence.shape == (1,)
    assert_close(est.total, bayesian_linear_regression_log_marginal(y, features), atol=1e-6)


def test_quadrature_warns_when_the_grid_cuts_off_mass():
    X, t = ppca_data(N=4)
    with pytest.warns(UserWarning, match="outer cells of the quadrature grid"):
        est = log_marginal_likelihood(
            latent_model(t),
            X,
            method="quadrature",
            quadrature_points=10,
            quadrature_bounds=(-0.5, 0.5),
        )
    assert not est.trustworthy
    assert any(m.startswith("UNRELIABLE: 4 of 4 sequences put more") for m in est.messages)


def test_quadrature_rejects_high_dimensional_latents():
    X, t = ppca_data(K=4)
    t["W"] = torch.randn(4, 4)
    with pytest.raises(ValueError, match="total dimension 4 per sequence"):
        log_marginal_likelihood(
            lambda X: ppca_latent(X, 4, t["W"], t["loc"], t["noise_scale"]),
            X,
            method="quadrature",
        )


def test_enumerated_and_continuous_latents():
    """Enumerated c summed out inside each weight (tensor variable elimination with the
    particle plate kept) and z on a grid or drawn: both match the closed form (a mixture of
    low-rank Gaussians)."""
    weights = torch.tensor([0.3, 0.7])
    locs, W, sigma = torch.randn(2, 4), 0.7 * torch.randn(4, 1), torch.tensor(0.9)
    X = torch.randn(5, 4)
    expected = mixed_exact(X, weights, locs, W, sigma)
    args = (X, weights, locs, W, sigma)
    quad = log_marginal_likelihood(
        mixed_model,
        *args,
        method="quadrature",
        quadrature_points=200,
        quadrature_bounds=(-8.0, 8.0),
    )
    assert_close(quad.per_sequence, expected, atol=1e-8)
    imp = log_marginal_likelihood(mixed_model, *args, num_samples=20_000, chunk_size=5000)
    assert imp.method == "importance" and imp.trustworthy
    gap = (imp.per_sequence - expected).abs()
    se = imp.per_sequence_stderr
    assert (gap < 4 * se + se**2 / 2).all()


def test_guide_is_ignored_by_quadrature():
    X, t = ppca_data(N=3)
    est, _ = quiet(
        log_marginal_likelihood,
        latent_model(t),
        X,
        method="quadrature",
        guide=lambda X: None,
        quadrature_points=40,
        quadrature_bounds=(-6.0, 6.0),
    )
    assert "guide ignored: method='quadrature' does not sample from a proposal" in est.messages
    assert_close(est.per_sequence, per_row_exact(X, t), atol=1e-4)

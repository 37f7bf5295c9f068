"""Quadrature on the unconstrained scale of each latent's support
(pyro_mpt.conditionals.grid): a Gamma or Beta latent gets a grid inside its support, with
the log-Jacobian of biject_to(support) added to each point's weight; values against closed
forms written out here, conditionals against the conjugate route's exact ones (themselves
checked against numerical integration in tests/test_conjugate.py)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import biject_to, constraints

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals.grid import midpoint_grid, unconstrained_sizes
from pyro_mpt.engine import MPTOptions, prepare
from pyro_mpt.reference import log_marginal_likelihood
from tests.conftest import assert_close
from tests.test_conjugate import A, B, _every_mask, beta_bernoulli, gamma_poisson

COUNTS = torch.tensor([3.0, 1.0, 4.0, 2.0, 5.0, 3.0], dtype=torch.float64)


def gamma_poisson_exact(x):
    s, n = float(x.sum()), len(x)
    return (
        A * math.log(B)
        - math.lgamma(A)
        + math.lgamma(A + s)
        - (A + s) * math.log(B + n)
        - float(torch.lgamma(x + 1).sum())
    )


def test_gamma_latent_at_the_default_bounds_is_finite_and_converges():
    """On [-5, 5] of log(rate) the grid never meets a negative rate (the constrained grid
    gave NaN); with 100 points it equals the closed form to 1e-9 (relative)."""
    exact = gamma_poisson_exact(COUNTS)
    coarse = log_marginal_likelihood(gamma_poisson, COUNTS, method="quadrature", token_plate="data")
    assert math.isfinite(float(coarse.total)) and coarse.trustworthy
    fine = log_marginal_likelihood(
        gamma_poisson, COUNTS, method="quadrature", token_plate="data", quadrature_points=100
    )
    assert_close(fine.total, exact, atol=0.0, rtol=1e-9)


@pytest.mark.parametrize(
    "model, x, bounds",
    [
        (gamma_poisson, torch.tensor([3.0, 1.0, 4.0, 0.0]), (-10.0, 6.0)),
        (beta_bernoulli, torch.tensor([1.0, 0.0, 1.0, 1.0]), (-12.0, 12.0)),
    ],
    ids=["Gamma-Poisson", "Beta-Bernoulli"],
)
def test_quadrature_conditionals_equal_the_exact_ones(model, x, bounds):
    """Every conditional of T = 4 tokens, all 2^T conditioning sets: a 400-point grid on the
    unconstrained scale (bounds wide enough that the cut-off prior mass is below 1e-8)
    against the conjugate route's exact conditionals, to 1e-6."""
    x = x.double()
    opts = dict(token_plate="data", quadrature_points=400, quadrature_bounds=bounds)
    _, quad, _ = prepare(model, (x,), {}, MPTOptions(conditionals="quadrature", **opts))
    _, exact, _ = prepare(model, (x,), {}, MPTOptions(conditionals="conjugate", **opts))
    observed, scored = _every_mask(len(x))
    assert_close(quad(observed, scored), exact(observed, scored), atol=1e-6)
    chain = MaskedELBO(conditionals="quadrature", estimator="chain", **opts)
    value = chain.estimate(model, None, x).total
    ref = log_marginal_likelihood(model, x, method="conjugate", token_plate="data").total
    assert_close(value, ref, atol=1e-6)


def test_grid_points_lie_in_the_support_with_their_jacobian():
    """A 1-D positive latent and a 3-simplex (2 unconstrained dims): every point inside the
    support, and the log-Jacobian of each point that of biject_to written out here
    (exp: log z; the simplex's from torch's transform on the same unconstrained points)."""

    def two_latents():
        pyro.sample("rate", dist.Gamma(A, B))
        pyro.sample("probs", dist.Dirichlet(torch.ones(3)))

    trace = poutine.trace(two_latents).get_trace()
    sizes, events, supports = unconstrained_sizes(trace, ["rate", "probs"])
    assert sizes == {"rate": 1, "probs": 2} and events["probs"] == (2,)
    grid = midpoint_grid(sizes, events, 5, (-2.0, 2.0), torch.float64, "cpu", supports)
    rate, probs = grid.values["rate"], grid.values["probs"]
    assert bool((rate > 0).all()) and bool((probs > 0).all())
    assert_close(probs.sum(-1), torch.ones(125), atol=1e-12)
    u_rate, u_probs = grid.points[:, :1], grid.points[:, 1:]
    stick = biject_to(constraints.simplex)
    want = u_rate[:, 0] + stick.log_abs_det_jacobian(u_probs, stick(u_probs))
    assert_close(grid.log_jacobian, want, atol=1e-12)
    real = midpoint_grid({"z": 1}, {"z": ()}, 5, (-2.0, 2.0), torch.float64, "cpu", None)
    assert real.log_jacobian is None  # no supports: the grid as it was

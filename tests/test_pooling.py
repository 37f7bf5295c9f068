"""Several observed sites in the same plates pool their tokens into one sequence."""

import pyro
import pyro.distributions as dist
import torch

from pyro_mpt import MaskedELBO, mpt_curve
from tests.conftest import assert_close


def two_site_model(X, Y):
    """A scalar latent shared by a 3-token site and a 2-token site: jointly Gaussian with
    covariance a a^T + I, a = (1, 1, 1, 2, 2)."""
    with pyro.plate("data", X.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) * torch.ones(3), 1.0).to_event(1), obs=X)
        pyro.sample("y", dist.Normal(2 * z.unsqueeze(-1) * torch.ones(2), 1.0).to_event(1), obs=Y)


def _exact(X, Y):
    a = torch.tensor([1.0, 1, 1, 2, 2])
    cov = a[:, None] * a + torch.eye(5)
    return dist.MultivariateNormal(torch.zeros(5), cov).log_prob(torch.cat([X, Y], -1)).sum()


def test_sites_of_different_sizes_pool_their_tokens():
    X, Y = torch.randn(4, 3), torch.randn(4, 2)
    curve = mpt_curve(
        two_site_model,
        X,
        Y,
        exhaustive=True,
        conditionals="quadrature",
        quadrature_points=200,
        quadrature_bounds=(-8.0, 8.0),
    )
    assert curve.num_tokens == 5
    # a 200-point midpoint grid on [-8, 8] is exact to ~1e-10 for this smooth integrand
    assert_close(curve.area.item(), _exact(X, Y).item(), atol=1e-8)


def test_chain_over_pooled_sites_is_exact_with_quadrature():
    X, Y = torch.randn(6, 3), torch.randn(6, 2)
    est = MaskedELBO(
        estimator="chain",
        conditionals="quadrature",
        quadrature_points=200,
        quadrature_bounds=(-8.0, 8.0),
        num_masks=3,
    ).estimate(two_site_model, None, X, Y)
    assert_close(est.total.item(), _exact(X, Y).item(), atol=1e-8)

"""Latents fixed by ``poutine.condition`` (issue 12) are fixed values, not data: the
estimate is :math:`\\log p(x \\mid \\text{fixed})`. Checked by hand and against
``TraceEnum_ELBO`` with an empty guide (whose loss also counts the fixed sites' own
density, subtracted here)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate

from pyro_mpt import MaskedELBO
from pyro_mpt.reference import log_marginal_likelihood
from tests.conftest import assert_close

K, N, T = 3, 7, 4


@config_enumerate
def mixture(x):
    """A mixture with latent weights and scale (Dirichlet, HalfNormal globals)."""
    probs = pyro.sample("probs", dist.Dirichlet(torch.ones(K)))
    scale = pyro.sample("scale", dist.HalfNormal(2.0))
    locs = torch.tensor([-2.0, 0.0, 2.5])
    with pyro.plate("seq", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(probs))
        pyro.sample("x", dist.Normal(locs[z].unsqueeze(-1), scale).to_event(1), obs=x)


def test_conditioned_globals_are_fixed_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, T, generator=g) * 2
    fixed = {"probs": torch.tensor([0.2, 0.3, 0.5]), "scale": torch.tensor(1.3)}
    model = poutine.condition(mixture, data=fixed)
    locs = torch.tensor([-2.0, 0.0, 2.5])
    lp = dist.Normal(locs, fixed["scale"]).log_prob(x.unsqueeze(-1)).sum(1)  # (N, K)
    exact = torch.logsumexp(lp + fixed["probs"].log(), -1).sum()
    # TraceEnum_ELBO counts log p(probs) + log p(scale) as well
    own = dist.Dirichlet(torch.ones(K)).log_prob(fixed["probs"])
    own = own + dist.HalfNormal(2.0).log_prob(fixed["scale"])
    trace_enum = -TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda x: None, x)
    assert_close(trace_enum - own, exact, atol=1e-9)

    ref = log_marginal_likelihood(model, x)
    assert ref.method == "exact"
    assert_close(ref.total, exact, atol=1e-9)
    est = MaskedELBO(estimator="chain").estimate(model, None, x)
    assert_close(est.total, exact, atol=1e-9)
    strat = MaskedELBO(num_masks=32).estimate(model, None, x)
    assert abs(float(strat.total) - float(exact)) < 4 * strat.stderr


def test_conditioned_scale_of_a_gaussian_model_takes_the_exact_route():
    """No latent left: "auto" takes the exact Gaussian route for x_n ~ N(0, s^2 I + W W^T)."""
    W = torch.tensor([[1.0], [0.5], [-0.3]])

    def ppca(x):
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            cov_diag = (s**2).expand(3)
            pyro.sample("x", dist.LowRankMultivariateNormal(torch.zeros(3), W, cov_diag), obs=x)

    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(1))
    model = poutine.condition(ppca, data={"s": torch.tensor(0.8)})
    exact = dist.MultivariateNormal(torch.zeros(3), 0.64 * torch.eye(3) + W @ W.T).log_prob(x)
    ref = log_marginal_likelihood(model, x)
    assert ref.method == "exact"
    assert_close(ref.total, exact.sum(), atol=1e-9)
    est = MaskedELBO(estimator="chain").estimate(model, None, x)
    assert est.conditionals == "gaussian"
    assert_close(est.total, exact.sum(), atol=1e-9)


def test_conditioned_noise_of_a_regression_with_token_plate():
    """With token_plate, a global fixed by condition outside the plate is not a token."""
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    y = torch.randn(8, generator=torch.Generator().manual_seed(3))

    def regression(x, y):
        sigma = pyro.sample("sigma", dist.HalfCauchy(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x.sum(-1), sigma), obs=y)

    model = poutine.condition(regression, data={"sigma": torch.tensor(0.7)})
    exact = dist.Normal(x.sum(-1), 0.7).log_prob(y).sum()
    ref = log_marginal_likelihood(model, x, y, token_plate="data")
    assert_close(ref.total, exact, atol=1e-9)
    est = MaskedELBO(estimator="chain", token_plate="data").estimate(model, None, x, y)
    assert_close(est.total, exact, atol=1e-9)
    est = MaskedELBO(num_masks=16, token_plate="data").estimate(model, None, x, y)
    assert abs(float(est.total) - float(exact)) < 4 * est.stderr


def test_fixed_value_with_latent_parents_is_refused():
    """A per-dataset observation outside the data's plates that depends on a latent would be
    ignored as a fixed value: refused, naming both sites."""

    def model(x, total):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("total", dist.Normal(mu * x.shape[0], 1.0), obs=total)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    x = torch.randn(5)
    match = r"'total' sits outside the plates of the data.*\['mu'\]"
    with pytest.raises(ValueError, match=match):
        MaskedELBO(token_plate="data").loss(model, None, x, torch.tensor(1.0))
    with pytest.raises(ValueError, match=match):
        log_marginal_likelihood(model, x, torch.tensor(1.0), token_plate="data")

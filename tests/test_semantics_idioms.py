"""Idioms (issue 12): data that are not tensors are refused as Pyro's ELBOs refuse them;
models not vectorised over particles (``x @ w``) or mis-broadcast over them fail before the
full particle run, naming the site and the rule. The closed form of Bayesian linear
regression is computed here without pyro_mpt."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_mpt import MaskedELBO
from pyro_mpt.reference import log_marginal_likelihood

N, D = 6, 2


def _regression_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = x @ torch.tensor([0.7, -1.2]) + torch.randn(N, generator=g)
    return x, y


def regression_matmul(x, y, shapes=None):
    """Bayesian linear regression as often first written: not vectorised over particles."""
    w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def regression(x, y, shapes=None):
    """The same, broadcasting over leading dims (the rule's fix)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), 1.0), obs=y)


def regression_misbroadcast(x, y, shapes):
    """Runs, but ``b.unsqueeze(-1)`` puts the particles on a second dim: S^2 work."""
    w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    shapes.append(tuple(b.shape))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1) + b.unsqueeze(-1), 1.0), obs=y)


def _closed_form(x, y):
    """y ~ N(0, I + x x^T) with w ~ N(0, I) integrated out."""
    cov = torch.eye(N) + x @ x.T
    return dist.MultivariateNormal(torch.zeros(N), cov).log_prob(y)


@pytest.mark.parametrize("call", ["elbo", "reference"])
def test_matmul_model_fails_with_the_rule(call):
    """With particles (importance) ``x @ w`` cannot broadcast: the error gives the rule.
    "auto" needs no particles here (the model is linear-Gaussian) and is exact."""
    x, y = _regression_data()
    with pytest.raises(ValueError, match=r"after the latent site\(s\) \['w'\].*\(x \* w\)\.sum"):
        if call == "elbo":
            MaskedELBO(token_plate="data", conditionals="importance").loss(
                regression_matmul, None, x, y
            )
        else:
            log_marginal_likelihood(
                regression_matmul, x, y, token_plate="data", method="importance"
            )
    exact = float(_closed_form(x, y))
    if call == "elbo":
        est = MaskedELBO(token_plate="data", estimator="chain").estimate(
            regression_matmul, None, x, y
        )
        assert est.conditionals == "linear_gaussian"
        assert abs(float(est.total) - exact) < 1e-6 * abs(exact)
    else:
        ref = log_marginal_likelihood(regression_matmul, x, y, token_plate="data")
        assert ref.method == "gaussian"
        assert abs(float(ref.total) - exact) < 1e-6 * abs(exact)


def test_vectorised_regression_matches_closed_form():
    """The rewritten model runs; importance within 4 standard errors of the closed form."""
    x, y = _regression_data()
    ref = log_marginal_likelihood(
        regression, x, y, token_plate="data", method="importance", num_samples=20000
    )
    assert ref.method == "importance"
    assert abs(float(ref.total) - float(_closed_form(x, y))) < 4 * ref.stderr + 1e-3
    exact = log_marginal_likelihood(regression, x, y, token_plate="data")  # linear-Gaussian
    assert exact.method == "gaussian"
    assert abs(float(exact.total) - float(_closed_form(x, y))) < 1e-6 * abs(float(exact.total))


@pytest.mark.parametrize("call", ["elbo", "reference"])
def test_misbroadcast_caught_before_the_particle_run(call):
    # importance asked for: "auto" would integrate this linear-Gaussian model exactly
    x, y = _regression_data()
    shapes = []
    with pytest.raises(ValueError, match=r"site 'y' has batch shape \(3, 3, 6\).*S\^2"):
        if call == "elbo":
            MaskedELBO(token_plate="data", conditionals="importance", num_samples=256).loss(
                regression_misbroadcast, None, x, y, shapes
            )
        else:
            log_marginal_likelihood(
                regression_misbroadcast, x, y, shapes, token_plate="data", method="importance"
            )
    # the plain trace and the 3-particle probe ran; the 256-particle run never did
    assert shapes == [(), (3, 1)]


def test_non_tensor_data_refused_as_pyro_refuses_them():
    """NumPy arrays and Python numbers as observations: Pyro's Trace_ELBO refuses them
    (validation), and so does pyro_mpt, naming the site and the conversion."""

    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def scalar_model():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=0.5)

    x = np.random.default_rng(0).standard_normal(4)
    with pytest.raises(ValueError, match="must be a Tensor"):
        Trace_ELBO().loss(model, lambda x: None, x)
    with pytest.raises(TypeError, match=r"'x'.*torch\.as_tensor"):
        MaskedELBO().loss(model, None, x)
    with pytest.raises(ValueError, match="must be a Tensor"):
        Trace_ELBO().loss(scalar_model, lambda: None)
    with pytest.raises(TypeError, match=r"observed site 'y' holds a float.*torch\.as_tensor"):
        log_marginal_likelihood(scalar_model)
    # converted as Pyro users convert them, the same model runs (default dtype)
    exact = dist.Normal(0.0, 1.0).log_prob(torch.as_tensor(x)).sum()
    ref = log_marginal_likelihood(model, torch.as_tensor(x, dtype=torch.get_default_dtype()))
    assert abs(float(ref.total) - float(exact)) < 1e-12

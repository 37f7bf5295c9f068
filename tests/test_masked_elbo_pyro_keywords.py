"""Pyro's ELBO keywords on ``MaskedELBO``: ``vectorize_particles`` (always vectorized),
``retain_graph`` (Pyro's meaning), ``ignore_jit_warnings`` (no JIT: no effect),
``jit_options`` (refused), and ``num_particles`` read as ``num_masks``. The exact values
come from torch's dense Gaussian, not from pyro_mpt."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import MaskedELBO
from tests.conftest import assert_close

N, T = 30, 5


def _data():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(T, 2, generator=g, dtype=torch.float64)
    X = torch.randn(N, 2, generator=g, dtype=torch.float64) @ W.T
    return X + 0.5 * torch.randn(N, T, generator=g, dtype=torch.float64)


def model(X, W):
    """A Gaussian factor model as a Pyro user writes it; ``W`` comes from outside."""
    loc = pyro.param("loc", torch.zeros(T, dtype=X.dtype))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("x", dist.LowRankMultivariateNormal(loc, W, 0.25 * torch.ones(T)), obs=X)


def _exact(X, W, loc):
    cov = W @ W.T + 0.25 * torch.eye(T, dtype=X.dtype)
    return torch.distributions.MultivariateNormal(loc, cov).log_prob(X).sum()


@pytest.mark.parametrize("vectorize", [False, True])
def test_vectorize_particles_is_accepted_and_changes_nothing(vectorize):
    X = _data()
    W = torch.randn(T, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    elbo = MaskedELBO(estimator="stratified", num_masks=3, vectorize_particles=vectorize)
    assert elbo.vectorize_particles is vectorize and elbo.num_particles == 3
    assert elbo.max_plate_nesting == float("inf")  # no particle plate added
    pyro.set_rng_seed(7)
    loss = elbo.loss(model, None, X, W)
    pyro.set_rng_seed(7)
    again = MaskedELBO(estimator="stratified", num_masks=3).loss(model, None, X, W)
    assert loss == again  # same seed, same masks, same draws either way
    # and with exact conditionals the chain estimator is exact
    chain = MaskedELBO(estimator="chain", vectorize_particles=vectorize).loss(model, None, X, W)
    exact = _exact(X, W, torch.zeros(T, dtype=torch.float64))
    assert chain == pytest.approx(-float(exact), abs=1e-8)


def test_retain_graph_keeps_the_graph_of_a_tensor_built_outside_the_model():
    X = _data()
    raw = torch.randn(T, 2, dtype=torch.float64, requires_grad=True)
    W = 2.0 * raw  # built once, used by every step: its graph must survive a backward
    elbo = MaskedELBO(estimator="chain", retain_graph=True)
    assert elbo.retain_graph is True
    first = elbo.loss_and_grads(model, None, X, W)
    loc = pyro.param("loc")
    second = elbo.loss_and_grads(model, None, X, W)  # backward through W's graph again
    assert first == pytest.approx(second, abs=1e-10)
    # the gradient of the two backward passes accumulated: twice the exact gradient
    W_leaf = W.detach().requires_grad_()
    (expected,) = torch.autograd.grad(-_exact(X, W_leaf, loc.detach()), [W_leaf])
    assert_close(raw.grad, 2 * (2.0 * expected), atol=1e-8)
    # without it, the second backward pass fails the way it does in Pyro
    raw.grad = None
    W = 2.0 * raw
    plain = MaskedELBO(estimator="chain")
    plain.loss_and_grads(model, None, X, W)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        plain.loss_and_grads(model, None, X, W)


def test_ignore_jit_warnings_is_accepted_and_jit_options_refused():
    assert MaskedELBO(ignore_jit_warnings=True).ignore_jit_warnings is True
    assert MaskedELBO(jit_options=None).jit_options is None
    with pytest.raises(ValueError, match=r"jit_options=\{'check_trace': True\}.*no JIT"):
        MaskedELBO(jit_options={"check_trace": True})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vectorize_particles": "yes"}, "vectorize_particles must be True or False, got 'yes'"),
        ({"retain_graph": 1}, "retain_graph must be True, False or None, got 1"),
        ({"ignore_jit_warnings": None}, "ignore_jit_warnings must be True or False, got None"),
    ],
)
def test_pyro_keywords_of_the_wrong_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        MaskedELBO(**kwargs)

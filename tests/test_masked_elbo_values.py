r"""The values of ``MaskedELBO``: the same number as :class:`~pyro.infer.Trace_ELBO` where
there is nothing to infer, the exact loss and gradient of a dense Gaussian, and under plate
subsampling a loss scaled by :math:`N / n` as Pyro does, for every conditional backend."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_mpt import MaskedELBO
from pyro_mpt.models import (
    gaussian_mixture_log_marginal,
    multivariate_normal,
    ppca_collapsed,
    ppca_latent,
    ppca_log_marginal,
)
from tests.conftest import assert_close
from tests.test_masked_elbo import K, N, T, _data  # the same data as there


def empty_guide(*args, **kwargs):
    pass


# ----------------------------------------------------------------------------------------
# Scale: the same number as Trace_ELBO where there is nothing to infer
# ----------------------------------------------------------------------------------------


def _independent_normal(X, loc, scale):
    with pyro.plate("data", X.shape[0]):
        pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=X)


@pytest.mark.parametrize("kind", ["lowrank", "dense", "independent"])
def test_loss_equals_trace_elbo_without_latents(kind):
    """No latents and an empty guide: Trace_ELBO's loss is exactly -log p(X), and so is
    MaskedELBO(estimator="chain") on the exact Gaussian backend."""
    X, t = _data()
    if kind == "lowrank":
        model = lambda X: ppca_collapsed(X, K, t["W"], t["loc"], t["noise_scale"])  # noqa: E731
        exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    elif kind == "dense":
        cov = t["W"] @ t["W"].T + t["noise_scale"] ** 2 * torch.eye(T)
        model = lambda X: multivariate_normal(X, t["loc"], cov)  # noqa: E731
        exact = dist.MultivariateNormal(t["loc"], cov).log_prob(X).sum()
    else:
        scale = torch.linspace(0.5, 2.0, T)
        model = lambda X: _independent_normal(X, t["loc"], scale)  # noqa: E731
        exact = dist.Normal(t["loc"], scale).log_prob(X).sum()
    trace_elbo = Trace_ELBO().loss(model, empty_guide, X)
    assert_close(trace_elbo, -exact.item(), atol=1e-8)
    for estimator in ("chain", "exhaustive"):
        masked = MaskedELBO(estimator=estimator, conditionals="gaussian").loss(model, None, X)
        assert_close(masked, trace_elbo, atol=1e-8, msg=f"{kind} {estimator}")


def test_stratified_is_unbiased_around_trace_elbo():
    """The stratified loss averages to Trace_ELBO's (= -log p(X)) over many draws."""
    X, t = _data()
    model = lambda X: ppca_collapsed(X, K, t["W"], t["loc"], t["noise_scale"])  # noqa: E731
    trace_elbo = Trace_ELBO().loss(model, empty_guide, X)
    est = MaskedELBO(estimator="stratified", num_masks=200).estimate(model, None, X)
    assert math.isfinite(est.stderr) and est.stderr > 0
    assert abs(-est.total.item() - trace_elbo) < 5 * est.stderr, (
        -est.total.item(),
        trace_elbo,
        est.stderr,
    )


def _dense_setup():
    X, t = _data()
    L = torch.linalg.cholesky(t["W"] @ t["W"].T + 0.2 * torch.eye(T)).requires_grad_()
    loc = t["loc"].clone().requires_grad_()

    def model(X):
        multivariate_normal(X, loc, L @ L.T)

    exact = -dist.MultivariateNormal(loc, covariance_matrix=L @ L.T).log_prob(X).sum()
    return X, L, loc, model, exact


def test_dense_gaussian_loss_matches_exact():
    X, L, loc, model, exact = _dense_setup()
    loss = MaskedELBO(estimator="chain").differentiable_loss(model, None, X)
    assert loss.requires_grad
    assert_close(loss.item(), exact.item(), atol=1e-8)


def test_dense_gaussian_gradient_matches_exact():
    X, L, loc, model, exact = _dense_setup()
    loss = MaskedELBO(estimator="chain").differentiable_loss(model, None, X)
    got = torch.autograd.grad(loss, [L, loc])
    expected = torch.autograd.grad(exact, [L, loc])
    for g, e in zip(got, expected):
        assert_close(g, e, atol=1e-8)


# ----------------------------------------------------------------------------------------
# Plate subsampling: scaled by N / n as Pyro does
# ----------------------------------------------------------------------------------------


def _subsampled_ppca(X, W, loc, noise_scale, subsample=None, subsample_size=None, record=None):
    n_all, t = X.shape
    with pyro.plate("data", n_all, subsample=subsample, subsample_size=subsample_size) as idx:
        if record is not None:
            record.append(idx.clone())
        pyro.sample(
            "x",
            dist.LowRankMultivariateNormal(loc, W, (noise_scale**2).expand(t)),
            obs=X[idx],
        )


def test_subsample_fixed_indices_matches_trace_elbo():
    X, t = _data()
    idx = torch.tensor([0, 3, 7, 9, 20, 33, 39])
    n = len(idx)

    def model(X):
        _subsampled_ppca(X, t["W"], t["loc"], t["noise_scale"], subsample=idx)

    trace_elbo = Trace_ELBO().loss(model, empty_guide, X)
    exact_subset = ppca_log_marginal(X[idx], t["W"], t["loc"], t["noise_scale"]).item()
    assert_close(trace_elbo, -(N / n) * exact_subset, atol=1e-8)
    masked = MaskedELBO(estimator="chain").loss(model, None, X)
    assert_close(masked, trace_elbo, atol=1e-8)
    # per_sequence is unscaled, total is scaled
    est = MaskedELBO(estimator="chain").estimate(model, None, X)
    assert est.per_sequence.shape == (n,)
    assert_close(est.per_sequence.sum(), exact_subset, atol=1e-8)
    assert_close(est.total, (N / n) * exact_subset, atol=1e-8)


def test_subsample_size_scales_by_N_over_n():
    X, t = _data()
    n = 8
    record = []

    def model(X):
        _subsampled_ppca(X, t["W"], t["loc"], t["noise_scale"], subsample_size=n, record=record)

    masked = MaskedELBO(estimator="chain").loss(model, None, X)
    idx = record[0]
    assert len(idx) == n and len(set(idx.tolist())) == n
    # the Gaussian backend scores the subsample of the trace it read
    assert all(torch.equal(r, idx) for r in record)
    exact_subset = ppca_log_marginal(X[idx], t["W"], t["loc"], t["noise_scale"]).item()
    assert_close(masked, -(N / n) * exact_subset, atol=1e-8)


def test_subsample_scale_with_enumerated_latent():
    """Exact enumeration backend with a subsampled mixture: -(N/n) * exact subset LML."""
    g = torch.Generator().manual_seed(3)
    C = 3
    X = torch.randn(N, T, generator=g)
    weights = torch.tensor([0.2, 0.3, 0.5])
    locs = torch.randn(C, T, generator=g)
    scale = torch.tensor(0.8)
    idx = torch.tensor([1, 5, 6, 11, 30])

    def model(X):
        with pyro.plate("data", X.shape[0], subsample=idx) as i:
            c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[c], scale).to_event(1), obs=X[i])

    masked = MaskedELBO(estimator="chain").loss(model, None, X)
    exact_subset = gaussian_mixture_log_marginal(X[idx], weights, locs, scale).item()
    assert_close(masked, -(N / len(idx)) * exact_subset, atol=1e-8)


def test_subsample_scale_with_importance_latent():
    """Importance backend: the subsampled model's loss is N/n times the loss of the same
    model run on X[idx] without subsampling, with the same random draws."""
    X, t = _data()
    idx = torch.tensor([2, 4, 8, 16, 32])

    def sub_model(X):
        with pyro.plate("data", X.shape[0], subsample=idx) as i:
            z = pyro.sample("z", dist.Normal(torch.zeros(K), 1.0).to_event(1))
            mean = z @ t["W"].T + t["loc"]
            pyro.sample("x", dist.Normal(mean, t["noise_scale"]).to_event(1), obs=X[i])

    def full_model(X):
        ppca_latent(X, K, t["W"], t["loc"], t["noise_scale"])

    elbo = MaskedELBO(estimator="chain", num_samples=64)
    pyro.set_rng_seed(5)
    sub = elbo.loss(sub_model, None, X)
    pyro.set_rng_seed(5)
    full = elbo.loss(full_model, None, X[idx])
    assert_close(sub, (N / len(idx)) * full, atol=1e-8, rtol=1e-12)

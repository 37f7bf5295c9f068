"""CUDA in, CUDA throughout: every backend scores CUDA data on the GPU and agrees with the
CPU. Skipped without CUDA."""

import pytest
import torch

from pyro_mpt import MaskedELBO, mpt_curve
from pyro_mpt.models import (
    bernoulli_latent_linear,
    gaussian_mixture,
    hmm,
    hmm_log_marginal,
    multivariate_normal,
    ppca_collapsed,
    ppca_latent,
    ppca_log_marginal,
    sample_hmm,
    sample_ppca,
)
from tests.conftest import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _ppca(device):
    g = torch.Generator().manual_seed(0)
    X, truth = sample_ppca(6, 5, 2, 0.5, generator=g)
    return X.to(device), {k: v.to(device) for k, v in truth.items()}


@pytest.mark.parametrize("estimator", ["chain", "stratified", "uniform", "fixed"])
def test_lowrank_gaussian_on_cuda(estimator):
    X, t = _ppca("cuda")
    W = t["W"].clone().requires_grad_()
    est = MaskedELBO(estimator=estimator).estimate(
        lambda X: ppca_collapsed(X, 2, W, t["loc"], t["noise_scale"]), None, X
    )
    assert est.total.device.type == "cuda"
    est.total.backward()
    assert W.grad.device.type == "cuda"
    if estimator == "chain":  # exact: equals the closed form computed on the CPU
        exact = ppca_log_marginal(X.cpu(), t["W"].cpu(), t["loc"].cpu(), t["noise_scale"].cpu())
        assert_close(est.total.item(), exact.item(), atol=1e-8)


def test_shared_masks_on_cuda():
    X, t = _ppca("cuda")
    est = MaskedELBO(estimator="chain", share_masks=True).estimate(
        lambda X: ppca_collapsed(X, 2, t["W"], t["loc"], t["noise_scale"]), None, X
    )
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    assert est.total.device.type == "cuda"
    assert_close(est.total.item(), exact.item(), atol=1e-8)


def test_dense_gaussian_exhaustive_on_cuda():
    X, t = _ppca("cuda")
    cov = t["W"] @ t["W"].T + 0.25 * torch.eye(5, device="cuda")
    curve = mpt_curve(lambda X: multivariate_normal(X, t["loc"], cov), X, exhaustive=True)
    exact = torch.distributions.MultivariateNormal(t["loc"], cov).log_prob(X).sum()
    assert curve.scores.device.type == "cuda"
    assert_close(curve.area.item(), exact.item(), atol=1e-8)


@pytest.mark.parametrize("conditionals", ["importance", "quadrature"])
def test_particle_backends_on_cuda(conditionals):
    X, t = _ppca("cuda")
    W = t["W"].clone().requires_grad_()
    est = MaskedELBO(estimator="chain", conditionals=conditionals, num_samples=64).estimate(
        lambda X: ppca_latent(X, 2, W, t["loc"], t["noise_scale"]), None, X
    )
    assert est.total.device.type == "cuda"
    est.total.backward()
    assert W.grad.device.type == "cuda" and torch.isfinite(W.grad).all()


def test_bernoulli_quadrature_on_cuda():
    X = (torch.rand(4, 6, device="cuda") < 0.5).double()
    est = MaskedELBO(conditionals="quadrature").estimate(
        lambda X: bernoulli_latent_linear(X, 2), None, X
    )
    assert est.total.device.type == "cuda" and torch.isfinite(est.total)


def test_enumerated_mixture_on_cuda():
    X, _ = _ppca("cuda")
    curve = mpt_curve(lambda X: gaussian_mixture(X, 3), X, exhaustive=True)
    assert curve.area.device.type == "cuda"


def test_hmm_elimination_on_cuda():
    g = torch.Generator().manual_seed(0)
    init = torch.tensor([0.5, 0.3, 0.2])
    trans = torch.softmax(torch.randn(3, 3, generator=g), -1)
    emit = torch.softmax(torch.randn(3, 4, generator=g), -1)
    X = sample_hmm(3, 6, init, trans, emit, generator=g)
    init, trans, emit, X = (t.cuda() for t in (init, trans, emit, X))
    est = MaskedELBO(estimator="chain").estimate(lambda X: hmm(X, init, trans, emit), None, X)
    assert est.total.device.type == "cuda"
    assert_close(est.total.item(), hmm_log_marginal(X, init, trans, emit).item(), atol=1e-8)

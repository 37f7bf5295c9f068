"""The exact reference (pyro_mpt.reference.exact) against closed forms, and its errors."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt.models import (
    gaussian_mixture,
    gaussian_mixture_log_marginal,
    hmm,
    hmm_log_marginal,
    multivariate_normal,
    ppca_collapsed,
    ppca_log_marginal,
    sample_hmm,
)
from pyro_mpt.reference import LMLEstimate, log_marginal_likelihood
from tests.conftest import assert_close
from tests.reference_data import latent_model, per_row_exact, ppca_data


def test_exact_collapsed_ppca_equals_closed_form():
    X, t = ppca_data(N=12, T=6)
    est = log_marginal_likelihood(
        lambda X: ppca_collapsed(X, 2, t["W"], t["loc"], t["noise_scale"]), X
    )
    assert isinstance(est, LMLEstimate)
    assert est.method == "exact" and est.stderr == 0.0 and est.trustworthy
    assert est.ess is None and est.khat is None and est.num_samples is None
    assert any("chose 'exact'" in m for m in est.messages)
    assert_close(est.total, ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"]), atol=1e-8)
    assert_close(est.per_sequence, per_row_exact(X, t), atol=1e-8)
    assert_close(est.per_sequence_stderr, torch.zeros(12), atol=0.0)


def test_exact_mvn_equals_log_prob():
    T = 5
    A = torch.randn(T, T)
    cov = A @ A.T + 0.5 * torch.eye(T)
    loc = torch.randn(T)
    X = torch.randn(8, T)
    est = log_marginal_likelihood(multivariate_normal, X, loc, cov, method="exact")
    expected = dist.MultivariateNormal(loc, cov).log_prob(X)
    assert_close(est.per_sequence, expected, atol=1e-8)
    assert_close(est.total, expected.sum(), atol=1e-8)
    assert any("no latent sites" in m for m in est.messages)


def test_exact_gaussian_mixture_by_enumeration():
    C, T = 3, 5
    weights = torch.tensor([0.2, 0.3, 0.5])
    locs = torch.randn(C, T)
    scale = torch.tensor(0.8)
    X = torch.randn(9, T)
    est = log_marginal_likelihood(gaussian_mixture, X, C, weights, locs, scale)
    assert est.method == "exact"
    assert_close(est.total, gaussian_mixture_log_marginal(X, weights, locs, scale), atol=1e-8)
    per_row = torch.stack([gaussian_mixture_log_marginal(x[None], weights, locs, scale) for x in X])
    assert_close(est.per_sequence, per_row, atol=1e-8)


def test_exact_hmm_by_variable_elimination():
    init = torch.tensor([0.6, 0.4])
    A = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    B = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    D = sample_hmm(7, 6, init, A, B, generator=torch.Generator().manual_seed(1))
    est = log_marginal_likelihood(hmm, D, init, A, B, method="exact")
    assert_close(est.total, hmm_log_marginal(D, init, A, B), atol=1e-8)
    per_row = torch.stack([hmm_log_marginal(d[None], init, A, B) for d in D])
    assert_close(est.per_sequence, per_row, atol=1e-8)
    assert any("variable elimination" in m for m in est.messages)


def test_exact_is_differentiable():
    """ "exact" runs with gradients: d log p(X) / d loc of a Gaussian is sum_n (x_n - loc)
    / sigma^2 (here Sigma = I)."""
    loc = torch.zeros(3, requires_grad=True)
    X = torch.randn(4, 3)
    est = log_marginal_likelihood(multivariate_normal, X, loc, torch.eye(3), method="exact")
    (grad,) = torch.autograd.grad(est.total, loc)
    assert_close(grad, (X - loc.detach()).sum(0), atol=1e-10)


def test_exact_rejects_continuous_latents():
    X, t = ppca_data()
    with pytest.raises(
        ValueError,
        match=r"method='exact' cannot integrate .*\['z'\].*"
        r"method='importance'.*method='quadrature'",
    ):
        log_marginal_likelihood(latent_model(t), X, method="exact")


def test_exact_suggests_enumerating_discrete_latents():
    def model(X):
        with pyro.plate("data", X.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).to_event(1), obs=X)

    with pytest.raises(ValueError, match=r"mark them infer=\{'enumerate': 'parallel'\}"):
        log_marginal_likelihood(model, torch.randn(4, 3), method="exact")

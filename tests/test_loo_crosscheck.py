r"""Cross-checks of the curve's ``m = 1`` point against outside references.

A mask of one token conditions on all the others, so
:math:`T\,S(1) = \sum_j \log p(x_j \mid x_{-j})`: the leave-one-token-out (LOO) log predictive
density of the sequence. (:math:`S(1)` itself is the *mean* over tokens, since the masked
score divides by :math:`m`; the sum is :math:`T\,S(1)`, i.e. ``curve.fixed_rate_estimate(1/T)``.)

1. For :math:`x \sim \mathcal N(\mu, \Sigma)` the LOO predictive has a closed form in the
   precision :math:`\Lambda = \Sigma^{-1}`:
   :math:`x_j \mid x_{-j} \sim \mathcal N(x_j - [\Lambda(x-\mu)]_j / \Lambda_{jj},\ 1/\Lambda_{jj})`.
2. ArviZ's PSIS-LOO on exact posterior draws of Bayesian linear regression estimates the same
   :math:`\sum_i \log p(y_i \mid y_{-i})`; it must agree within its own standard error.

With ``exhaustive=True`` every mask is enumerated, so the ``m = 1`` point is exact (no Monte
Carlo error) for ``T <= 16``.
"""

import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import models, mpt_curve
from tests.conftest import assert_close


def closed_form_loo(x, loc, covariance):
    r"""``(N, T)`` :math:`\log p(x_{n,j} \mid x_{n,-j})` for :math:`x_n \sim \mathcal N(\mu, \Sigma)`,
    by the precision identity (no conditioning code shared with pyro_mpt)."""
    precision = torch.linalg.inv(covariance)
    diag = precision.diagonal()
    mean = x - ((x - loc) @ precision) / diag  # precision is symmetric
    return dist.Normal(mean, diag.rsqrt()).log_prob(x)


def _random_covariance(T):
    A = torch.randn(T, T)
    return A @ A.T / T + 0.3 * torch.eye(T)


def test_loo_point_matches_closed_form_dense_gaussian():
    N, T = 3, 7
    loc = torch.randn(T)
    cov = _random_covariance(T)
    X = dist.MultivariateNormal(loc, cov).sample((N,))
    curve = mpt_curve(models.multivariate_normal, X, loc, cov, exhaustive=True)
    expected = closed_form_loo(X, loc, cov)  # (N, T)
    # per sequence: T * S_n(1) = sum_j log p(x_nj | x_n,-j); exhaustive, so exact
    assert_close(T * curve.per_sequence[:, 0], expected.sum(-1), atol=1e-8)
    assert_close(T * curve.scores[0], expected.sum(), atol=1e-8)
    # a fixed rate of 1/T is the same leave-one-out sum
    assert_close(curve.fixed_rate_estimate(1.0 / T), expected.sum(), atol=1e-8)
    assert curve.exhaustive and float(curve.stderr[0]) == 0.0


def test_loo_point_matches_closed_form_low_rank_ppca():
    N, T, K = 4, 8, 2
    X, truth = models.sample_ppca(N, T, K, noise_scale=0.6)
    cov = truth["W"] @ truth["W"].T + truth["noise_scale"] ** 2 * torch.eye(T)
    curve = mpt_curve(models.ppca_collapsed, X, K, exhaustive=True, **truth)
    expected = closed_form_loo(X, truth["loc"], cov)
    assert_close(T * curve.per_sequence[:, 0], expected.sum(-1), atol=1e-8)
    # and the area is still the exact LML (the identity, for context)
    assert_close(curve.area, models.ppca_log_marginal(X, **truth), atol=1e-8)


def _regression_data(N, D, prior_scale, noise_scale):
    features = torch.randn(N, D)
    w = prior_scale * torch.randn(D)
    y = features @ w + noise_scale * torch.randn(N)
    return y, features


def test_loo_point_of_regression_matches_closed_form():
    N, D, alpha, sigma = 10, 2, 1.0, 0.7
    y, features = _regression_data(N, D, alpha, sigma)
    curve = mpt_curve(
        models.bayesian_linear_regression_collapsed, y, features, alpha, sigma, exhaustive=True
    )
    cov = alpha**2 * features @ features.T + sigma**2 * torch.eye(N)
    expected = closed_form_loo(y.unsqueeze(0), torch.zeros(N), cov).sum()
    assert curve.per_sequence.shape == (1, N)  # one sequence whose tokens are the data points
    assert_close(N * curve.scores[0], expected, atol=1e-8)


def test_arviz_psis_loo_agrees_with_loo_point_of_curve():
    """ArviZ's PSIS-LOO on exact conjugate posterior draws estimates the same LOO sum as the
    curve's m = 1 point; they must agree within arviz's reported SE (and, pointwise, within
    the Monte Carlo error of 4000 draws)."""
    az = pytest.importorskip("arviz")
    N, D, alpha, sigma = 12, 2, 1.0, 1.0
    y, features = _regression_data(N, D, alpha, sigma)

    curve = mpt_curve(
        models.bayesian_linear_regression_collapsed, y, features, alpha, sigma, exhaustive=True
    )
    loo_mpt = float(N * curve.scores[0])
    pointwise_mpt = N * curve.per_sequence[0, 0]  # sanity: one sequence
    assert_close(pointwise_mpt, loo_mpt, atol=1e-10)

    # exact posterior w | y ~ N(m, S): S = (I / alpha^2 + Phi^T Phi / sigma^2)^-1
    precision = torch.eye(D) / alpha**2 + features.T @ features / sigma**2
    post_cov = torch.linalg.inv(precision)
    post_mean = post_cov @ features.T @ y / sigma**2
    S = 4000
    w = dist.MultivariateNormal(post_mean, post_cov).sample((S,))  # (S, D)
    log_lik = dist.Normal(w @ features.T, sigma).log_prob(y)  # (S, N)
    idata = az.from_dict(
        posterior={"w": w.numpy()[None]},
        log_likelihood={"y": log_lik.numpy()[None]},
        dims={"w": ["feature"], "y": ["obs"]},
    )
    assert {"posterior", "log_likelihood"} <= set(idata.groups())
    loo = az.loo(idata, pointwise=True)  # warns (-> error in tests) if a k-hat > 0.7
    assert float(loo.pareto_k.max()) < 0.7

    elpd, se = float(loo.elpd_loo), float(loo.se)
    assert abs(elpd - loo_mpt) < se, (elpd, loo_mpt, se)
    # tighter: each point's PSIS estimate is within 0.1 nats of the exact LOO predictive
    # (observed max error ~0.03 nats with 4000 draws and k-hat < 0.7)
    cov = alpha**2 * features @ features.T + sigma**2 * torch.eye(N)
    exact_i = closed_form_loo(y.unsqueeze(0), torch.zeros(N), cov).squeeze(0)
    assert_close(exact_i.sum(), loo_mpt, atol=1e-8)
    assert_close(torch.as_tensor(loo.loo_i.values), exact_i, atol=0.1)
    assert abs(elpd - loo_mpt) < 0.5  # Monte Carlo error of the sum, well inside `se`

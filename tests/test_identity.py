r"""The MPT identity :math:`\log p(x) = \sum_{m=1}^T S(m)` (acceptance criteria 1 and 2).

1. With every mask enumerated (``exhaustive=True``, ``T <= 10``) the curve's area equals the
   exact log marginal likelihood to 1e-8 for every model with exact conditionals: collapsed
   PPCA (low-rank Gaussian), a dense multivariate normal, the Gaussian mixture (enumerated
   assignment) and collapsed Bayesian linear regression (one sequence whose tokens are the
   data points). The curve's per-size scores are checked against a brute-force
   :math:`S(m)` computed here from the dense covariance.
2. The ``"chain"`` estimator is the chain rule, so with exact conditionals every draw is the
   exact LML (zero variance); with prior-draw importance conditionals it telescopes to the
   per-sequence importance estimate of the same particles.

(The HMM is covered by ``tests/test_elimination.py``.)
"""

from itertools import combinations

import pyro
import pytest
import torch
from torch.distributions import MultivariateNormal

from pyro_mpt import MaskedELBO, mpt_curve
from pyro_mpt.engine import MPTOptions, prepare, score
from pyro_mpt.estimators import get_estimator
from pyro_mpt.models import (
    bayesian_linear_regression_collapsed,
    bayesian_linear_regression_log_marginal,
    gaussian_mixture,
    gaussian_mixture_log_marginal,
    multivariate_normal,
    ppca_collapsed,
    ppca_latent,
    ppca_log_marginal,
    sample_ppca,
)
from tests.conftest import assert_close

IDENTITY_ATOL = 1e-8


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ppca(N, T, K, seed=0, noise=0.5):
    X, truth = sample_ppca(N, T, K, noise, generator=_gen(seed))
    return X, truth


def _mvn(N, T, seed=0):
    g = _gen(seed)
    A = torch.randn(T, T, generator=g)
    cov = A @ A.T / T + 0.5 * torch.eye(T)
    loc = torch.randn(T, generator=g)
    X = loc + torch.randn(N, T, generator=g) @ torch.linalg.cholesky(cov).T
    return X, loc, cov


def _mixture(N, T, C=3, seed=0):
    g = _gen(seed)
    weights = torch.softmax(torch.randn(C, generator=g), 0)
    locs = 1.5 * torch.randn(C, T, generator=g)
    scale = torch.tensor(0.8)
    c = torch.multinomial(weights, N, replacement=True, generator=g)
    X = locs[c] + scale * torch.randn(N, T, generator=g)
    return X, weights, locs, scale


def _blr(N, D, seed=0):
    g = _gen(seed)
    features = torch.randn(N, D, generator=g)
    w = torch.randn(D, generator=g)
    y = features @ w + 0.5 * torch.randn(N, generator=g)
    return y, features


# ----------------------------------------------------------------------------------------
# 1. Exhaustive identity
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 5, 10])
@pytest.mark.parametrize("share_masks", [False, True])
def test_exhaustive_area_ppca_collapsed(T, share_masks):
    N, K = 5, 2
    X, truth = _ppca(N, T, K, seed=T)
    curve = mpt_curve(ppca_collapsed, X, K, exhaustive=True, share_masks=share_masks, **truth)
    exact = ppca_log_marginal(X, **truth)
    assert curve.exhaustive and curve.conditionals == "gaussian"
    assert_close(curve.area, exact, atol=IDENTITY_ATOL)
    assert_close(curve.scores.sum(), curve.area, atol=1e-12)
    assert torch.equal(curve.sizes, torch.arange(1, T + 1))
    assert_close(curve.stderr, torch.zeros(T), atol=0.0)
    assert curve.area_stderr == 0.0
    # per sequence too: S_n(m) sums to log p(x_n)
    per_seq_exact = torch.distributions.LowRankMultivariateNormal(
        truth["loc"], truth["W"], (truth["noise_scale"] ** 2).expand(T)
    ).log_prob(X)
    assert curve.per_sequence.shape == (N, T)
    assert_close(curve.per_sequence.sum(-1), per_seq_exact, atol=IDENTITY_ATOL)


@pytest.mark.parametrize("T", [2, 6, 10])
def test_exhaustive_area_dense_mvn(T):
    X, loc, cov = _mvn(4, T, seed=T)
    curve = mpt_curve(multivariate_normal, X, loc, cov, exhaustive=True)
    exact = MultivariateNormal(loc, cov).log_prob(X)
    assert curve.conditionals == "gaussian"
    assert_close(curve.area, exact.sum(), atol=IDENTITY_ATOL)
    assert_close(curve.per_sequence.sum(-1), exact, atol=IDENTITY_ATOL)


@pytest.mark.parametrize("T", [3, 10])
def test_exhaustive_area_gaussian_mixture(T):
    X, weights, locs, scale = _mixture(6, T, seed=T)
    curve = mpt_curve(gaussian_mixture, X, 3, weights, locs, scale, exhaustive=True)
    exact = gaussian_mixture_log_marginal(X, weights, locs, scale)
    assert curve.conditionals == "enumerate"
    assert_close(curve.area, exact, atol=IDENTITY_ATOL)


@pytest.mark.parametrize("N", [4, 10])
def test_exhaustive_area_bayesian_linear_regression_collapsed(N):
    """One sequence whose N tokens are the data points."""
    y, features = _blr(N, 2, seed=N)
    curve = mpt_curve(bayesian_linear_regression_collapsed, y, features, exhaustive=True)
    exact = bayesian_linear_regression_log_marginal(y, features)
    assert curve.per_sequence.shape == (1, N)
    assert_close(curve.area, exact, atol=IDENTITY_ATOL)


def _brute_force_curve(X, loc, cov):
    """``(N, T)``: S_n(m) by enumerating every mask and conditioning the dense Gaussian by
    the textbook formula, with ``torch.linalg.solve``."""
    N, T = X.shape
    out = torch.zeros(N, T, dtype=X.dtype)
    for m in range(1, T + 1):
        masks = list(combinations(range(T), m))
        for M in masks:
            O = [t for t in range(T) if t not in M]
            s = torch.zeros(N, dtype=X.dtype)
            for j in M:
                if O:
                    S_oo = cov[O][:, O]
                    S_jo = cov[j, O]
                    mean = loc[j] + S_jo @ torch.linalg.solve(S_oo, (X[:, O] - loc[O]).T)
                    var = cov[j, j] - S_jo @ torch.linalg.solve(S_oo, S_jo)
                else:
                    mean, var = loc[j].expand(N), cov[j, j]
                s = s + torch.distributions.Normal(mean, var.sqrt()).log_prob(X[:, j])
            out[:, m - 1] += s / m / len(masks)
    return out


def test_curve_scores_match_brute_force_mvn():
    T = 4
    X, loc, cov = _mvn(3, T, seed=11)
    brute = _brute_force_curve(X, loc, cov)
    curve = mpt_curve(multivariate_normal, X, loc, cov, exhaustive=True)
    assert_close(curve.per_sequence, brute, atol=1e-10)
    assert_close(curve.scores, brute.sum(0), atol=1e-10)
    assert_close(brute.sum(), MultivariateNormal(loc, cov).log_prob(X).sum(), atol=1e-10)
    # S(m) is not flat: conditioning on more tokens predicts better here
    assert (curve.scores[:-1] - curve.scores[1:]).abs().max() > 1e-2
    assert_close(curve.mask_rates, torch.arange(1, T + 1) / T, atol=0.0)


def test_exhaustive_masked_elbo_value_and_gradient():
    """``MaskedELBO(estimator="exhaustive")`` is deterministic and equals the LML, and so is
    its gradient (exact conditionals)."""
    N, T, K = 4, 5, 2
    X, truth = _ppca(N, T, K, seed=3)
    W = truth["W"].clone().requires_grad_(True)
    exact = ppca_log_marginal(X, W, truth["loc"], truth["noise_scale"])
    (g_exact,) = torch.autograd.grad(exact, W)
    est = MaskedELBO(estimator="exhaustive").estimate(
        lambda X: ppca_collapsed(X, K, W, truth["loc"], truth["noise_scale"]), None, X
    )
    assert_close(est.total.detach(), exact.detach(), atol=IDENTITY_ATOL)
    (g,) = torch.autograd.grad(est.total, W)
    assert_close(g, g_exact, atol=IDENTITY_ATOL)


# ----------------------------------------------------------------------------------------
# 2. The chain estimator
# ----------------------------------------------------------------------------------------


def test_chain_exact_ppca_collapsed():
    N, T, K = 6, 9, 2
    X, truth = _ppca(N, T, K, seed=5)
    est = MaskedELBO(estimator="chain", num_masks=5).estimate(
        lambda X: ppca_collapsed(X, K, **truth), None, X
    )
    per_seq = torch.distributions.LowRankMultivariateNormal(
        truth["loc"], truth["W"], (truth["noise_scale"] ** 2).expand(T)
    ).log_prob(X)
    assert est.conditionals == "gaussian"
    # every draw (a different random order) is exact: zero variance
    assert_close(est.draws, per_seq.expand(5, N), atol=IDENTITY_ATOL)
    assert_close(est.total, ppca_log_marginal(X, **truth), atol=IDENTITY_ATOL)
    assert est.stderr < 1e-8


def test_chain_exact_dense_mvn():
    N, T = 5, 12  # beyond the exhaustive range: the chain rule needs only T masks
    X, loc, cov = _mvn(N, T, seed=6)
    est = MaskedELBO(estimator="chain", num_masks=4).estimate(
        multivariate_normal, None, X, loc, cov
    )
    exact = MultivariateNormal(loc, cov).log_prob(X)
    assert_close(est.draws, exact.expand(4, N), atol=IDENTITY_ATOL)
    assert_close(est.total, exact.sum(), atol=IDENTITY_ATOL)


def test_chain_exact_gaussian_mixture():
    N, T = 7, 8
    X, weights, locs, scale = _mixture(N, T, seed=7)
    est = MaskedELBO(estimator="chain", num_masks=4).estimate(
        gaussian_mixture, None, X, 3, weights, locs, scale
    )
    comp = torch.distributions.Normal(locs, scale).log_prob(X.unsqueeze(-2)).sum(-1)
    exact = torch.logsumexp(comp + weights.log(), -1)
    assert est.conditionals == "enumerate"
    assert_close(est.draws, exact.expand(4, N), atol=IDENTITY_ATOL)
    assert_close(
        est.total, gaussian_mixture_log_marginal(X, weights, locs, scale), atol=IDENTITY_ATOL
    )


@pytest.mark.parametrize("max_elements", [2**24, 5_000])
def test_chain_importance_telescopes_to_importance_estimate(max_elements):
    """Chain with prior-draw conditionals = sum_n logmeanexp_s sum_t log p(x_{n,t} | z_{s,n}),
    for the very particles of the scorer (also when the rows are split into chunks)."""
    N, T, K, S = 5, 6, 2, 300
    X, truth = _ppca(N, T, K, seed=8)

    def model(X):
        ppca_latent(X, K, **truth)

    layout, scorer, backend = prepare(
        model, (X,), {}, MPTOptions(conditionals="importance", num_samples=S)
    )
    assert backend.name == "importance"
    table = scorer.kernels[0][1].table
    assert table.shape == (S, N, T)
    assert scorer.log_w0.shape == (S, N)
    assert_close(scorer.log_w0, torch.full((S, N), -torch.log(torch.tensor(float(S)))), atol=1e-14)
    expected = torch.logsumexp(scorer.log_w0 + table.sum(-1), 0)  # (N,)
    draws, _ = score(layout, scorer, get_estimator("chain"), 3, max_elements=max_elements)
    assert_close(draws, expected.expand(3, N), atol=IDENTITY_ATOL)
    assert_close(draws[0].sum(), expected.sum(), atol=IDENTITY_ATOL)


@pytest.mark.filterwarnings("ignore:importance conditionals degenerate:UserWarning")
def test_chain_importance_masked_elbo_matches_reseeded_particles():
    """The same through ``MaskedELBO``: reseeding reproduces the scorer's particles."""
    N, T, K, S = 4, 5, 2, 200
    X, truth = _ppca(N, T, K, seed=9)

    def model(X):
        ppca_latent(X, K, **truth)

    pyro.set_rng_seed(123)
    _, scorer, _ = prepare(model, (X,), {}, MPTOptions(conditionals="importance", num_samples=S))
    table = scorer.kernels[0][1].table
    expected = torch.logsumexp(scorer.log_w0 + table.sum(-1), 0).sum()
    pyro.set_rng_seed(123)
    est = MaskedELBO(estimator="chain", conditionals="importance", num_samples=S).estimate(
        model, None, X
    )
    # every chain draw is the importance estimate; ``total`` also subtracts the particles'
    # jackknife bias estimate (pyro_mpt.particle_error), reported as ``particle_bias``
    assert_close(est.draws.mean(0).sum(), expected, atol=IDENTITY_ATOL)
    assert_close(est.total + est.particle_bias, expected, atol=IDENTITY_ATOL)

r"""The standard error of the default (affine) stratified masks rests on independent draws
(issue 14's calibration re-measured under ``masks="auto"``; docs/reliability.rst).

Affine masks of one draw share a random order, so they are not independent of each other;
the reported variance :math:`\sum_n \widehat{\mathrm{Var}}(d_n)/K` needs only the ``K``
draws (and the sequences) to be independent. Here the variance of ONE draw is computed
exactly, without pyro_mpt, from dense-Gaussian conditionals and an enumeration of the
orders :math:`\rho` and maps :math:`(a, c)`: given :math:`\rho` the maps of the sizes are
independent, so

.. math:: \mathrm{Var}(d) = \mathbb E_\rho\Big[\sum_m \mathrm{Var}(s(M_m) \mid \rho)\Big]
    + \mathrm{Var}_\rho\Big(\sum_m \mathbb E[s(M_m) \mid \rho]\Big),

and the package's draws are checked against it (their spread is what the standard error is
made of) and against independence between draws.
"""

import itertools
import math

import pytest
import torch

from pyro_mpt import MaskedELBO
from pyro_mpt.estimators import StratifiedEstimator
from tests import calibration_cases as cases


def _exact_draw_variance(X, loc, cov, masks):
    """``(N,)`` the exact variance of one stratified draw per sequence for ``masks`` in
    ``"affine"``, ``"nested"``, ``"independent"`` (the module docstring's decomposition)."""
    T = X.shape[-1]
    s = cases.subset_scores(X, loc, cov)
    if masks == "independent":
        by_size = [torch.stack([v for M, v in s.items() if len(M) == m]) for m in range(1, T)]
        return sum(v.var(0, unbiased=False) for v in by_size)
    units = [a for a in range(1, T + 1) if math.gcd(a, T) == 1]
    cond_mean, cond_var = [], []
    for rho in itertools.permutations(range(T)):  # rho[t]: the position of token t
        if masks == "nested":  # the last m of the order: no randomness given rho
            rows = [s[tuple(t for t in range(T) if rho[t] >= T - m)] for m in range(1, T + 1)]
            cond_mean.append(sum(rows))
            cond_var.append(torch.zeros_like(rows[0]))
            continue
        mean = var = 0.0
        for m in range(1, T + 1):
            maps = itertools.product(units, range(T))
            v = torch.stack(
                [s[tuple(t for t in range(T) if (a * rho[t] + c) % T < m)] for a, c in maps]
            )
            mean, var = mean + v.mean(0), var + v.var(0, unbiased=False)
        cond_mean.append(mean)
        cond_var.append(var)
    return torch.stack(cond_var).mean(0) + torch.stack(cond_mean).var(0, unbiased=False)


def _data(N, T):
    X, p, _ = cases._ppca_data(N=N, T=T, K=2, noise=0.5, seed=3)
    cov = p["W"] @ p["W"].T + p["noise"] ** 2 * torch.eye(T, dtype=X.dtype)
    return X, p, cov


def test_affine_draws_have_the_exact_variance_and_are_independent():
    r"""4000 default-mask draws of 4 sequences (T = 6, where affine and independent masks
    differ): each sequence's sample variance of
    the draws within 4 standard errors of the exact affine variance (the s.e. of a sample
    variance, :math:`\sqrt{(\hat\mu_4 - \hat\sigma^4)/K}`), which the nested masks'
    exact variance is not (so the check can tell them apart); the reported ``stderr`` is
    that spread over ``K``; successive draws uncorrelated (lag-1 correlation within
    4 / sqrt(K) of 0)."""
    N, T, K = 4, 6, 4000
    X, p, cov = _data(N, T)
    exact = _exact_draw_variance(X, p["loc"], cov, "affine")
    nested = _exact_draw_variance(X, p["loc"], cov, "nested")
    est = MaskedELBO(num_masks=K).estimate(cases.ppca_collapsed, None, X, *p.values())
    draws = est.draws.detach()
    centred = draws - draws.mean(0)
    var = centred.pow(2).mean(0)
    se = ((centred.pow(4).mean(0) - var**2) / K).sqrt()
    assert ((var - exact).abs() <= 4 * se).all(), (var, exact, se)
    assert ((nested - exact).abs() > 8 * se).all(), (nested, exact, se)
    assert math.isclose(est.stderr**2, float(draws.var(0).sum()) / K, rel_tol=1e-10)
    lag1 = (centred[1:] * centred[:-1]).mean(0) / var
    assert (lag1.abs() <= 4 / math.sqrt(K)).all(), lag1


@pytest.mark.parametrize("T", [4, 5])
def test_affine_masks_at_four_and_five_tokens_are_independent_masks(T):
    r"""At T = 4 and 5 the affine masks of a draw have the joint law of independent masks,
    so the exact variance of a draw is the independent masks' (to 1e-12), as in the
    importance-conditionals calibration setting (T = 4): the affine maps of
    :math:`\mathbb Z_T` carry any token, or any pair of tokens for prime T, to each one
    equally often, so the masks of sizes 1, 2, T - 2 and T - 1 are uniform whatever the
    order, and the size-T mask is every token. At T = 6 they differ (the test below)."""
    X, p, cov = _data(4, T)
    affine = _exact_draw_variance(X, p["loc"], cov, "affine")
    independent = _exact_draw_variance(X, p["loc"], cov, "independent")
    assert torch.allclose(affine, independent, rtol=1e-12, atol=0)
    assert StratifiedEstimator().resolved_masks == "affine"


def test_affine_masks_at_six_tokens_are_not_independent_masks():
    """At T = 6 (units 1 and 5 only) the exact variances differ by more than 1% for some
    sequence (measured: 0.1-9%, larger for affine), which the standard error, made from
    independent draws, follows (the test above)."""
    X, p, cov = _data(4, 6)
    affine = _exact_draw_variance(X, p["loc"], cov, "affine")
    independent = _exact_draw_variance(X, p["loc"], cov, "independent")
    assert (((affine - independent) / independent).abs() > 0.01).any(), (affine, independent)


def test_independent_draw_law_is_unbiased_and_matches_the_exact_variance():
    """The enumerated law of one independent-mask draw (``calibration_cases``, used on the
    Reliability page to simulate the interval's coverage) has mean :math:`\\log p(x_n)`
    (the MPT identity; the dense Gaussian's log-density, to 1e-10) and the independent
    masks' exact variance (to 1e-10)."""
    X, p, cov = _data(3, 4)
    values = cases.independent_draw_values(X, p["loc"], cov)
    assert values.shape == (4 * 6 * 4 * 1, 3)
    exact = torch.distributions.MultivariateNormal(p["loc"], cov).log_prob(X)
    assert torch.allclose(values.mean(0), exact, rtol=0, atol=1e-10)
    variance = _exact_draw_variance(X, p["loc"], cov, "independent")
    assert torch.allclose(values.var(0, unbiased=False), variance, rtol=0, atol=1e-10)
    cover, _, _ = cases.simulated_coverage(values, float(exact.sum()), K=8, reps=2000)
    assert 0.85 <= cover <= 1.0  # 2000 reps: the t interval near its level

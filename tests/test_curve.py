r"""Tests of :mod:`pyro_mpt.curve`: :meth:`MPTCurve.from_bins`'s statistics against a direct
computation, and :func:`mpt_curve` against the exact LML and its options."""

import math

import numpy as np
import pytest
import torch

from pyro_mpt import MaskedELBO, MPTCurve, mpt_curve
from pyro_mpt.estimators import FixedRateEstimator
from pyro_mpt.mlm import MLMCurve
from pyro_mpt.models import ppca_collapsed, ppca_latent, ppca_log_marginal, sample_ppca
from tests.conftest import assert_close

N, T, K = 6, 4, 2
NUM_SE = 4.0


def _bins(K_draws=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    bins = torch.randn(K_draws, N, T + 1, generator=g, dtype=torch.float64)
    bins[..., 0] = 0.0
    return bins, bins.sum(-1)


def test_from_bins_statistics_against_a_direct_computation():
    bins, draws = _bins()
    scale = torch.linspace(0.5, 2.0, N, dtype=torch.float64)
    curve = MPTCurve.from_bins(bins, draws, conditionals="gaussian", scale=scale)
    b, d, c = bins[..., 1:].numpy(), draws.numpy(), scale.numpy()
    Kd = b.shape[0]
    scores = (c[:, None] * b.mean(0)).sum(0)
    np.testing.assert_allclose(curve.scores.numpy(), scores, atol=1e-12)
    np.testing.assert_allclose(curve.per_sequence.numpy(), b.mean(0), atol=1e-12)
    assert float(curve.area) == pytest.approx(scores.sum(), abs=1e-12)
    stderr = np.sqrt((c[:, None] ** 2 * b.var(0, ddof=1)).sum(0) / Kd)
    np.testing.assert_allclose(curve.stderr.numpy(), stderr, atol=1e-12)
    area_se = math.sqrt((c**2 * d.var(0, ddof=1)).sum() / Kd)
    assert curve.area_stderr == pytest.approx(area_se, abs=1e-12)
    assert curve.sizes.tolist() == list(range(1, T + 1))
    assert curve.num_tokens == T and not curve.exhaustive


def test_from_bins_with_shared_masks_uses_the_totals_spread():
    bins, draws = _bins(4, seed=1)
    scale = torch.full((N,), 2.0, dtype=torch.float64)
    curve = MPTCurve.from_bins(bins, draws, conditionals="x", scale=scale, share_masks=True)
    totals = (2.0 * bins[..., 1:]).sum(1).numpy()  # (K, T)
    np.testing.assert_allclose(curve.stderr.numpy(), np.sqrt(totals.var(0, ddof=1) / 4))
    area_se = math.sqrt((2.0 * draws.numpy()).sum(-1).var(ddof=1) / 4)
    assert curve.area_stderr == pytest.approx(area_se, abs=1e-12)


def test_from_bins_exhaustive_one_draw_and_unscaled():
    bins, draws = _bins(1, seed=2)
    exact = MPTCurve.from_bins(bins, draws, conditionals="x", exhaustive=True)
    assert exact.area_stderr == 0.0 and bool((exact.stderr == 0).all())
    assert float(exact.area) == pytest.approx(float(draws.sum()), abs=1e-12)
    one = MPTCurve.from_bins(bins, draws, conditionals="x")
    assert math.isnan(one.area_stderr) and bool(one.stderr.isnan().all())


def test_from_bins_passes_subclass_fields():
    bins, draws = _bins()
    lengths = torch.full((N,), T)
    curve = MLMCurve.from_bins(bins, draws, conditionals="mlm", lengths=lengths)
    assert isinstance(curve, MLMCurve) and torch.equal(curve.lengths, lengths)
    # all sequences of length T: the fixed-rate estimate is T S(round(rT))
    m = curve.mask_size(0.5)
    assert float(curve.fixed_rate_estimate(0.5)) == pytest.approx(T * float(curve.scores[m - 1]))


def _ppca():
    X, truth = sample_ppca(N, T, K, 0.5, generator=torch.Generator().manual_seed(3))
    return X, truth


def test_exhaustive_curve_area_is_the_exact_lml():
    X, truth = _ppca()
    curve = mpt_curve(
        ppca_collapsed, X, K, truth["W"], truth["loc"], truth["noise_scale"], exhaustive=True
    )
    exact = ppca_log_marginal(X, truth["W"], truth["loc"], truth["noise_scale"])
    assert_close(curve.area, exact, atol=1e-9)
    assert curve.exhaustive and curve.area_stderr == 0.0 and curve.conditionals == "gaussian"
    assert_close(curve.fixed_rate_bias(0.5), curve.fixed_rate_estimate(0.5) - exact, atol=1e-9)


def test_curve_num_particles_is_a_deprecated_alias_of_num_samples():
    X, truth = _ppca()
    args = (X[:2], 1, truth["W"][:, :1], truth["loc"], 0.5)
    torch.manual_seed(0)
    new = mpt_curve(ppca_latent, *args, conditionals="importance", num_samples=32)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="mpt_curve: num_particles= is deprecated"):
        old = mpt_curve(ppca_latent, *args, conditionals="importance", num_particles=32)
    assert_close(old.scores, new.scores, atol=0.0)
    with pytest.raises(TypeError, match="pass num_samples= only"):
        mpt_curve(ppca_latent, *args, num_particles=32, num_samples=16)


def test_curve_options_are_checked_first():
    X, _ = _ppca()
    with pytest.raises(TypeError, match="exhaustive must be True or False, got 'yes'"):
        mpt_curve(ppca_collapsed, X, K, exhaustive="yes")
    with pytest.raises(TypeError, match="share_masks must be True or False, got 'no'"):
        mpt_curve(ppca_collapsed, X, K, share_masks="no")
    curve = mpt_curve(ppca_collapsed, X, K, num_masks=np.int64(2))
    assert curve.scores.shape == (T,) and math.isfinite(curve.area_stderr)


def test_fixed_rate_mask_size_matches_curve():
    """``MPTCurve.mask_size`` and ``FixedRateEstimator.mask_size`` use one rule (ties
    included: Python's round-half-to-even, e.g. rate 0.25 of T = 10 gives m = 2)."""
    X, truth = sample_ppca(2, 12, 1, generator=torch.Generator().manual_seed(0))
    curve = mpt_curve(ppca_collapsed, X, 1, num_masks=1, **truth)
    for rate in (0.05, 0.1, 0.125, 0.15, 0.25, 0.375, 0.5, 0.625, 0.8, 0.95, 1.0):
        assert curve.mask_size(rate) == FixedRateEstimator(rate).mask_size(12), rate


# ----------------------------------------------------------------------------------------
# The fixed rate is biased (criterion 6)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.15, 0.5])
def test_fixed_rate_bias_is_real_and_monte_carlo_matches_curve(rate):
    N, T, K, num = 4, 8, 2, 400
    X, truth = sample_ppca(N, T, K, 0.5, generator=torch.Generator().manual_seed(2))

    def model(X):
        ppca_collapsed(X, K, **truth)

    exact = ppca_log_marginal(X, **truth)
    curve = mpt_curve(model, X, exhaustive=True)
    assert_close(curve.area, exact, atol=1e-8)
    m = curve.mask_size(rate)
    assert_close(curve.fixed_rate_estimate(rate), T * curve.scores[m - 1], atol=1e-12)
    bias = curve.fixed_rate_bias(rate)
    assert_close(bias, curve.fixed_rate_estimate(rate) - exact, atol=1e-8)
    # conditioning on T - m of T tokens scores far above the LML: |bias| > 1 nat here
    assert abs(float(bias)) > 1.0, float(bias)

    est = MaskedELBO(estimator="fixed", mask_rate=rate, num_masks=num).estimate(model, None, X)
    assert not est.unbiased and est.estimator == "fixed"
    totals = est.draws.sum(-1)
    se = float(totals.std()) / math.sqrt(num)
    assert se > 1e-3
    mc = float(totals.mean())
    assert abs(mc - float(curve.fixed_rate_estimate(rate))) < NUM_SE * se, (
        mc,
        float(curve.fixed_rate_estimate(rate)),
        se,
    )
    # and the Monte Carlo estimate resolves the bias: it is not the LML
    assert abs(mc - float(exact)) > NUM_SE * se


def test_fixed_rate_one_scores_independent_marginals():
    """At rate 1 every token is masked and nothing is observed: T S(T) = sum_j log p(x_j),
    the sum of the tokens' marginals, and the fixed estimator has zero variance."""
    N, T, K = 3, 5, 2
    X, truth = sample_ppca(N, T, K, 0.5, generator=torch.Generator().manual_seed(3))

    def model(X):
        ppca_collapsed(X, K, **truth)

    var = (truth["W"] ** 2).sum(-1) + truth["noise_scale"] ** 2
    marginals = torch.distributions.Normal(truth["loc"], var.sqrt()).log_prob(X).sum()
    curve = mpt_curve(model, X, exhaustive=True)
    assert_close(curve.fixed_rate_estimate(1.0), marginals, atol=1e-10)
    est = MaskedELBO(estimator="fixed", mask_rate=1.0, num_masks=3).estimate(model, None, X)
    assert_close(est.draws, est.draws[:1].expand(3, -1), atol=0.0)
    assert_close(est.total, marginals, atol=1e-10)


def test_curve_masks_option_is_checked_first():
    X, _ = _ppca()
    with pytest.raises(ValueError, match="unknown masks 'sorted'"):
        mpt_curve(ppca_collapsed, X, K, masks="sorted")
    with pytest.raises(ValueError, match="masks='nested' does not apply to exhaustive=True"):
        mpt_curve(ppca_collapsed, X, K, exhaustive=True, masks="nested")

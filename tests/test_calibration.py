r"""Calibration (issue 14): the reported 95% intervals cover the exact :math:`\log p(X)` at
their stated rate, the particle error of importance conditionals is counted, and the
reference's data-level trust flag tracks its real error.

Coverage is measured over seeds of the estimator (masks, particles) on fixed data with a
dense-Gaussian exact value (:mod:`tests.calibration_cases`). The slow tests use 200 seeds
and the band [0.90, 0.99]; the fast ones 60 seeds and [0.85, 1.0]: at a true 95% the
binomial s.e. over 60 seeds is 0.028, so 0.85 is 3.5 s.e. below.
"""

import math

import pyro
import pytest
import torch

from pyro_mpt import MaskedELBO, log_marginal_likelihood, mpt_curve
from pyro_mpt.engine import MPTOptions, prepare
from pyro_mpt.intervals import satterthwaite_dof, t_interval, t_quantile, verdict
from pyro_mpt.particle_error import conditional_ess
from tests import calibration_cases as cases
from tests.conftest import assert_close

SETTINGS = cases.settings()
#: importance conditionals far from the prior (degenerate weights): the bias range applies
HARD = cases.hard_settings()


# ----------------------------------------------------------------------------------------
# The interval arithmetic, against closed forms
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99])
def test_t_quantile_closed_forms(level):
    q = 0.5 * (1 + level)
    # dof 1 is Cauchy: tan(pi (q - 1/2)); dof 2: (2q - 1) / sqrt(2 q (1 - q))
    assert t_quantile(level, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-9)
    assert t_quantile(level, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)))
    normal = math.sqrt(2) * torch.special.erfinv(torch.tensor(level, dtype=torch.float64))
    assert t_quantile(level, math.inf) == pytest.approx(float(normal), rel=1e-9)


def test_t_interval_and_verdict():
    low, high = t_interval(1.0, 0.5, 2, 0.95)
    half = 0.5 * 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert (low, high) == pytest.approx((1.0 - half, 1.0 + half))
    assert t_interval(3.0, 0.0, math.nan) == (3.0, 3.0)
    assert verdict(2.0, 1.0, math.inf) == "check" and verdict(1.9, 1.0, math.inf) == "ok"
    assert verdict(2.0, 1.0, 3) == "ok"  # t_{0.975, 3} = 3.18
    assert verdict(1.0, math.nan, 3) == "n/a"


def test_satterthwaite_dof_closed_forms():
    # n equal variances on d dof each: n d; one term: its own dof
    assert satterthwaite_dof([2.0] * 5, 3.0) == pytest.approx(15.0)
    assert satterthwaite_dof([1.0, 0.0], [4.0, 1.0]) == pytest.approx(4.0)
    assert satterthwaite_dof([1.0, 1.0], [math.inf, math.inf]) == math.inf
    assert math.isnan(satterthwaite_dof([0.0, 0.0], 3.0))


@pytest.mark.parametrize("level", [0.0, 1.0, -0.5, 95])
def test_bad_level_raises(level):
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\), got .*level=0.95"):
        t_quantile(level, 3)


# ----------------------------------------------------------------------------------------
# Degrees of freedom carried by each estimate
# ----------------------------------------------------------------------------------------


def test_shared_masks_and_one_sequence_use_the_draws_dof():
    X, params, _ = cases._ppca_data()
    args = (X, *params.values())
    est = MaskedELBO(num_masks=4, share_masks=True).estimate(cases.ppca_collapsed, None, *args)
    assert est.dof == 3 and est.shared_masks
    y, features, _ = cases._regression_data()
    one = MaskedELBO(num_masks=2, token_plate="data", conditionals="quadrature").estimate(
        cases.regression, None, y, features
    )
    assert one.dof == 1
    curve = mpt_curve(cases.ppca_collapsed, *args, num_masks=3, share_masks=True)
    assert curve.area_dof == 2 and curve.ci()[0] < float(curve.area) < curve.ci()[1]


def test_per_sequence_dof_is_satterthwaite_over_sequences():
    X, params, _ = cases._ppca_data()
    est = MaskedELBO(num_masks=4).estimate(cases.ppca_collapsed, None, X, *params.values())
    v = est.draws.detach().var(0) / 4
    expected = float(v.sum() ** 2 / (v**2 / 3).sum())
    assert est.dof == pytest.approx(expected)
    assert 3 < est.dof <= 3 * X.shape[0]


def test_chain_with_particles_never_reports_zero_stderr():
    X, params, _ = cases._ppca_data(N=10, T=4, K=1, noise=1.0)
    pyro.set_rng_seed(0)
    est = MaskedELBO(
        estimator="chain", num_masks=3, conditionals="importance", num_samples=256
    ).estimate(cases.ppca_latent, None, X, *params.values())
    # every draw of the chain is the same importance estimate: the masks' spread is 0
    assert float(est.draws.detach().var(0).sum()) == 0.0
    assert est.stderr > 0 and est.stderr == est.particle_stderr and est.dof == 7


def test_one_particle_gives_no_stderr():
    X, params, _ = cases._ppca_data(N=4, T=4, K=1, noise=1.0)
    with pytest.warns(UserWarning, match="importance conditionals degenerate"):
        est = MaskedELBO(
            estimator="chain", num_masks=3, conditionals="importance", num_samples=1
        ).estimate(cases.ppca_latent, None, X, *params.values())
    assert math.isnan(est.stderr)


def test_conditional_ess_against_brute_force():
    X, params, _ = cases._ppca_data(N=5, T=4, K=1, noise=1.0)
    opts = MPTOptions(conditionals="importance", num_samples=64)
    layout, scorer, _ = prepare(cases.ppca_latent, (X, *params.values()), {}, opts)
    # weights given every token: w0 * prod_t p(x_t | z_s), from the token table
    log_w = scorer.log_w0 + scorer.kernels[0][1].table.sum(-1)
    w = torch.softmax(log_w, 0)
    assert_close(conditional_ess(scorer, layout), 1 / (w**2).sum(0), atol=0, rtol=1e-10)


def test_degenerate_conditionals_warn():
    X, params, _ = cases._ppca_data(N=10, T=6, K=2, noise=0.05)
    with pytest.warns(UserWarning, match=r"degenerate for \d+ of 10 sequences.*num_samples"):
        MaskedELBO(conditionals="importance", num_samples=64).estimate(
            cases.ppca_latent, None, X, *params.values()
        )


# ----------------------------------------------------------------------------------------
# The reference's trust flags
# ----------------------------------------------------------------------------------------


def test_one_particle_reference_is_not_trustworthy():
    X, params, _ = cases._ppca_data(N=10, T=6, K=2, noise=0.5)
    with pytest.warns(UserWarning, match="num_samples=1 is below"):
        ref = log_marginal_likelihood(
            cases.ppca_latent, X, **params, method="importance", num_samples=1, progress=False
        )
    assert not ref.trustworthy


def test_exact_reference_interval_is_its_point():
    X, params, exact = cases._ppca_data()
    ref = log_marginal_likelihood(cases.ppca_collapsed, X, **params, progress=False)
    assert ref.ci() == (float(ref.total), float(ref.total))
    assert float(ref.total) == pytest.approx(exact, rel=1e-10)


def test_trust_flag_false_alarms_low_and_fires_when_hard():
    # accurate regime: 40 sequences, prior proposal fine (measured: 0/200 flagged)
    accurate, flagged, flagged_any, false_alarm = cases.trust_rates(40, 1.0, 1000, range(20))
    assert accurate >= 0.85 and false_alarm <= 0.1
    assert flagged_any > 0.5  # the old any-sequence rule: most accurate runs flagged
    # hard regime: the posterior far from the prior, every run flagged
    _, flagged, _, _ = cases.trust_rates(40, 0.1, 1000, range(5))
    assert flagged == 1.0


# ----------------------------------------------------------------------------------------
# Coverage of the reported 95% interval
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SETTINGS) + list(HARD))
def test_coverage_fast(name):
    cover, _, _ = cases.coverage({**SETTINGS, **HARD}[name], range(60))
    assert 0.85 <= cover <= 1.0, (name, cover)


#: settings whose coverage lies near the band's edge get more seeds: the easy stratified
#: one covers about 0.93 (K=8 draws of a skewed law, docs/reliability.rst "The default
#: (affine) masks"), 2 binomial s.e. of a 200-seed coverage above 0.90; 1000 seeds: s.e. 0.008
SLOW_SEEDS = {"importance conditionals, stratified, K=8": range(1000, 2000)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS) + list(HARD))
def test_coverage_slow(name):
    seeds = SLOW_SEEDS.get(name, range(1000, 1200))
    cover, _, _ = cases.coverage({**SETTINGS, **HARD}[name], seeds)
    assert 0.90 <= cover <= 0.99, (name, cover)


def test_hard_curve_area_coverage_fast():
    # the area corrected as a whole, as the stratified estimate (K=4: 4 masks per size)
    cover, _, _ = cases.coverage(cases.hard_curve_setting(num_masks=4), range(30))
    assert 0.8 <= cover <= 1.0, cover


@pytest.mark.parametrize(
    "name", ["importance conditionals, chain", "importance conditionals, stratified, K=8"]
)
def test_mpt_reliable_flag_false_alarms_low(name):
    # easy settings: the estimate's interval covers and reliable stays True (measured
    # 0/200 flagged over seeds 1000-1199); the hard ones are always flagged
    accurate, flagged, false_alarms = cases.mpt_trust_rates(SETTINGS[name], range(30))
    assert accurate >= 0.8 and false_alarms <= 0.1 and flagged <= 0.1
    _, flagged, _ = cases.mpt_trust_rates(HARD["hard, chain"], range(10))
    assert flagged == 1.0


def test_exhaustive_curve_with_particles_counts_their_error():
    X, params, exact = cases._ppca_data(N=10, T=4, K=1, noise=1.0)
    pyro.set_rng_seed(0)
    curve = mpt_curve(
        cases.ppca_latent,
        X,
        *params.values(),
        exhaustive=True,
        conditionals="importance",
        num_samples=512,
    )
    # every mask enumerated: the masks add no error, the 512 prior draws do
    assert curve.area_stderr > 0 and curve.area_dof == pytest.approx(7)
    low, high = curve.ci()
    assert low < exact < high

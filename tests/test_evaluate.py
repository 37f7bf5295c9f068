"""``evaluate`` and ``compare`` (pyro_mpt.evaluator): every number of the report is the
number of the separate call from the same seed; every option is checked before the model
runs; the old keyword names still work, with a DeprecationWarning."""

import dataclasses
import math

import pyro
import pytest
import torch

import pyro_mpt.evaluator as evaluator_module
from pyro_mpt import MaskedELBO, models, mpt_curve
from pyro_mpt.evaluator import compare, evaluate
from pyro_mpt.reference import log_marginal_likelihood
from pyro_mpt.report import EvaluationReport
from tests import report_cases
from tests.conftest import assert_close
from tests.report_cases import K, N, T


def _check_matches_separate_calls(
    report,
    model,
    args,
    kwargs,
    *,
    seed,
    reference,
    estimators,
    num_masks,
    curve_masks,
    reference_samples,
    mpt_samples,
    token_plate=None,
):
    """Replays evaluate()'s calls in its documented order from the same seed."""
    pyro.set_rng_seed(seed)
    ref = log_marginal_likelihood(
        model,
        *args,
        method=reference,
        num_samples=reference_samples,
        guide=None,
        token_plate=token_plate,
        progress=False,
        **kwargs,
    )
    with torch.no_grad():
        ests = {
            name: MaskedELBO(
                estimator=name,
                num_masks=num_masks,
                num_samples=mpt_samples,
                token_plate=token_plate,
            ).estimate(model, None, *args, **kwargs)
            for name in estimators
        }
    curve = mpt_curve(
        model,
        *args,
        num_masks=curve_masks,
        num_samples=mpt_samples,
        token_plate=token_plate,
        **kwargs,
    )
    # the reference
    assert report.reference.method == ref.method
    assert_close(report.reference.total, ref.total, atol=1e-10)
    assert_close(report.reference.per_sequence, ref.per_sequence, atol=1e-10)
    ref_value, ref_se = float(ref.total), float(ref.stderr)
    # every estimator row
    assert list(report.estimators) == list(estimators)
    for name, e in ests.items():
        row = report.estimators[name]
        assert_close(row.value, e.total, atol=1e-10)
        assert_close(row.estimate.draws, e.draws, atol=1e-10)
        if math.isnan(e.stderr):
            assert math.isnan(row.stderr)
        else:
            assert_close(row.stderr, e.stderr, atol=1e-10)
        assert_close(row.difference, float(e.total) - ref_value, atol=1e-10)
        se = math.hypot(e.stderr, ref_se)
        assert_close(row.difference_stderr, se, atol=1e-10)
        if se > 1e-6:  # a Monte Carlo error: the z-score is the plain ratio
            assert_close(row.z_score, (float(e.total) - ref_value) / se, atol=0, rtol=1e-12)
        elif not se > 1e-9:  # no error above rounding on either side: no z-score
            assert math.isnan(row.z_score)
    # the curve and every fixed-rate row: curve.fixed_rate_estimate(r) - reference
    assert_close(report.curve.scores, curve.scores, atol=1e-10)
    assert_close(report.curve.stderr, curve.stderr, atol=1e-10)
    assert_close(report.curve.area, curve.area, atol=1e-10)
    assert [b.rate for b in report.fixed_rates] == [0.15, 0.5, 0.8]
    for b in report.fixed_rates:
        m = curve.mask_size(b.rate)
        assert b.mask_size == m
        assert_close(b.estimate, curve.fixed_rate_estimate(b.rate), atol=1e-10)
        assert_close(b.bias, curve.fixed_rate_estimate(b.rate) - ref.total, atol=1e-10)
        assert_close(b.stderr, curve.num_tokens * curve.stderr[m - 1], atol=1e-10)
        assert_close(b.bias_stderr, math.hypot(b.stderr, ref_se), atol=1e-10)
    return ref, ests, curve


def test_report_holds_the_numbers_exact_reference(ppca_report):
    report, X, truth = ppca_report
    assert isinstance(report, EvaluationReport)
    ref, ests, curve = _check_matches_separate_calls(
        report,
        models.ppca_collapsed,
        (X, K),
        truth,
        seed=1,
        reference="auto",
        estimators=("stratified", "uniform", "chain"),
        num_masks=4,
        curve_masks=3,
        reference_samples=4096,
        mpt_samples=256,
    )
    # "auto" picks exact for a Gaussian without latents: the closed form, with s.e. 0
    assert report.reference.method == "exact"
    assert_close(report.reference.total, models.ppca_log_marginal(X, **truth), atol=1e-8)
    assert report.reference.stderr == 0.0
    # chain rule with exact conditionals: zero variance, equal to the LML; exact against
    # exact has no sampling error, so no z-score (rounding over rounding means nothing)
    chain = report.estimators["chain"]
    assert_close(chain.value, report.reference.total, atol=1e-8)
    assert chain.stderr < 1e-8 and math.isnan(chain.z_score)
    # unbiased estimators within 5 s.e. of the exact LML
    for name in ("stratified", "uniform"):
        row = report.estimators[name]
        assert abs(row.z_score) < 5, (name, row)
    assert report.device == "cpu"
    assert set(report.timings) == {"reference", "stratified", "uniform", "chain", "curve", "total"}
    assert all(t >= 0 for t in report.timings.values())
    assert (
        report.timings["total"] >= sum(v for k, v in report.timings.items() if k != "total") - 1e-6
    )
    assert (report.num_sequences, report.num_tokens) == (N, T)
    assert report.settings["reference_samples"] == 4096 and report.settings["mpt_samples"] == 256
    assert report.settings["estimators"] == ["stratified", "uniform", "chain"]


@pytest.mark.filterwarnings("ignore:importance conditionals degenerate:UserWarning")
def test_report_holds_the_numbers_importance_reference():
    """Latent-variable PPCA: an importance reference, MPT with "auto" conditionals, all
    reproduced by the separate calls from the same seed."""
    X, truth = models.sample_ppca(8, 4, K, noise_scale=1.0)
    pyro.set_rng_seed(3)
    report = evaluate(
        models.ppca_latent,
        X,
        K,
        reference="importance",  # "auto" integrates latent-z PPCA exactly now
        estimators=("stratified", "chain"),
        num_masks=3,
        curve_masks=2,
        reference_samples=2000,
        mpt_samples=64,
        progress=False,
        **truth,
    )
    _check_matches_separate_calls(
        report,
        models.ppca_latent,
        (X, K),
        truth,
        seed=3,
        reference="importance",
        estimators=("stratified", "chain"),
        num_masks=3,
        curve_masks=2,
        reference_samples=2000,
        mpt_samples=64,
    )
    ref = report.reference
    assert ref.method == "importance"
    assert ref.log_weights is not None and ref.log_weights.shape == (2000, 8)
    exact = float(models.ppca_log_marginal(X, **truth))
    # importance with 2000 prior draws on 4 tokens: within 4 of its s.e. (+ a small bias)
    assert abs(float(ref.total) - exact) < 4 * ref.stderr + 0.05


def test_a_flagged_reference_is_kept_and_reported(monkeypatch, ppca_data):
    """Whatever the reason a reference is flagged, the report keeps it and says so."""
    real = evaluator_module.log_marginal_likelihood

    def flagged(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), trustworthy=False)

    monkeypatch.setattr(evaluator_module, "log_marginal_likelihood", flagged)
    X, truth = ppca_data
    report = evaluate(
        models.ppca_collapsed,
        X,
        K,
        estimators=("stratified",),
        num_masks=2,
        curve_masks=2,
        progress=False,
        **truth,
    )
    assert report.reference.trustworthy is False
    assert_close(report.reference.total, models.ppca_log_marginal(X, **truth), atol=1e-8)
    assert "UNRELIABLE" in report.summary()
    pytest.importorskip("matplotlib")
    assert "UNRELIABLE" in report.plot_fixed_rate_bias(ax=report_cases.new_axes()).get_title()


def test_without_curve_there_are_no_fixed_rate_rows(ppca_data):
    report = report_cases.report_without_curve(*ppca_data)
    assert report.curve is None and report.fixed_rates == [] and report.num_tokens is None
    assert set(report.timings) == {"reference", "stratified", "total"}
    assert report.settings["curve_masks"] is None


def test_progress_bar_on_request_and_off_otherwise(ppca_data, capsys):
    X, truth = ppca_data
    kw = dict(estimators=("stratified",), num_masks=2, curve_masks=2, **truth)
    evaluate(models.ppca_collapsed, X, K, progress=True, **kw)
    assert "evaluate" in capsys.readouterr().err
    evaluate(models.ppca_collapsed, X, K, progress=False, **kw)
    assert "evaluate" not in capsys.readouterr().err
    # default: only on a terminal (pytest's captured stderr is not one)
    evaluate(models.ppca_collapsed, X, K, **kw)
    assert "evaluate" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Options: checked first; old names
# ----------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors(ppca_data):
    X, truth = ppca_data
    with pytest.raises(ValueError, match="unknown estimator 'bogus'.*valid names"):
        evaluate(models.ppca_collapsed, X, K, estimators=("stratified", "bogus"), **truth)
    with pytest.raises(ValueError, match="listed twice"):
        evaluate(models.ppca_collapsed, X, K, estimators=("chain", "chain"), **truth)
    with pytest.raises(ValueError, match="mask_rate must lie in"):
        evaluate(models.ppca_collapsed, X, K, fixed_rates=(0.0,), **truth)
    with pytest.raises(ValueError, match="num_masks must be an integer"):
        evaluate(models.ppca_collapsed, X, K, num_masks=0, **truth)
    with pytest.raises(ValueError, match="curve_masks must be an integer >= 1 or None"):
        evaluate(models.ppca_collapsed, X, K, curve_masks=0, **truth)
    with pytest.raises(TypeError, match="model must be a callable"):
        evaluate("ppca", X, K)
    with pytest.raises(ValueError, match="at least one model"):
        compare({}, X)
    with pytest.raises(TypeError, match="dict of name -> Pyro model"):
        compare([models.ppca_collapsed], X)
    with pytest.raises(TypeError, match=r"models\['a'\] must be a callable"):
        compare({"a": 3}, X)
    with pytest.raises(ValueError, match="unknown estimator 'bogus'"):
        compare({"a": models.ppca_collapsed}, X, K, estimator="bogus")
    with pytest.raises(ValueError, match="guides for models not in"):
        compare({"a": models.ppca_collapsed}, X, K, guides={"b": None})


BAD_OPTIONS = [
    (dict(conditionals="bogus"), ValueError, "unknown conditionals 'bogus'"),
    (dict(mpt_samples=0), ValueError, "mpt_samples must be an integer >= 1, got 0"),
    (dict(mpt_options={"quadrature_points": 0}), ValueError, "quadrature_points"),
    (dict(mpt_options={"bogus": 1}), TypeError, r"mpt_options has unknown keys \['bogus'\]"),
    (dict(mpt_options={"num_masks": 3}), TypeError, "mpt_options has unknown keys"),
    (
        dict(estimators=(), mpt_options={"max_elements": 0}),
        ValueError,
        "max_elements must be an integer >= 1",
    ),
    (dict(share_masks="no"), TypeError, "share_masks must be True or False, got 'no'"),
    (dict(token_plate=3), TypeError, "token_plate must be a plate name"),
    (dict(reference="bogus"), ValueError, "unknown reference 'bogus'; valid values"),
    (dict(reference_samples=0), ValueError, "reference_samples must be an integer >= 1"),
    (dict(reference_options={"method": "exact"}), TypeError, "reference_options has unknown"),
    (dict(reference_options={"chunk_size": 0}), ValueError, "chunk_size must be an integer"),
    (dict(guide=3), TypeError, "guide must be a callable Pyro guide or None, got 3"),
    (dict(progress="yes"), TypeError, "progress must be True, False or None, got 'yes'"),
    (dict(fixed_rates=(0.5, 1.5)), ValueError, r"fixed_rates\[1\]: mask_rate must lie in"),
    (dict(fixed_rates=0.5), TypeError, "fixed_rates must be a sequence"),
    (dict(estimators=("bogus",)), ValueError, "unknown estimator 'bogus'"),
]


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS)
def test_every_option_is_checked_before_the_model_runs(ppca_data, options, error, message):
    """Each bad option raises before the model is called once (before, an unknown
    conditionals name surfaced only after a 4096-particle reference)."""
    X, truth = ppca_data
    calls = []

    def model(*args, **kwargs):
        calls.append(1)
        return models.ppca_collapsed(*args, **kwargs)

    kwargs = dict(num_masks=2, curve_masks=2, progress=False)
    kwargs.update(options)
    with pytest.raises(error, match=message):
        evaluate(model, X, K, **kwargs, **truth)
    assert calls == []
    compare_options = {k: v for k, v in options.items() if k not in ("estimators", "fixed_rates")}
    if compare_options and "guide" not in compare_options:
        with pytest.raises(error, match=message):
            compare({"m": model}, X, K, num_masks=2, **compare_options, **truth)
        assert calls == []
    # the good options run the model
    evaluate(model, X, K, estimators=("chain",), num_masks=2, curve_masks=None, **truth)
    assert len(calls) > 0


def test_compare_checks_its_guides_before_the_model_runs(ppca_data):
    X, truth = ppca_data
    calls = []

    def model(*args, **kwargs):
        calls.append(1)
        return models.ppca_collapsed(*args, **kwargs)

    with pytest.raises(TypeError, match=r"guides\['m'\] must be a callable Pyro guide"):
        compare({"m": model}, X, K, guides={"m": "guide"}, **truth)
    with pytest.raises(ValueError, match="num_masks must be an integer >= 1, got 0"):
        compare({"m": model}, X, K, num_masks=0, **truth)
    assert calls == []


def _latent_problem():
    X, truth = models.sample_ppca(8, 4, K, noise_scale=1.0)
    kw = dict(estimators=("stratified",), num_masks=2, curve_masks=None, progress=False)
    return X, truth, kw


@pytest.mark.filterwarnings("ignore:importance conditionals degenerate:UserWarning")
def test_old_keyword_names_warn_and_mean_the_same():
    """num_particles= and mpt_particles= are the deprecated names of reference_samples= and
    mpt_samples=: the same numbers from the same seed, with a DeprecationWarning."""
    X, truth, kw = _latent_problem()
    pyro.set_rng_seed(3)
    new = evaluate(models.ppca_latent, X, K, reference_samples=2000, mpt_samples=64, **kw, **truth)
    pyro.set_rng_seed(3)
    with pytest.warns(DeprecationWarning, match="num_particles= is deprecated.*reference_samples"):
        old = evaluate(models.ppca_latent, X, K, num_particles=2000, mpt_samples=64, **kw, **truth)
    assert old.reference.total == new.reference.total
    assert old.estimators["stratified"].value == new.estimators["stratified"].value
    assert old.settings["reference_samples"] == 2000
    pyro.set_rng_seed(3)
    with pytest.warns(DeprecationWarning, match="mpt_particles= is deprecated.*mpt_samples"):
        old = evaluate(
            models.ppca_latent, X, K, reference_samples=2000, mpt_particles=64, **kw, **truth
        )
    assert old.reference.total == new.reference.total
    assert old.estimators["stratified"].value == new.estimators["stratified"].value
    assert old.settings["mpt_samples"] == 64
    with pytest.raises(TypeError, match="pass reference_samples= only"):
        evaluate(models.ppca_latent, X, K, num_particles=10, reference_samples=20, **truth)
    with pytest.raises(TypeError, match="pass mpt_samples= only"):
        evaluate(models.ppca_latent, X, K, mpt_particles=10, mpt_samples=20, **truth)


@pytest.mark.filterwarnings("ignore:importance conditionals degenerate:UserWarning")
def test_compare_old_keyword_names_warn_and_mean_the_same():
    X, truth, _ = _latent_problem()

    def model(data):
        return models.ppca_latent(data, K, **truth)

    kw = dict(reference="importance", num_masks=2, progress=False)
    pyro.set_rng_seed(4)
    new = compare({"a": model}, X, reference_samples=2000, mpt_samples=32, **kw)
    pyro.set_rng_seed(4)
    with pytest.warns(DeprecationWarning, match="num_particles= is deprecated"):
        with pytest.warns(DeprecationWarning, match="mpt_particles= is deprecated"):
            old = compare({"a": model}, X, num_particles=2000, mpt_particles=32, **kw)
    assert old.loc["a", "lml"] == new.loc["a", "lml"]
    assert old.loc["a", "mpt"] == new.loc["a", "mpt"]


# ----------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------


def test_compare_ranks_the_true_model_first():
    X, truth = report_cases.ppca_data()
    zero_W = dict(truth, W=torch.zeros(T, K))

    def true_model(data):
        return models.ppca_collapsed(data, K, **truth)

    def wrong_model(data):
        return models.ppca_collapsed(data, K, **zero_W)

    table = compare({"wrong": wrong_model, "true": true_model}, X, num_masks=4, progress=False)
    assert list(table.index) == ["true", "wrong"]
    assert list(table["rank"]) == [0, 1]
    lml_true = float(models.ppca_log_marginal(X, **truth))
    lml_wrong = float(models.ppca_log_marginal(X, **zero_W))
    assert lml_true > lml_wrong
    assert_close(table.loc["true", "lml"], lml_true, atol=1e-8)
    assert_close(table.loc["wrong", "lml"], lml_wrong, atol=1e-8)
    assert_close(table.loc["wrong", "d_lml"], lml_true - lml_wrong, atol=1e-8)
    assert table.loc["true", "d_lml"] == 0.0 and table.loc["true", "dse"] == 0.0
    assert list(table["se"]) == [0.0, 0.0] and list(table["method"]) == ["exact", "exact"]
    assert not table["warning"].any()
    assert_close(table["weight"].sum(), 1.0, atol=1e-12)
    # the weights are the softmax of the LMLs
    w_true = 1.0 / (1.0 + math.exp(lml_wrong - lml_true))
    assert_close(table.loc["true", "weight"], w_true, atol=1e-12)
    # the masked estimate ranks them the same way and sits within 5 s.e. of each LML
    for name in ("true", "wrong"):
        row = table.loc[name]
        assert abs(row["mpt"] - row["lml"]) < 5 * row["mpt_se"], (name, row)
    assert table.loc["true", "mpt"] > table.loc["wrong", "mpt"]


def test_compare_dse_of_independent_importance_estimates():
    X, truth = models.sample_ppca(6, 4, K, noise_scale=1.0)
    noisier = dict(truth, noise_scale=torch.tensor(1.5))

    def a(data):
        return models.ppca_latent(data, K, **truth)

    def b(data):
        return models.ppca_latent(data, K, **noisier)

    table = compare(
        {"a": a, "b": b},
        X,
        reference="importance",
        reference_samples=2000,
        estimator=None,
        progress=False,
    )
    best, other = table.index
    assert list(table["method"]) == ["importance", "importance"]
    se = table["se"]
    assert (se > 0).all()
    assert_close(table.loc[other, "dse"], math.hypot(se[best], se[other]), atol=1e-12)
    assert table["mpt"].isna().all()

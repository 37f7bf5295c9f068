"""``evaluate`` / ``EvaluationReport`` / ``compare``: the report holds the numbers of the
separate calls, prints them, exports them to arviz, and draws them."""

import dataclasses
import math
import warnings

import pyro
import pytest
import torch

from pyro_mpt import MaskedELBO, models, mpt_curve
from pyro_mpt.evaluation import log_marginal_likelihood
from pyro_mpt.report import EvaluationReport, compare, draws_variable, evaluate
from tests.conftest import assert_close

N, T, K = 20, 6, 2


def _ppca():
    X, truth = models.sample_ppca(N, T, K, noise_scale=0.5)
    return X, truth


def _import_arviz():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
        return pytest.importorskip("arviz")


@pytest.fixture
def ppca_data():
    return _ppca()


@pytest.fixture
def ppca_report(ppca_data):
    X, truth = ppca_data
    pyro.set_rng_seed(1)
    report = evaluate(
        models.ppca_collapsed, X, K, num_masks=4, curve_masks=3, progress=False, **truth
    )
    return report, X, truth


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
    num_particles,
    mpt_particles,
    token_plate=None,
):
    """Replays evaluate()'s calls in its documented order from the same seed."""
    pyro.set_rng_seed(seed)
    ref = log_marginal_likelihood(
        model,
        *args,
        method=reference,
        num_particles=num_particles,
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
                num_particles=mpt_particles,
                token_plate=token_plate,
            ).estimate(model, None, *args, **kwargs)
            for name in estimators
        }
    curve = mpt_curve(
        model,
        *args,
        num_masks=curve_masks,
        num_particles=mpt_particles,
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
        num_particles=4096,
        mpt_particles=256,
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


def test_report_holds_the_numbers_importance_reference():
    """Latent-variable PPCA: an importance reference, importance conditionals for MPT, all
    reproduced by the separate calls from the same seed."""
    X, truth = models.sample_ppca(8, 4, K, noise_scale=1.0)
    pyro.set_rng_seed(3)
    report = evaluate(
        models.ppca_latent,
        X,
        K,
        estimators=("stratified", "chain"),
        num_masks=3,
        curve_masks=2,
        num_particles=2000,
        mpt_particles=64,
        progress=False,
        **truth,
    )
    _check_matches_separate_calls(
        report,
        models.ppca_latent,
        (X, K),
        truth,
        seed=3,
        reference="auto",
        estimators=("stratified", "chain"),
        num_masks=3,
        curve_masks=2,
        num_particles=2000,
        mpt_particles=64,
    )
    ref = report.reference
    assert ref.method == "importance"
    assert ref.log_weights is not None and ref.log_weights.shape == (2000, 8)
    exact = float(models.ppca_log_marginal(X, **truth))
    # importance with 2000 prior draws on 4 tokens: within 4 of its s.e. (+ a small bias)
    assert abs(float(ref.total) - exact) < 4 * ref.stderr + 0.05


def test_summary_contains_every_number(ppca_report):
    report, _, _ = ppca_report
    text = report.summary()
    assert str(report) == text
    ref = report.reference
    assert "exact" in text and "ok" in text and "UNRELIABLE" not in text
    assert f"{float(ref.total):.3f}" in text
    for row in report.estimators.values():
        for number in (row.value, row.stderr, row.difference_stderr):
            assert f"{number:.3f}" in text, (row.name, number)
        assert f"{row.difference:+.3f}" in text
        z = "n/a" if math.isnan(row.z_score) else f"{row.z_score:+.2f}"
        assert f"{row.difference_stderr:.3f} {z:>8}" in text
    assert f"{float(report.curve.area):.3f}" in text
    assert f"{report.curve.area_stderr:.3f}" in text
    for b in report.fixed_rates:
        assert f"{b.rate:.3f}" in text
        for number in (b.estimate, b.stderr, b.bias_stderr):
            assert f"{number:.3f}" in text, (b.rate, number)
        assert f"{b.bias:+.3f}" in text
        assert f"{b.bias / report.num_sequences:+.4f}" in text
    for part, seconds in report.timings.items():
        assert f"{part} {seconds:.4f}" in text
    assert "device cpu" in text
    assert "EvaluationReport(reference=exact" in repr(report)


def test_summary_marks_an_untrustworthy_importance_reference():
    """Prior importance sampling with 16 particles on 40 tokens: k-hat far above arviz's
    threshold. The reference is kept, warned about, and printed UNRELIABLE, never as ok."""
    X, truth = models.sample_ppca(5, 40, K, noise_scale=0.3)
    with pytest.warns(UserWarning):
        report = evaluate(
            models.ppca_latent,
            X,
            K,
            estimators=("stratified",),
            num_masks=2,
            curve_masks=None,
            reference="importance",
            num_particles=16,
            mpt_particles=16,
            progress=False,
            **truth,
        )
    ref = report.reference
    assert not ref.trustworthy
    text = report.summary()
    assert "UNRELIABLE (k-hat" in text
    assert f"{float(ref.khat.max()):.2f} > {ref.khat_threshold:.2f}" in text
    assert "not meaningful" in text
    assert "ok" not in text.split("Reference log p(X)")[1].split("\n")[2]
    assert "UNRELIABLE" in repr(report)


def test_summary_marks_a_flagged_reference_monkeypatched(monkeypatch, ppca_data):
    """Whatever the reason a reference is flagged, the table says so."""
    import pyro_mpt.report as report_module

    real = report_module.log_marginal_likelihood

    def flagged(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), trustworthy=False)

    monkeypatch.setattr(report_module, "log_marginal_likelihood", flagged)
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
    assert "UNRELIABLE" in report.summary()
    assert "UNRELIABLE" in report.plot_fixed_rate_bias(ax=_axes()).get_title()


def test_to_inference_data_passes_through_arviz(ppca_report, tmp_path):
    az = _import_arviz()
    report, _, _ = ppca_report
    idata = report.to_inference_data()
    assert isinstance(idata, az.InferenceData)
    assert {"mpt", "mpt_draws", "reference"} <= set(idata.groups())
    mpt = idata["mpt"]
    assert mpt["curve"].dims == ("sequence", "mask_size")
    assert_close(torch.as_tensor(mpt["curve"].values), report.curve.per_sequence, atol=0)
    assert_close(torch.as_tensor(mpt["curve_total"].values), report.curve.scores, atol=0)
    assert list(mpt["mask_size"].values) == list(range(1, T + 1))
    assert_close(torch.as_tensor(mpt["mask_rate"].values), report.curve.mask_rates, atol=0)
    assert mpt.attrs["area"] == float(report.curve.area)
    draws = idata["mpt_draws"]
    for name, row in report.estimators.items():
        var = draws_variable(name)
        assert draws[var].dims == ("chain", "draw", "sequence")
        assert_close(torch.as_tensor(draws[var].values[0]), row.estimate.draws, atol=0)
        assert draws.attrs[f"{var}_total"] == row.value
    assert idata["reference"].attrs["method"] == "exact"
    assert idata["reference"].attrs["trustworthy"] == 1
    assert idata.attrs["device"] == "cpu"
    # arviz's own functions run on it
    table = az.summary(idata, group="mpt_draws", kind="stats", round_to="none")
    assert_close(
        torch.as_tensor(table.loc["mpt_stratified[0]", "mean"]),
        report.estimators["stratified"].estimate.per_sequence[0],
        atol=1e-10,
    )
    ess = az.ess(idata["mpt_draws"], var_names=["mpt_uniform"])
    assert ess["mpt_uniform"].dims == ("sequence",)
    # and it survives a netCDF round trip (numbers and strings only in the attributes)
    pytest.importorskip("h5netcdf")
    path = tmp_path / "report.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert_close(torch.as_tensor(back["mpt"]["curve"].values), report.curve.per_sequence, atol=0)


def test_to_inference_data_importance_weights_and_psis():
    """The importance log-weights go in with dims (particle, sequence); arviz's psislw on
    them reproduces the reference's k-hat."""
    az = _import_arviz()
    X, truth = models.sample_ppca(6, 4, K, noise_scale=1.0)
    report = evaluate(
        models.ppca_latent,
        X,
        K,
        estimators=("stratified",),
        num_masks=2,
        curve_masks=2,
        reference="importance",
        num_particles=1000,
        mpt_particles=32,
        progress=False,
        **truth,
    )
    ref = report.reference
    idata = report.to_inference_data()
    lw = idata["reference"]["log_weights"]
    assert lw.dims == ("particle", "sequence") and lw.shape == (1000, 6)
    assert_close(torch.as_tensor(lw.values), ref.log_weights, atol=0)
    # arviz's psislw wants the sample dimension last
    _, khat = az.psislw(lw.rename(particle="__sample__").transpose("sequence", "__sample__"))
    assert_close(torch.as_tensor(khat.values), ref.khat, atol=1e-8)
    assert_close(torch.as_tensor(idata["reference"]["khat"].values), ref.khat, atol=0)
    assert_close(torch.as_tensor(idata["reference"]["ess"].values), ref.ess, atol=0)
    assert idata["reference"].attrs["khat_threshold"] == pytest.approx(ref.khat_threshold)


def _axes():
    from matplotlib.figure import Figure

    return Figure().add_subplot()


def test_plot_draws_the_curve_area_band_and_reference(ppca_report):
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PolyCollection

    report, _, _ = ppca_report
    ax = _axes()
    out = report.plot(ax=ax)
    assert out is ax
    curve = report.curve
    lines = ax.get_lines()
    assert_close(torch.as_tensor(lines[0].get_xdata()), curve.mask_rates, atol=0)
    assert_close(torch.as_tensor(lines[0].get_ydata()), curve.scores, atol=0)
    levels = [line.get_ydata()[0] for line in lines[1:]]
    assert float(report.reference.total) / T in levels  # the reference line at LML / T
    fills = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(fills) == 2  # the shaded area and the s.e. band
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(f"{float(curve.area):.3f}" in s for s in labels)
    assert any("reference" in s and "exact" in s for s in labels)
    assert ax.get_xlabel() == "mask rate m / T"

    ax2 = report.plot_fixed_rate_bias(ax=_axes())
    assert len(ax2.containers) == 1  # the fixed rates' error bars
    notes = [t.get_text() for t in ax2.texts]
    assert len(notes) == 3 and any(f"{report.fixed_rates[0].bias:+.2f}" in s for s in notes)


def test_plot_makes_its_own_figure_without_ax(ppca_report):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    from pyro_mpt.plotting import plot_curve

    report, _, _ = ppca_report
    ax = report.plot()
    try:
        assert ax.figure is not None and len(ax.get_lines()) >= 2
    finally:
        plt.close(ax.figure)
    # a bare curve with one mask per size (no s.e.: no band), a plain number as the
    # reference, per sequence
    X, truth = models.sample_ppca(4, T, K)
    curve = mpt_curve(models.ppca_collapsed, X, K, num_masks=1, **truth)
    ax = plot_curve(curve, reference=-123.0, per_sequence=True)
    try:
        fills = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(fills) == 1  # the area only
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any("reference log p(X) = -30.750" in s for s in labels)  # -123 / 4 sequences
        assert_close(torch.as_tensor(ax.get_lines()[0].get_ydata()), curve.scores / 4, atol=1e-12)
        assert "per sequence" in ax.get_ylabel()
    finally:
        plt.close(ax.figure)


def test_compare_ranks_the_true_model_first():
    X, truth = _ppca()
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
        num_particles=2000,
        estimator=None,
        progress=False,
    )
    best, other = table.index
    assert list(table["method"]) == ["importance", "importance"]
    se = table["se"]
    assert (se > 0).all()
    assert_close(table.loc[other, "dse"], math.hypot(se[best], se[other]), atol=1e-12)
    assert table["mpt"].isna().all()


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


def test_without_curve_there_are_no_fixed_rate_rows(ppca_data):
    X, truth = ppca_data
    report = evaluate(
        models.ppca_collapsed,
        X,
        K,
        estimators=("stratified",),
        num_masks=2,
        curve_masks=None,
        progress=False,
        **truth,
    )
    assert report.curve is None and report.fixed_rates == [] and report.num_tokens is None
    assert "Fixed mask rates" not in report.summary()
    assert "mpt" not in report.to_inference_data().groups()
    with pytest.raises(ValueError, match="curve_masks"):
        report.plot(ax=_axes())


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

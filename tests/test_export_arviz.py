"""arviz the standard way (pyro_mpt.export): the ``posterior`` group makes ``az.summary``,
``az.plot_forest`` and ``az.plot_posterior`` work with their defaults; ``to_elpd_data``
feeds ``az.plot_khat`` and ``az.compare``; :func:`pyro_mpt.export.compare_reports` ranks models by
their LML. Each call's numbers are checked against the report's (computed by pyro_mpt)
or against numpy/scipy directly."""

import math
import re

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from pyro_mpt import evaluate, models
from pyro_mpt.export import compare_reports, draws_variable, to_elpd_data
from tests.conftest import assert_close
from tests.report_cases import K, new_axes

az = pytest.importorskip("arviz")
pytest.importorskip("matplotlib")

# arviz 0.23 on matplotlib 3.11 / pandas 3.1 emits deprecation warnings of its own.
ARVIZ_DEPRECATIONS = [
    "ignore:Passing a dict or None as alias_mapping:DeprecationWarning",
    "ignore:The inplace keyword:DeprecationWarning",
    "ignore:The inplace keyword:FutureWarning",
]


def _with(marks):
    def wrap(fn):
        for m in marks:
            fn = pytest.mark.filterwarnings(m)(fn)
        return fn

    return wrap


def _total_draws(report, name):
    """The estimator's draws of log p(X) computed here: per-sequence draws summed."""
    return report.estimators[name].estimate.draws.sum(-1).numpy()


def test_posterior_group_holds_each_estimators_draws_of_log_p(ppca_report):
    report, _, _ = ppca_report
    idata = report.to_inference_data()
    assert "posterior" in idata.groups()
    post = idata.posterior
    assert dict(post.sizes) == {"chain": 1, "draw": 4}
    for name in report.estimators:
        var = post[draws_variable(name)]
        assert var.dims == ("chain", "draw")
        assert_close(
            torch.as_tensor(var.values[0]), torch.as_tensor(_total_draws(report, name)), atol=0
        )
        # the mean of the draws is the estimator's total
        assert var.values.mean() == pytest.approx(report.estimators[name].value, abs=1e-9)
    assert post.attrs["reference_total"] == float(report.reference.total)


def test_az_summary_with_defaults(ppca_report):
    report, _, _ = ppca_report
    idata = report.to_inference_data()
    names = ["mpt_stratified", "mpt_uniform"]  # "chain" is deterministic: arviz warns on it
    table = az.summary(idata, var_names=names, round_to="none")
    for var, name in zip(names, ("stratified", "uniform")):
        draws = _total_draws(report, name)
        assert table.loc[var, "mean"] == pytest.approx(draws.mean(), abs=1e-9)
        assert table.loc[var, "sd"] == pytest.approx(draws.std(ddof=1), rel=1e-9)
        assert math.isnan(table.loc[var, "r_hat"])  # one chain: no r_hat


@_with(ARVIZ_DEPRECATIONS)
def test_az_plot_forest_and_plot_posterior(ppca_report):
    report, _, _ = ppca_report
    idata = report.to_inference_data()
    axes = az.plot_forest(idata, var_names=["mpt_stratified"], combined=True, hdi_prob=0.5)
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == ["mpt_stratified"]
    draws = _total_draws(report, "stratified")
    # the forest's point estimate is the median of the draws (arviz's default)
    points = [line.get_xdata()[0] for line in axes[0].lines if len(line.get_xdata()) == 1]
    assert points == [pytest.approx(np.median(draws), abs=1e-9)]
    ref = idata.posterior.attrs["reference_total"]
    ax = az.plot_posterior(idata, var_names=["mpt_stratified"], ref_val=ref, ax=new_axes())
    texts = " ".join(t.get_text() for t in ax.texts)
    assert f"mean={draws.mean():.3g}" in texts.replace("−", "-")
    # the reference line's label: "<share below> <ref_val> <share above>"
    shown = re.search(r"<(-?[0-9.]+)<", texts.replace("−", "-"))
    assert float(shown.group(1)) == pytest.approx(ref, abs=1e-3)


def test_netcdf_round_trip_keeps_the_posterior(ppca_report, tmp_path):
    pytest.importorskip("h5netcdf")
    report, _, _ = ppca_report
    path = tmp_path / "report.nc"
    report.to_inference_data().to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert {"posterior", "mpt_draws", "reference", "mpt"} <= set(back.groups())
    assert_close(
        torch.as_tensor(back.posterior["mpt_uniform"].values[0]),
        torch.as_tensor(_total_draws(report, "uniform")),
        atol=0,
    )
    assert back.posterior.attrs["reference_total"] == float(report.reference.total)


def test_to_elpd_data_holds_the_lml(ppca_report):
    report, _, _ = ppca_report
    ref = to_elpd_data(report)
    assert isinstance(ref, az.ELPDData)
    assert ref["elpd_loo"] == float(report.reference.total)
    assert ref["se"] == float(report.reference.stderr) and ref["n_samples"] == 0
    assert ref["n_data_points"] == report.num_sequences and ref["scale"] == "log"
    assert ref["warning"] is False or ref["warning"] == False  # noqa: E712 (numpy bool)
    assert ref["loo_i"].dims == ("sequence",)
    assert ref["loo_i"].values.sum() == pytest.approx(ref["elpd_loo"], abs=1e-9)
    assert "pareto_k" not in ref  # exact reference: no weights, no k-hat
    row = to_elpd_data(report, "stratified")
    assert row["elpd_loo"] == report.estimators["stratified"].value
    assert row["n_samples"] == 4
    assert_close(
        torch.as_tensor(row["loo_i"].values),
        report.estimators["stratified"].estimate.per_sequence,
        atol=0,
    )
    with pytest.raises(ValueError, match=r"estimator='nope'.*\['chain', 'stratified'"):
        to_elpd_data(report, "nope")


@_with(ARVIZ_DEPRECATIONS)
@pytest.mark.filterwarnings("ignore:UNRELIABLE")
def test_az_plot_khat_on_the_references_khats(ppca_data):
    X, truth = ppca_data
    report = evaluate(
        models.ppca_latent,
        X,
        K,
        estimators=("stratified",),
        num_masks=2,
        curve_masks=None,
        reference="importance",
        reference_samples=300,
        mpt_samples=16,
        progress=False,
        **truth,
    )
    elpd = to_elpd_data(report)
    assert elpd["n_samples"] == 300 and elpd["good_k"] == report.reference.khat_threshold
    assert_close(torch.as_tensor(elpd["pareto_k"].values), report.reference.khat, atol=0)
    ax = az.plot_khat(elpd, ax=new_axes(), show_hlines=True)
    offsets = np.asarray(ax.collections[0].get_offsets())
    assert_close(torch.as_tensor(offsets[:, 1]), report.reference.khat, atol=1e-12)
    # the threshold line is the reference's own threshold
    ys = [seg[0][1] for c in ax.collections[1:] for seg in c.get_segments()]
    assert any(abs(y - report.reference.khat_threshold) < 1e-12 for y in ys)


@_with(ARVIZ_DEPRECATIONS)
def test_compare_ranks_models_by_lml(ppca_data):
    X, truth = ppca_data
    reports = {
        f"k={k}": evaluate(
            models.ppca_collapsed,
            X,
            k,
            estimators=("stratified",),
            num_masks=2,
            curve_masks=None,
            progress=False,
        )
        for k in (1, 2)
    }
    table = compare_reports(reports)
    lml = {name: float(r.reference.total) for name, r in reports.items()}
    best = max(lml, key=lml.get)
    assert table.index[0] == best and table.loc[best, "rank"] == 0
    assert list(table.columns) == [
        "rank",
        "elpd_loo",
        "p_loo",
        "elpd_diff",
        "weight",
        "se",
        "dse",
        "warning",
        "scale",
    ]
    names = list(lml)
    log_z = logsumexp([lml[n] for n in names])
    for name in names:
        assert table.loc[name, "elpd_loo"] == pytest.approx(lml[name], abs=1e-9)
        assert table.loc[name, "elpd_diff"] == pytest.approx(lml[best] - lml[name], abs=1e-9)
        # pseudo-BMA weights on the LML: posterior model probabilities
        assert table.loc[name, "weight"] == pytest.approx(math.exp(lml[name] - log_z), abs=1e-9)
    other = names[1 - names.index(best)]
    diff = (reports[best].reference.per_sequence - reports[other].reference.per_sequence).numpy()
    assert table.loc[other, "dse"] == pytest.approx(math.sqrt(len(diff) * diff.var()), rel=1e-9)
    # by an estimator instead of the reference
    by_mpt = compare_reports(reports, estimator="stratified")
    for name, r in reports.items():
        assert by_mpt.loc[name, "elpd_loo"] == r.estimators["stratified"].value
    ax = az.plot_compare(table, ax=new_axes())
    assert [t.get_text() for t in ax.get_yticklabels()][0] == best


def test_compare_rejects_bad_input(ppca_report):
    report, _, _ = ppca_report
    with pytest.raises(ValueError, match="at least two named reports.*with 1 entries"):
        compare_reports({"a": report})
    with pytest.raises(ValueError, match=r"not a dict"):
        compare_reports([report, report])
    X, truth = models.sample_ppca(5, 6, K, noise_scale=0.5)
    small = evaluate(
        models.ppca_collapsed,
        X,
        K,
        estimators=("stratified",),
        num_masks=2,
        curve_masks=None,
        progress=False,
        **truth,
    )
    with pytest.raises(ValueError, match="different numbers of sequences"):
        compare_reports({"a": report, "b": small})

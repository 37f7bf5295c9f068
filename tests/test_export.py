"""``to_inference_data`` (pyro_mpt.export): the InferenceData holds the report's numbers,
arviz's own functions run on it, and it survives a netCDF round trip."""

import math

import pytest
import torch

from pyro_mpt import models
from pyro_mpt.export import draws_variable, to_inference_data
from tests import report_cases
from tests.conftest import assert_close
from tests.report_cases import K, T

az = pytest.importorskip("arviz")


def test_draws_variable_names():
    assert draws_variable("chain") == "mpt_chain"
    assert draws_variable("fixed(0.15)") == "mpt_fixed_0_15_"
    assert draws_variable("stratified") == "mpt_stratified"


def test_to_inference_data_holds_the_reports_numbers(ppca_report):
    report, _, _ = ppca_report
    idata = report.to_inference_data()
    assert isinstance(idata, az.InferenceData)
    assert {"mpt", "mpt_draws", "reference"} <= set(idata.groups())
    # the curve group
    mpt = idata["mpt"]
    assert mpt["curve"].dims == ("sequence", "mask_size")
    assert_close(torch.as_tensor(mpt["curve"].values), report.curve.per_sequence, atol=0)
    assert_close(torch.as_tensor(mpt["curve_total"].values), report.curve.scores, atol=0)
    assert_close(torch.as_tensor(mpt["curve_stderr"].values), report.curve.stderr, atol=0)
    assert list(mpt["mask_size"].values) == list(range(1, T + 1))
    assert list(mpt["sequence"].values) == list(range(report.num_sequences))
    assert_close(torch.as_tensor(mpt["mask_rate"].values), report.curve.mask_rates, atol=0)
    assert mpt.attrs["area"] == float(report.curve.area)
    assert mpt.attrs["area_stderr"] == float(report.curve.area_stderr)
    assert mpt.attrs["exhaustive"] == 0 and mpt.attrs["num_tokens"] == T
    assert mpt.attrs["conditionals"] == report.curve.conditionals
    for b in report.fixed_rates:
        key = f"fixed_rate_{b.rate:g}"
        assert mpt.attrs[key + "_mask_size"] == b.mask_size
        assert mpt.attrs[key + "_estimate"] == b.estimate
        assert mpt.attrs[key + "_bias"] == b.bias
        assert mpt.attrs[key + "_bias_stderr"] == b.bias_stderr
    # the draws group
    draws = idata["mpt_draws"]
    assert list(draws["draw"].values) == [0, 1, 2, 3] and list(draws["chain"].values) == [0]
    for name, row in report.estimators.items():
        var = draws_variable(name)
        assert draws[var].dims == ("chain", "draw", "sequence")
        assert_close(torch.as_tensor(draws[var].values[0]), row.estimate.draws, atol=0)
        assert draws.attrs[f"{var}_total"] == row.value
        assert draws.attrs[f"{var}_stderr"] == row.stderr
        z = draws.attrs[f"{var}_z_score"]
        assert (math.isnan(z) and math.isnan(row.z_score)) or z == row.z_score
        assert draws.attrs[f"{var}_conditionals"] == row.conditionals
    # the reference group
    ref = report.reference
    group = idata["reference"]
    assert_close(torch.as_tensor(group["per_sequence"].values), ref.per_sequence, atol=0)
    assert_close(
        torch.as_tensor(group["per_sequence_stderr"].values), ref.per_sequence_stderr, atol=0
    )
    assert group.attrs["method"] == "exact"
    assert group.attrs["trustworthy"] == 1
    assert group.attrs["total"] == float(ref.total) and group.attrs["stderr"] == ref.stderr
    assert group.attrs["status"] == "ok"
    assert group.attrs["messages"] == "\n".join(ref.messages)
    assert "log_weights" not in group and "khat" not in group  # exact: no weights
    # the top-level attributes
    assert idata.attrs["device"] == "cpu"
    assert idata.attrs["num_sequences"] == report.num_sequences
    assert idata.attrs["num_tokens"] == T
    for part, seconds in report.timings.items():
        assert idata.attrs[f"seconds_{part}"] == seconds
    # the method and the function agree
    again = to_inference_data(report)
    assert_close(torch.as_tensor(again["mpt"]["curve"].values), report.curve.per_sequence, atol=0)


def test_to_inference_data_passes_through_arviz(ppca_report, tmp_path):
    report, _, _ = ppca_report
    idata = report.to_inference_data()
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


@pytest.mark.filterwarnings("ignore:importance conditionals degenerate:UserWarning")
def test_to_inference_data_importance_weights_and_psis():
    """The importance log-weights go in with dims (particle, sequence); arviz's psislw on
    them reproduces the reference's k-hat."""
    from pyro_mpt import evaluate

    X, truth = models.sample_ppca(6, 4, K, noise_scale=1.0)
    report = evaluate(
        models.ppca_latent,
        X,
        K,
        estimators=("stratified",),
        num_masks=2,
        curve_masks=2,
        reference="importance",
        reference_samples=1000,
        mpt_samples=32,
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
    assert idata["reference"].attrs["num_samples"] == 1000


def test_without_curve_there_is_no_curve_group(ppca_data):
    report = report_cases.report_without_curve(*ppca_data)
    idata = report.to_inference_data()
    assert "mpt" not in idata.groups()
    assert set(idata.groups()) == {"posterior", "mpt_draws", "reference"}
    assert "num_tokens" not in idata.attrs
    draws = idata["mpt_draws"]["mpt_stratified"]
    assert_close(
        torch.as_tensor(draws.values[0]), report.estimators["stratified"].estimate.draws, atol=0
    )

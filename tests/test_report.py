"""``EvaluationReport`` (pyro_mpt.report): its text holds every number of the report, and
an untrustworthy reference is printed as such."""

import math

import pytest
import torch

from pyro_mpt import models
from pyro_mpt.report import EstimatorResult, EvaluationReport, FixedRateBias
from tests import report_cases
from tests.report_cases import K


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


class _Reference:
    """A hand-made importance reference with every field the report reads."""

    method = "importance"
    total = torch.tensor(-10.0)
    stderr = 0.25
    num_samples = 64
    khat = torch.tensor([0.2, 0.9])
    khat_threshold = 0.6
    ess = torch.tensor([30.0, 2.5])
    trustworthy = False
    messages = ["UNRELIABLE: k-hat 0.90 > 0.60"]


def _hand_made_report():
    estimate = EstimatorResult(
        name="uniform",
        value=-9.5,
        stderr=0.3,
        difference=0.5,
        difference_stderr=math.hypot(0.3, 0.25),
        z_score=0.5 / math.hypot(0.3, 0.25),
        num_masks=8,
        conditionals="importance",
        unbiased=False,
        seconds=0.5,
        estimate=None,
    )
    bias = FixedRateBias(
        rate=0.5, mask_size=2, estimate=-12.0, stderr=1.0, bias=-2.0, bias_stderr=1.25
    )
    return EvaluationReport(
        reference=_Reference(),
        estimators={"uniform": estimate},
        curve=None,
        fixed_rates=[bias],
        timings={"reference": 1.5, "uniform": 0.5, "total": 2.0},
        device="cpu",
        num_sequences=2,
        num_tokens=None,
        settings={"mpt_samples": 32},
    )


def test_summary_lines_of_a_hand_made_report():
    """The exact lines, from numbers chosen by hand."""
    report = _hand_made_report()
    status = "UNRELIABLE (k-hat 0.90 > 0.60, min ESS 2.5 of 64 particles)"
    assert report.reference_status == status
    lines = report.summary().splitlines()
    # no curve and no estimate's token count: T is omitted, never printed as "?"
    assert lines[0] == "MPT evaluation: N = 2 sequences, device cpu"
    assert lines[4] == f"  importance          -10.000      0.250  64 particles     {status}"
    assert lines[5] == "  k-hat max 0.900 (threshold 0.600), ESS min 2.5"
    se = math.hypot(0.3, 0.25)
    row = (
        f"  uniform*         8 importance           -9.500      0.300       +0.500 "
        f"{se:>10.3f} {0.5 / se:>+8.2f}"
    )
    assert row in lines
    assert "  * biased: its expectation is not log p(X)" in lines
    assert any("(mpt_samples = 32)" in line for line in lines)
    assert "  (z-scores against an UNRELIABLE reference are not meaningful)" in lines
    assert "   0.500     2        -12.000      1.000       -2.000      1.250    -1.0000" in lines
    assert lines[-4:] == [
        "  reference 1.5000  uniform 0.5000  total 2.0000",
        "",
        "Reference messages",
        "  - UNRELIABLE: k-hat 0.90 > 0.60",
    ]
    assert "Curve S(m)" not in report.summary()
    assert repr(report) == (
        f"EvaluationReport(reference=importance -10.000 [{status}], estimators=[uniform], "
        "device=cpu)"
    )


def test_summary_marks_an_untrustworthy_importance_reference():
    """Prior importance sampling with 16 particles on 40 tokens: k-hat far above arviz's
    threshold. The reference is kept, warned about, and printed UNRELIABLE, never as ok."""
    from pyro_mpt import evaluate

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
            reference_samples=16,
            mpt_samples=16,
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


def test_summary_marks_a_flagged_reference(ppca_report):
    """Whatever the reason a reference is flagged, the table says so."""
    report = report_cases.flagged(ppca_report[0])
    assert report.reference_status == "UNRELIABLE"  # exact: no k-hat or ESS to cite
    assert "UNRELIABLE" in report.summary()
    assert "(z-scores against an UNRELIABLE reference are not meaningful)" in report.summary()


def test_summary_without_curve(ppca_data):
    report = report_cases.report_without_curve(*ppca_data)
    text = report.summary()
    assert "Fixed mask rates" not in text and "Curve S(m)" not in text
    # without a curve the token count comes from the data (through the estimates)
    T = ppca_data[0].shape[-1]
    assert report.estimators["stratified"].estimate.num_tokens == T
    assert "?" not in text.splitlines()[0]
    assert f"N = {report.num_sequences} sequences, T = {T} tokens" in text


def test_evaluate_and_compare_still_import_from_report():
    import pyro_mpt.evaluator

    with pytest.warns(DeprecationWarning, match="pyro_mpt.report.evaluate is deprecated"):
        from pyro_mpt.report import evaluate
    with pytest.warns(DeprecationWarning, match="pyro_mpt.report.compare is deprecated"):
        from pyro_mpt.report import compare

    assert evaluate is pyro_mpt.evaluator.evaluate and compare is pyro_mpt.evaluator.compare
    import pyro_mpt.report

    with pytest.raises(AttributeError, match="no attribute 'bogus'"):
        pyro_mpt.report.bogus  # noqa: B018

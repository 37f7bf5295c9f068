"""Figures (pyro_mpt.plotting): the curve, its area, the reference line and the bias of
fixed rates are drawn at the report's numbers."""

import pytest
import torch

from pyro_mpt import models, mpt_curve
from pyro_mpt.plotting import plot_curve, plot_fixed_rate_bias, reference_parts
from tests import report_cases
from tests.conftest import assert_close
from tests.report_cases import K, T

matplotlib = pytest.importorskip("matplotlib")


def test_plot_draws_the_curve_area_band_and_reference(ppca_report):
    from matplotlib.collections import PolyCollection

    report, _, _ = ppca_report
    ax = report_cases.new_axes()
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
    difference = float(curve.area) - float(report.reference.total)
    assert any(f"area − reference = {difference:+.3f}" in s for s in labels)
    assert ax.get_xlabel() == "mask rate m / T"


def test_plot_fixed_rate_bias_draws_every_size_and_the_fixed_rates(ppca_report):
    report, _, _ = ppca_report
    ax2 = report.plot_fixed_rate_bias(ax=report_cases.new_axes())
    assert len(ax2.containers) == 1  # the fixed rates' error bars
    notes = [t.get_text() for t in ax2.texts]
    assert len(notes) == 3 and any(f"{report.fixed_rates[0].bias:+.2f}" in s for s in notes)
    # the line: T S(m) - reference at every size
    curve = report.curve
    line = ax2.get_lines()[0]
    assert_close(torch.as_tensor(line.get_xdata()), curve.mask_rates, atol=0)
    expected = T * curve.scores - float(report.reference.total)
    assert_close(torch.as_tensor(line.get_ydata()), expected, atol=1e-10)
    # the points: each fixed rate at m / T and its bias, with its s.e. as error bar
    points, _, (bars,) = ax2.containers[0]
    xs, ys = points.get_data()
    assert list(xs) == [b.mask_size / T for b in report.fixed_rates]
    assert list(ys) == [b.bias for b in report.fixed_rates]
    heights = [seg[1][1] - seg[0][1] for seg in bars.get_segments()]
    assert_close(torch.tensor(heights), [2 * b.bias_stderr for b in report.fixed_rates], atol=1e-9)
    assert "exact reference" in ax2.get_title() and "UNRELIABLE" not in ax2.get_title()


def test_a_flagged_reference_is_drawn_unreliable(ppca_report):
    report = report_cases.flagged(ppca_report[0])
    assert "UNRELIABLE" in report.plot_fixed_rate_bias(ax=report_cases.new_axes()).get_title()
    ax = report.plot(ax=report_cases.new_axes())
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(s.startswith("UNRELIABLE") for s in labels)
    assert any(line.get_linestyle() == "--" for line in ax.get_lines())


def test_plot_makes_its_own_figure_without_ax(ppca_report):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

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


def test_without_curve_the_figures_raise(ppca_data):
    report = report_cases.report_without_curve(*ppca_data)
    with pytest.raises(ValueError, match="curve_masks"):
        report.plot(ax=report_cases.new_axes())
    with pytest.raises(ValueError, match="curve_masks"):
        plot_fixed_rate_bias(report, ax=report_cases.new_axes())


def test_reference_parts_of_a_number_and_of_an_estimate(ppca_report):
    assert reference_parts(-3.5) == (-3.5, 0.0, "reference", True, None, None)
    ref = ppca_report[0].reference
    assert reference_parts(ref) == (float(ref.total), 0.0, "exact", True, None, None)


def test_per_sequence_must_be_a_bool(ppca_report):
    report = ppca_report[0]
    with pytest.raises(TypeError, match="per_sequence must be True or False, got 'yes'"):
        plot_curve(report.curve, ax=report_cases.new_axes(), per_sequence="yes")
    with pytest.raises(TypeError, match="per_sequence must be True or False, got 1"):
        plot_fixed_rate_bias(report, ax=report_cases.new_axes(), per_sequence=1)

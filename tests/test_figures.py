"""Figures that read at a glance (pyro_mpt.plotting, experiments/area.py, the demo's
``--plot``): the s.e. band around the curve instead of shading from 0, the reference line,
no repeated "(reference)", shades in the legend's colours, a title inside the figure."""

import matplotlib
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb

from pyro_mpt import cli, models, mpt_curve, plot_curve
from pyro_mpt.experiments import area
from tests.report_cases import new_axes

matplotlib.use("Agg")


@pytest.fixture
def curve_and_exact(ppca_data):
    import pyro

    X, truth = ppca_data
    pyro.set_rng_seed(0)
    curve = mpt_curve(models.ppca_collapsed, X, 2, num_masks=3, **truth)
    exact = float(models.ppca_log_marginal(X, **truth))
    return curve, exact


def _labels(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_band_shades_around_the_curve(curve_and_exact):
    curve, exact = curve_and_exact
    ax = plot_curve(curve, reference=exact, ax=new_axes(), shade="band")
    fills = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(fills) == 1  # the s.e. band only, no area down to 0
    scores, se = curve.scores.numpy(), curve.stderr.numpy()
    ys = fills[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx((scores - se).min()) and ys.max() == pytest.approx(
        (scores + se).max()
    )
    # the y axis follows the curve and the reference line: 0 is far outside it
    low, high = ax.get_ylim()
    assert high < 0 and low > 2 * min(scores.min(), exact / curve.num_tokens)
    labels = _labels(ax)
    assert any(
        f"area Σ_m S(m) = {float(curve.area):.3f}" in s and s.startswith("S(m)") for s in labels
    )
    # the reference line at log p(X) / T
    ref_lines = [ln for ln in ax.lines if list(ln.get_ydata()) == [exact / curve.num_tokens] * 2]
    assert len(ref_lines) == 1
    none = plot_curve(curve, ax=new_axes(), shade="none")
    assert not [c for c in none.collections if isinstance(c, PolyCollection)]
    with pytest.raises(ValueError, match="shade"):
        plot_curve(curve, ax=new_axes(), shade="zero")


def test_reference_named_once(curve_and_exact, ppca_report):
    curve, exact = curve_and_exact
    labels = " ".join(_labels(plot_curve(curve, reference=exact, ax=new_axes())))
    assert "(reference)" not in labels and labels.count("reference log p(X)") == 1
    report, _, _ = ppca_report
    labels = " ".join(_labels(report.plot(ax=new_axes(), shade="band")))
    assert "(exact)" in labels


def test_area_figure_title_legend_and_shades():
    res = area(T=8, K=2, N=30, permutations=(1, 6))
    fig = res.figure()
    ax = fig.axes[0]
    fig.canvas.draw()
    # the title fits in the figure (it was cut off on the right)
    title = ax.title.get_window_extent()
    box = fig.bbox
    assert title.x0 >= box.x0 and title.x1 <= box.x1
    assert "exact log p(X)" in ax.get_title() and "nats per sequence" in ax.get_title()
    legend = ax.get_legend()
    text = " ".join(t.get_text() for t in legend.get_texts())
    assert "(reference)" not in text and text.count("reference log p(X)") == 1
    assert f"{res.exact / res.N:.3f}" in text
    # every shaded band has its curve's colour, as the legend shows it
    lines = {ln.get_label(): to_rgb(ln.get_color()) for ln in ax.lines if ln.get_label()[0] != "_"}
    fills = [c for c in ax.collections if isinstance(c, PolyCollection)]
    curve_colours = {c for label, c in lines.items() if label.startswith("S(m)")}
    for f in fills:
        assert tuple(np.round(f.get_facecolor()[0][:3], 6)) in {
            tuple(np.round(c, 6)) for c in curve_colours
        }
    handles = legend.legend_handles
    patch_colours = {
        tuple(np.round(h.get_facecolor()[:3], 6))
        for h in handles
        if hasattr(h, "get_facecolor") and not hasattr(h, "get_xdata")
    }
    assert patch_colours <= {tuple(np.round(c, 6)) for c in curve_colours}


def test_demo_figure_has_the_reference_line(curve_and_exact, tmp_path):
    curve, exact = curve_and_exact
    N = int(curve.per_sequence.shape[0])
    results = {"mpt": float(curve.area), "trained": exact, "num_data": N}
    path = tmp_path / "demo.png"
    fig = cli._save_curve(curve, results, str(path))
    assert path.stat().st_size > 0
    ax = fig.axes[0]
    level = exact / N / curve.num_tokens
    assert any(np.allclose(ln.get_ydata(), level) for ln in ax.lines)
    assert "reference log p(X)" in " ".join(_labels(ax))

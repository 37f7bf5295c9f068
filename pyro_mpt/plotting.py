r"""Figures: the masked pre-training curve :math:`S(m)` and the bias of fixed mask rates.

Every function takes ``ax=None`` and returns the :class:`matplotlib.axes.Axes` it drew on; it
makes a figure of its own (``matplotlib.pyplot.subplots``) only when no ``ax`` is given, and
never changes matplotlib's global ``rcParams``. matplotlib is imported inside the functions,
so ``import pyro_mpt`` does not need it (``pip install pyro-mpt[plots]``).

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520 (Figure 2: the curve and its area).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .options import check_bool, check_choice

if TYPE_CHECKING:
    import numpy as np
    import torch
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["bare_axes", "plot_curve", "plot_fixed_rate_bias", "reference_parts"]


def _new_axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib; install it with `pip install pyro-mpt[plots]`"
        ) from None
    _, ax = plt.subplots(figsize=(6.0, 4.0), layout="constrained")
    return ax


def bare_axes(
    ax: Axes | None = None, figsize: tuple[float, float] = (7.0, 4.5)
) -> tuple[Figure, Axes]:
    """``(fig, ax)``: ``ax`` and its figure, or a new bare
    :class:`matplotlib.figure.Figure` with one Axes, which no pyplot state holds (the
    experiments' figures, saved to files)."""
    if ax is not None:
        return ax.figure, ax
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "the figure needs matplotlib; install it with `pip install pyro-mpt[plots]`"
        ) from None
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def reference_parts(
    reference: Any,
) -> tuple[float, float, str, bool, float | None, float | None]:
    """``(value, stderr, method, trustworthy, khat_max, khat_threshold)`` of a reference given
    as a number, a tensor or an :class:`~pyro_mpt.LMLEstimate`-like object."""
    if hasattr(reference, "total"):
        value = float(reference.total)
        stderr = float(getattr(reference, "stderr", 0.0) or 0.0)
        method = str(getattr(reference, "method", "reference"))
        trustworthy = bool(getattr(reference, "trustworthy", True))
        khat = getattr(reference, "khat", None)
        khat_max = None if khat is None else float(khat.max())
        threshold = getattr(reference, "khat_threshold", None)
        threshold = None if threshold is None else float(threshold)
        return value, stderr, method, trustworthy, khat_max, threshold
    return float(reference), 0.0, "reference", True, None, None


def plot_curve(
    curve: Any,
    reference: Any = None,
    ax: Axes | None = None,
    *,
    per_sequence: bool = False,
    color: Any = None,
    label: str | None = None,
    shade: str = "area",
) -> Axes:
    r"""The paper's curve figure: :math:`S(m)` against the mask rate :math:`m/T`, with a
    :math:`\pm 1` standard-error band, the area under it shaded, and the reference log
    marginal likelihood marked.

    On the rate axis each size is a column of width :math:`1/T`, so the area under the curve
    is :math:`\frac1T\sum_m S(m) = \widehat{\log p(X)}/T`. The reference is drawn as the
    horizontal line at :math:`\log p(X) / T`: the rectangle under it over :math:`[0, 1]` has
    the area the curve should have. The legend gives the area, the reference and their
    difference in nats. An untrustworthy reference (``trustworthy=False``) is drawn dashed
    in red and labelled ``UNRELIABLE``.

    :param curve: an :class:`~pyro_mpt.MPTCurve`.
    :param reference: optional reference :math:`\log p(X)`: a number, a tensor, or an
        :class:`~pyro_mpt.LMLEstimate` (its method, standard error and trust flag
        are shown).
    :param ax: a :class:`matplotlib.axes.Axes`; a new figure when ``None``.
    :param bool per_sequence: divide by the number of sequences ``N`` (nats per sequence).
    :param color: the curve's colour (matplotlib's cycle by default).
    :param str label: the curve's legend label (default ``"S(m)"``).
    :param str shade: ``"area"`` (default): the area under the curve shaded down to 0, the
        paper's picture of :math:`\sum_m S(m)`, with the s.e. band; ``"band"``: only the
        :math:`\pm 1` s.e. band around the curve and the y axis fitted to the curve (the
        area goes in the curve's legend label), which shows the curve's shape where shading
        from 0 would flatten it into a thin band; ``"none"``: the curve alone.
    :returns: the :class:`~matplotlib.axes.Axes`.

    Example::

        curve = mpt_curve(ppca_collapsed, X, 2, num_masks=8)
        ref = log_marginal_likelihood(ppca_collapsed, X, 2)
        ax = plot_curve(curve, ref)
    """
    check_bool("per_sequence", per_sequence)
    check_choice("shade", shade, ("area", "band", "none"))
    ax = _new_axes(ax)
    T = curve.num_tokens
    N = int(curve.per_sequence.shape[0])
    div = N if per_sequence else 1
    rates = _numpy(curve.mask_rates)
    scores = _numpy(curve.scores) / div
    stderr = _numpy(curve.stderr) / div
    area = float(curve.area) / div
    area_se = float(curve.area_stderr) / div

    area_text = f"area Σ_m S(m) = {area:.3f}"
    if math.isfinite(area_se) and area_se > 0:
        area_text += f" ± {area_se:.3f}"
    label = label or "S(m)"
    (line,) = ax.plot(
        rates,
        scores,
        marker="o" if T <= 40 else None,
        markersize=3,
        color=color,
        label=label if shade == "area" else f"{label}; {area_text}",
        zorder=3,
    )
    color = line.get_color()
    if shade == "area":
        ax.fill_between(rates, scores, 0.0, color=color, alpha=0.15, linewidth=0, label=area_text)
    finite = stderr == stderr  # not NaN (one mask per size has no standard error)
    if shade != "none" and finite.any() and (stderr[finite] > 0).any():
        ax.fill_between(
            rates,
            scores - stderr,
            scores + stderr,
            where=finite,
            color=color,
            alpha=0.35,
            linewidth=0,
            label="± 1 s.e.",
        )
    if reference is not None:
        _reference_line(ax, reference, div, T, area)
    if shade == "area":  # elsewhere a line at 0 would pull the y axis away from the curve
        ax.axhline(0.0, color="grey", linewidth=0.6, zorder=1)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("mask rate m / T")
    unit = "nats per sequence" if per_sequence else f"nats, summed over {N} sequences"
    ax.set_ylabel(f"S(m) [{unit}]")
    ax.set_title(f"Masked pre-training curve (T = {T})")
    ax.legend(loc="best", fontsize="small")
    return ax


def _reference_line(ax, reference, div, T, area):
    """The reference :math:`\\log p(X)` as a horizontal line at :math:`\\log p(X) / T`,
    with its value, method and trust in the legend."""
    value, ref_se, method, trustworthy, khat_max, threshold = reference_parts(reference)
    value /= div
    ref_se /= div
    text = f"reference log p(X) = {value:.3f}"
    if ref_se > 0:
        text += f" ± {ref_se:.3f}"
    # a bare number has no method: "(reference)" would repeat the word
    text += "" if method == "reference" else f" ({method})"
    text += f"\nline at log p(X) / T; area − reference = {area - value:+.3f}"
    if not trustworthy:
        detail = ""
        if khat_max is not None and threshold is not None:
            detail = f" (k-hat {khat_max:.2f} > {threshold:.2f})"
        text = "UNRELIABLE" + detail + "\n" + text
    ax.axhline(
        value / T,
        color="black" if trustworthy else "tab:red",
        linestyle="-" if trustworthy else "--",
        linewidth=1.2,
        label=text,
        zorder=2,
    )


def plot_fixed_rate_bias(
    report: Any, ax: Axes | None = None, *, per_sequence: bool = False
) -> Axes:
    r"""The bias of a fixed mask rate, :math:`T\,S(m) - \log p(X)`, against the rate
    :math:`m/T` (the line: every size of the curve, with a :math:`\pm 1` s.e. band), with the
    report's fixed rates as points with error bars. Zero is the unbiased level; only the
    cumulative estimators (the curve's area) reach it on average.

    :param report: an :class:`~pyro_mpt.EvaluationReport` with a curve.
    :param ax: a :class:`matplotlib.axes.Axes`; a new figure when ``None``.
    :param bool per_sequence: divide by the number of sequences.
    :returns: the :class:`~matplotlib.axes.Axes`.

    Example::

        report = evaluate(ppca_collapsed, X, 2, fixed_rates=(0.15, 0.5))
        ax = plot_fixed_rate_bias(report)
    """
    check_bool("per_sequence", per_sequence)
    curve = report.curve
    if curve is None:
        raise ValueError(
            "plot_fixed_rate_bias needs the report's curve; evaluate() was run with "
            "curve_masks=None: pass curve_masks >= 1"
        )
    ax = _new_axes(ax)
    T = curve.num_tokens
    N = int(curve.per_sequence.shape[0])
    div = N if per_sequence else 1
    value, ref_se, method, trustworthy, _, _ = reference_parts(report.reference)
    rates = _numpy(curve.mask_rates)
    bias = (T * _numpy(curve.scores) - value) / div
    se = T * _numpy(curve.stderr) / div
    se = (se**2 + (ref_se / div) ** 2) ** 0.5
    (line,) = ax.plot(rates, bias, color="tab:blue", label="T·S(m) − reference, every m")
    finite = se == se
    if finite.any() and (se[finite] > 0).any():
        ax.fill_between(
            rates,
            bias - se,
            bias + se,
            where=finite,
            color=line.get_color(),
            alpha=0.25,
            linewidth=0,
            label="± 1 s.e.",
        )
    rows = report.fixed_rates
    if rows:
        xs = [row.mask_size / T for row in rows]
        ys = [row.bias / div for row in rows]
        yerr = [row.bias_stderr / div if math.isfinite(row.bias_stderr) else 0.0 for row in rows]
        ax.errorbar(xs, ys, yerr=yerr, fmt="o", color="tab:orange", capsize=3, label="fixed rates")
        for row, x, y in zip(rows, xs, ys):
            ax.annotate(
                f"{row.rate:.0%}: {y:+.2f}",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="small",
            )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("mask rate m / T")
    unit = "nats per sequence" if per_sequence else "nats"
    title = f"Bias of a fixed mask rate against the {method} reference"
    if not trustworthy:
        title += " (UNRELIABLE reference)"
    ax.set_title(title, fontsize="medium")
    ax.set_ylabel(f"T·S(m) − log p(X) [{unit}]")
    ax.legend(loc="best", fontsize="small")
    return ax

r"""The result of :func:`~pyro_mpt.evaluate`: :class:`EvaluationReport` and its rows, and
their text.

The report only holds and prints numbers; :func:`~pyro_mpt.evaluate` (in
:mod:`pyro_mpt.evaluator`) computes them, :mod:`pyro_mpt.export` turns a report into an
:class:`arviz.InferenceData` and :mod:`pyro_mpt.plotting` draws it.

The reference is :math:`\log p(X) = \sum_n \log p(x_n)`; each masked estimator estimates it
by :math:`\sum_m S(m)` with
:math:`S(m) = \mathbb E_{|M|=m}\big[\frac1m\sum_{j\in M}\log p(x_j\mid x_{-M})\big]`.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import export, plotting
from .curve import MPTCurve
from .export import draws_variable

if TYPE_CHECKING:
    import arviz
    from matplotlib.axes import Axes

__all__ = ["EstimatorResult", "EvaluationReport", "FixedRateBias", "draws_variable"]


@dataclass(eq=False)
class EstimatorResult:
    r"""One masked estimator against the reference.

    :ivar str name: the estimator (``"stratified"``, ``"uniform"``, ``"chain"``, ...).
    :ivar float value: its estimate of :math:`\log p(X)` (summed over sequences).
    :ivar float stderr: its Monte Carlo standard error (NaN with ``num_masks=1``).
    :ivar float difference: ``value - reference``.
    :ivar float difference_stderr: :math:`\sqrt{\mathrm{se}^2 + \mathrm{se}_\mathrm{ref}^2}`.
    :ivar float z_score: ``difference / difference_stderr``; NaN when neither side has a
        Monte Carlo error above rounding (see :func:`~pyro_mpt.evaluate`).
    :ivar int num_masks: the independent draws of the estimator.
    :ivar str conditionals: the conditional backend that ran.
    :ivar bool unbiased: whether its expectation is :math:`\log p(X)`.
    :ivar float seconds: wall time.
    :ivar estimate: the full :class:`~pyro_mpt.MPTEstimate` (draws, per-sequence values).
    :ivar float dof: the degrees of freedom of ``difference_stderr`` (Welch-Satterthwaite
        of the estimate's and the reference's).
    :ivar str verdict: ``"ok"`` when the difference lies within its 95% Student-t interval
        (:func:`pyro_mpt.intervals.verdict`), ``"check"`` when not, ``"n/a"`` without a
        standard error.

    Example::

        report = evaluate(ppca_collapsed, X, 2)       # X: (N, T)
        row = report.estimators["stratified"]
        row.value, row.stderr, row.z_score
    """

    name: str
    value: float
    stderr: float
    difference: float
    difference_stderr: float
    z_score: float
    num_masks: int
    conditionals: str
    unbiased: bool
    seconds: float
    estimate: object = field(repr=False)
    dof: float = math.inf
    verdict: str = "n/a"


@dataclass
class FixedRateBias:
    r"""What a fixed mask rate :math:`r` estimates, :math:`T\,S(m)` with
    :math:`m = \max(1, \mathrm{round}(rT))`, and its bias against the reference.

    :ivar float rate: :math:`r`.
    :ivar int mask_size: :math:`m`.
    :ivar float estimate: :math:`T\,S(m)` from the curve (``curve.fixed_rate_estimate(r)``).
    :ivar float stderr: its standard error, :math:`T\,\mathrm{se}(S(m))`.
    :ivar float bias: ``estimate - reference``.
    :ivar float bias_stderr: :math:`\sqrt{\mathrm{se}^2 + \mathrm{se}_\mathrm{ref}^2}`.

    Example::

        report = evaluate(ppca_collapsed, X, 2, fixed_rates=(0.15,))
        row = report.fixed_rates[0]
        row.mask_size, row.bias, row.bias_stderr
    """

    rate: float
    mask_size: int
    estimate: float
    stderr: float
    bias: float
    bias_stderr: float


@dataclass(eq=False)
class EvaluationReport:
    r"""The result of :func:`~pyro_mpt.evaluate`.

    :ivar reference: the :class:`~pyro_mpt.LMLEstimate`.
    :ivar dict estimators: name -> :class:`EstimatorResult`, in the order requested.
    :ivar curve: the :class:`~pyro_mpt.MPTCurve` (``None`` when ``curve_masks=None``).
    :ivar list fixed_rates: :class:`FixedRateBias` rows, one per requested rate.
    :ivar dict timings: seconds per part (``"reference"``, each estimator's name,
        ``"curve"``, ``"total"``); CUDA work is synchronised before each clock read.
    :ivar str device: where the work ran.
    :ivar int num_sequences: ``N``.
    :ivar int num_tokens: ``T`` (``None`` without a curve; the summary then prints the
        estimates' ``T``, or none).
    :ivar dict settings: the options :func:`~pyro_mpt.evaluate` was called with.

    ``str(report)`` and :meth:`summary` give the table; :meth:`to_inference_data` an
    :class:`arviz.InferenceData`; :meth:`plot` the curve figure.

    Example::

        report = evaluate(ppca_collapsed, X, 2)       # X: (N, T)
        print(report.summary())
        report.reference.total, report.curve.area
    """

    reference: object
    estimators: dict
    curve: MPTCurve | None
    fixed_rates: list
    timings: dict
    device: str
    num_sequences: int
    num_tokens: int | None
    settings: dict = field(default_factory=dict)

    @property
    def reference_status(self) -> str:
        """``"ok"``, or ``"UNRELIABLE (k-hat ... > ...)"`` when the reference cannot be trusted."""
        ref = self.reference
        if getattr(ref, "trustworthy", True):
            return "ok"
        reasons = []
        khat = getattr(ref, "khat", None)
        threshold = getattr(ref, "khat_threshold", None)
        if khat is not None and threshold is not None:
            kmax = float(khat.max())
            if not kmax <= float(threshold):  # also catches NaN
                reasons.append(f"k-hat {kmax:.2f} > {float(threshold):.2f}")
        ess = getattr(ref, "ess", None)
        if ess is not None:
            reasons.append(f"min ESS {float(ess.min()):.1f} of {ref.num_samples} particles")
        drift = getattr(ref, "drift", None)  # the SMC reference's particle-count check
        if drift is not None and drift.failed:
            reasons.append(f"drifts +{drift.drift:.2f} from {drift.num_particles} particles")
        return "UNRELIABLE" + (f" ({', '.join(reasons)})" if reasons else "")

    def summary(self) -> str:
        """A fixed-width text table of every number in the report.

        Values and standard errors are printed with 3 decimals, z-scores with 2 and a sign,
        times in seconds with 4. A reference that its diagnostics flag is printed as
        ``UNRELIABLE (...)``, and the z-scores against it are marked as meaningless.

        :returns: ``str``.
        """
        # without a curve the estimates know T from the data; with neither, say nothing
        counts = (getattr(r.estimate, "num_tokens", None) for r in self.estimators.values())
        T = next((t for t in (self.num_tokens, *counts) if t is not None), None)
        T = "" if T is None else f"T = {T} tokens, "
        lines = [f"MPT evaluation: N = {self.num_sequences} sequences, {T}device {self.device}"]
        lines += _reference_lines(self)
        lines += _estimator_lines(self)
        lines += _curve_lines(self)
        lines += _fixed_rate_lines(self)
        lines += ["", "Timings [s]"]
        lines.append(
            "  " + "  ".join(f"{part} {_fmt(sec, '.4f')}" for part, sec in self.timings.items())
        )
        messages = list(getattr(self.reference, "messages", None) or [])
        if messages:
            lines += ["", "Reference messages"] + [f"  - {m}" for m in messages]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        names = ", ".join(self.estimators)
        return (
            f"EvaluationReport(reference={self.reference.method} {float(self.reference.total):.3f}"
            f" [{self.reference_status}], estimators=[{names}], device={self.device})"
        )

    def to_inference_data(self) -> arviz.InferenceData:
        """The report's arrays as an :class:`arviz.InferenceData`: see
        :func:`pyro_mpt.export.to_inference_data`."""
        return export.to_inference_data(self)

    def plot(self, ax: Axes | None = None, **kwargs: Any) -> Axes:
        """The curve figure (:func:`pyro_mpt.plotting.plot_curve`) with this report's
        reference marked; returns the Axes.

        :raises ValueError: when the report has no curve."""
        if self.curve is None:
            raise ValueError(
                "this report has no curve (evaluate() ran with curve_masks=None); "
                "pass curve_masks >= 1"
            )
        return plotting.plot_curve(self.curve, reference=self.reference, ax=ax, **kwargs)

    def plot_fixed_rate_bias(self, ax: Axes | None = None, **kwargs: Any) -> Axes:
        """:func:`pyro_mpt.plotting.plot_fixed_rate_bias` of this report."""
        return plotting.plot_fixed_rate_bias(self, ax=ax, **kwargs)


# ----------------------------------------------------------------------------------------
# The summary's sections
# ----------------------------------------------------------------------------------------


def _fmt(x, spec=".3f"):
    return format(float(x), spec)


def _fmt_z(z):
    return "n/a" if math.isnan(z) else format(z, "+.2f")


def _reference_lines(report):
    ref = report.reference
    draws = ""
    if ref.method == "importance":
        draws = f"{ref.num_samples} particles"
    elif ref.method == "quadrature":
        draws = f"{ref.num_samples} grid points"
    lines = [
        "",
        "Reference log p(X)",
        f"  {'method':<12} {'log p(X)':>14} {'s.e.':>10}  {'':<16} status",
        f"  {ref.method:<12} {_fmt(ref.total):>14} {_fmt(ref.stderr):>10}  "
        f"{draws:<16} {report.reference_status}",
    ]
    diagnostics = []
    if getattr(ref, "khat", None) is not None:
        diagnostics.append(
            f"k-hat max {_fmt(ref.khat.max())} (threshold {_fmt(ref.khat_threshold)})"
        )
    if getattr(ref, "ess", None) is not None:
        diagnostics.append(f"ESS min {_fmt(ref.ess.min(), '.1f')}")
    if diagnostics:
        lines.append("  " + ", ".join(diagnostics))
    return lines


def _estimator_lines(report):
    rows = list(report.estimators.values())
    if not rows:
        return []
    lines = [
        "",
        "Masked estimators (estimate - reference; z = difference / its s.e.)",
        f"  {'estimator':<12} {'masks':>5} {'conditionals':<12} {'log p(X)':>14} "
        f"{'s.e.':>10} {'- reference':>12} {'s.e.':>10} {'z':>8}",
    ]
    for r in rows:
        name = r.name if r.unbiased else r.name + "*"
        lines.append(
            f"  {name:<12} {r.num_masks:>5} {r.conditionals:<12} {_fmt(r.value):>14} "
            f"{_fmt(r.stderr):>10} {_fmt(r.difference, '+.3f'):>12} "
            f"{_fmt(r.difference_stderr):>10} {_fmt_z(r.z_score):>8}"
        )
    lines += _interval_notes(report, rows)
    if any(not r.unbiased for r in rows):
        lines.append("  * biased: its expectation is not log p(X)")
    if any(r.conditionals == "mixed" for r in rows):
        lines.append(
            "  s.e. of mixed conditionals covers the masks' randomness only: their draws "
            f"(mpt_samples = {report.settings.get('mpt_samples')}) add a particle error "
            "(O(1/S) bias) that it does not include"
        )
    if not getattr(report.reference, "trustworthy", True):
        lines.append("  (z-scores against an UNRELIABLE reference are not meaningful)")
    return lines


def _fmt_dof(dof):
    return "n/a" if math.isnan(dof) else ("inf" if dof > 1e6 else f"{dof:.0f}")


#: Below this many degrees of freedom the summary says that Student-t was used.
SMALL_DOF = 30


def _interval_notes(report, rows):
    """The summary's notes on how the intervals were made."""
    verdicts = ", ".join(f"{r.name} {r.verdict} (dof {_fmt_dof(r.dof)})" for r in rows)
    lines = [f"  verdict (difference within its 95% interval): {verdicts}"]
    small = [r for r in rows if r.dof < SMALL_DOF]
    if small:
        dofs = ", ".join(f"{r.name} {_fmt_dof(r.dof)}" for r in small)
        lines.append(
            f"  intervals: Student-t, dof={dofs} (few independent draws: raise num_masks "
            "for tighter ones)"
        )
    if report.settings.get("share_masks"):
        lines.append(
            "  masks were shared by all sequences: s.e. and dof come from the draws' totals "
            "(dof = num_masks - 1), not from the sequences"
        )
    if any(r.conditionals == "importance" for r in rows):
        lines.append(
            "  s.e. includes the particle error of the importance conditionals "
            f"(mpt_samples = {report.settings.get('mpt_samples')}) from independent "
            "particle groups, and their jackknife bias is subtracted (the interval widened "
            "for the bias's unknown rate where the conditionals are degenerate)"
        )
    return lines


def _curve_lines(report):
    c = report.curve
    if c is None:
        return []
    masks = "exhaustive" if c.exhaustive else f"{report.settings.get('curve_masks')} masks"
    difference = float(c.area) - float(report.reference.total)
    return [
        "",
        f"Curve S(m), m = 1..{c.num_tokens} ({masks} per size, {c.conditionals})",
        f"  area sum_m S(m) {_fmt(c.area):>14} +- {_fmt(c.area_stderr)} "
        f"(dof {_fmt_dof(getattr(c, 'area_dof', math.inf))})   "
        f"- reference {_fmt(difference, '+.3f')}",
    ]


def _fixed_rate_lines(report):
    if not report.fixed_rates:
        return []
    lines = [
        "",
        "Fixed mask rates: T*S(m) and its bias against the reference",
        f"  {'rate':>6} {'m':>5} {'T*S(m)':>14} {'s.e.':>10} {'bias':>12} "
        f"{'s.e.':>10} {'bias/seq':>10}",
    ]
    for b in report.fixed_rates:
        lines.append(
            f"  {b.rate:>6.3f} {b.mask_size:>5} {_fmt(b.estimate):>14} "
            f"{_fmt(b.stderr):>10} {_fmt(b.bias, '+.3f'):>12} "
            f"{_fmt(b.bias_stderr):>10} {_fmt(b.bias / report.num_sequences, '+.4f'):>10}"
        )
    return lines


def __getattr__(name: str) -> Any:
    """``evaluate`` and ``compare`` live in :mod:`pyro_mpt.evaluator` (which imports this
    module); ``from pyro_mpt.report import evaluate`` still works for one release, resolved
    lazily, with a ``DeprecationWarning``."""
    if name in ("evaluate", "compare"):
        import warnings

        from . import evaluator

        warnings.warn(
            f"pyro_mpt.report.{name} is deprecated; import it from pyro_mpt (or "
            "pyro_mpt.evaluator)",
            DeprecationWarning,
            stacklevel=2,
        )

        return getattr(evaluator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

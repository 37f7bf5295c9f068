r"""``evaluate`` and ``compare``: how far masked pre-training (MPT) is from the log marginal
likelihood (LML) of a given model and data set.

:func:`evaluate` puts, side by side, a reference :math:`\log p(X)` (exact, importance or
quadrature; :func:`~pyro_mpt.evaluation.log_marginal_likelihood`), the unbiased masked
estimators (:class:`~pyro_mpt.MaskedELBO`), the curve :math:`S(m)` whose area is the LML
(:func:`~pyro_mpt.mpt_curve`) and the bias of fixed mask rates, with standard errors,
timings and the device. :func:`compare` ranks models by their LML, as :func:`arviz.compare`
ranks them by LOO.

References

[1] P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
Likelihood", NeurIPS 2023, arXiv:2306.00520.

[2] E. Fong, C. Holmes, "On the marginal likelihood and cross-validation", Biometrika
107(2), 2020.
"""

import math
import re
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

from .curve import MPTCurve, mpt_curve
from .estimators import check_mask_rate, get_estimator
from .evaluation import log_marginal_likelihood
from .masked_elbo import MaskedELBO

__all__ = ["EstimatorResult", "EvaluationReport", "FixedRateBias", "compare", "evaluate"]


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class EstimatorResult:
    r"""One masked estimator against the reference.

    :ivar str name: the estimator (``"stratified"``, ``"uniform"``, ``"chain"``, ...).
    :ivar float value: its estimate of :math:`\log p(X)` (summed over sequences).
    :ivar float stderr: its Monte Carlo standard error (NaN with ``num_masks=1``).
    :ivar float difference: ``value - reference``.
    :ivar float difference_stderr: :math:`\sqrt{\mathrm{se}^2 + \mathrm{se}_\mathrm{ref}^2}`.
    :ivar float z_score: ``difference / difference_stderr``; NaN when neither side has a
        Monte Carlo error above rounding (see :func:`evaluate`).
    :ivar bool unbiased: whether its expectation is :math:`\log p(X)`.
    :ivar float seconds: wall time.
    :ivar estimate: the full :class:`~pyro_mpt.MPTEstimate` (draws, per-sequence values).

    Example::

        report = evaluate(ppca_collapsed, X, 2)       # X: (N, T)
        row = report.estimators["stratified"]
        row.value, row.stderr, row.z_score

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
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

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """

    rate: float
    mask_size: int
    estimate: float
    stderr: float
    bias: float
    bias_stderr: float


def draws_variable(name):
    """The variable of an estimator's draws in :meth:`EvaluationReport.to_inference_data`:
    ``"mpt_" + name`` with every character outside ``[A-Za-z0-9_]`` replaced by ``_``
    (``"chain"`` -> ``"mpt_chain"``, which would clash with arviz's ``chain`` dimension;
    ``"fixed(0.15)"`` -> ``"mpt_fixed_0_15_"``)."""
    return "mpt_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def _fmt(x, spec=".3f"):
    return format(float(x), spec)


def _fmt_z(z):
    return "n/a" if math.isnan(z) else format(z, "+.2f")


@dataclass(eq=False)
class EvaluationReport:
    r"""The result of :func:`evaluate`.

    :ivar reference: the :class:`~pyro_mpt.evaluation.LMLEstimate`.
    :ivar dict estimators: name -> :class:`EstimatorResult`, in the order requested.
    :ivar curve: the :class:`~pyro_mpt.MPTCurve` (``None`` when ``curve_masks=None``).
    :ivar list fixed_rates: :class:`FixedRateBias` rows, one per requested rate.
    :ivar dict timings: seconds per part (``"reference"``, each estimator's name,
        ``"curve"``, ``"total"``); CUDA work is synchronised before each clock read.
    :ivar str device: where the work ran.
    :ivar int num_sequences: ``N``.
    :ivar int num_tokens: ``T`` (``None`` without a curve).
    :ivar dict settings: the options :func:`evaluate` was called with.

    ``str(report)`` and :meth:`summary` give the table; :meth:`to_inference_data` an
    :class:`arviz.InferenceData`; :meth:`plot` the curve figure.

    The reference is :math:`\log p(X) = \sum_n \log p(x_n)`; each masked estimator estimates it
    by :math:`\sum_m S(m)` (Moreno-Muñoz et al. 2023), with
    :math:`S(m) = \mathbb E_{|M|=m}\big[\frac1m\sum_{j\in M}\log p(x_j\mid x_{-M})\big]`.

    Example::

        report = evaluate(ppca_collapsed, X, 2)       # X: (N, T)
        print(report.summary())
        report.reference.total, report.curve.area

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """

    reference: object
    estimators: dict
    curve: MPTCurve
    fixed_rates: list
    timings: dict
    device: str
    num_sequences: int
    num_tokens: int
    settings: dict = field(default_factory=dict)

    # -- text ------------------------------------------------------------------------------

    @property
    def reference_status(self):
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
            reasons.append(f"min ESS {float(ess.min()):.1f} of {ref.num_particles} particles")
        return "UNRELIABLE" + (f" ({', '.join(reasons)})" if reasons else "")

    def summary(self):
        """A fixed-width text table of every number in the report.

        Values and standard errors are printed with 3 decimals, z-scores with 2 and a sign,
        times in seconds with 4. A reference that its diagnostics flag is printed as
        ``UNRELIABLE (...)``, and the z-scores against it are marked as meaningless.

        :returns: ``str``.
        """
        ref = self.reference
        trusted = bool(getattr(ref, "trustworthy", True))
        T = "?" if self.num_tokens is None else self.num_tokens
        lines = [
            f"MPT evaluation: N = {self.num_sequences} sequences, T = {T} tokens, "
            f"device {self.device}",
            "",
            "Reference log p(X)",
        ]
        particles = ""
        if ref.method == "importance":
            particles = f"{ref.num_particles} particles"
        elif ref.method == "quadrature":
            particles = f"{ref.num_particles} grid points"
        lines.append(f"  {'method':<12} {'log p(X)':>14} {'s.e.':>10}  {'':<16} status")
        lines.append(
            f"  {ref.method:<12} {_fmt(ref.total):>14} {_fmt(ref.stderr):>10}  "
            f"{particles:<16} {self.reference_status}"
        )
        diagnostics = []
        if getattr(ref, "khat", None) is not None:
            diagnostics.append(
                f"k-hat max {_fmt(ref.khat.max())} (threshold {_fmt(ref.khat_threshold)})"
            )
        if getattr(ref, "ess", None) is not None:
            diagnostics.append(f"ESS min {_fmt(ref.ess.min(), '.1f')}")
        if diagnostics:
            lines.append("  " + ", ".join(diagnostics))
        if self.estimators:
            lines += [
                "",
                "Masked estimators (estimate - reference; z = difference / its s.e.)",
                f"  {'estimator':<12} {'masks':>5} {'conditionals':<12} {'log p(X)':>14} "
                f"{'s.e.':>10} {'- reference':>12} {'s.e.':>10} {'z':>8}",
            ]
            for r in self.estimators.values():
                name = r.name if r.unbiased else r.name + "*"
                lines.append(
                    f"  {name:<12} {r.num_masks:>5} {r.conditionals:<12} {_fmt(r.value):>14} "
                    f"{_fmt(r.stderr):>10} {_fmt(r.difference, '+.3f'):>12} "
                    f"{_fmt(r.difference_stderr):>10} {_fmt_z(r.z_score):>8}"
                )
            if any(not r.unbiased for r in self.estimators.values()):
                lines.append("  * biased: its expectation is not log p(X)")
            if any(r.conditionals == "importance" for r in self.estimators.values()):
                lines.append(
                    "  s.e. covers the masks' randomness only: importance conditionals "
                    f"(mpt_particles = {self.settings.get('mpt_particles')}) add a particle "
                    "error (O(1/S) bias) that it does not include"
                )
            if not trusted:
                lines.append("  (z-scores against an UNRELIABLE reference are not meaningful)")
        if self.curve is not None:
            c = self.curve
            masks = "exhaustive" if c.exhaustive else f"{self.settings.get('curve_masks')} masks"
            lines += [
                "",
                f"Curve S(m), m = 1..{c.num_tokens} ({masks} per size, {c.conditionals})",
                f"  area sum_m S(m) {_fmt(c.area):>14} +- {_fmt(c.area_stderr)}   "
                f"- reference {_fmt(float(c.area) - float(ref.total), '+.3f')}",
            ]
        if self.fixed_rates:
            lines += [
                "",
                "Fixed mask rates: T*S(m) and its bias against the reference",
                f"  {'rate':>6} {'m':>5} {'T*S(m)':>14} {'s.e.':>10} {'bias':>12} "
                f"{'s.e.':>10} {'bias/seq':>10}",
            ]
            for b in self.fixed_rates:
                lines.append(
                    f"  {b.rate:>6.3f} {b.mask_size:>5} {_fmt(b.estimate):>14} "
                    f"{_fmt(b.stderr):>10} {_fmt(b.bias, '+.3f'):>12} "
                    f"{_fmt(b.bias_stderr):>10} {_fmt(b.bias / self.num_sequences, '+.4f'):>10}"
                )
        lines += ["", "Timings [s]"]
        lines.append(
            "  " + "  ".join(f"{part} {_fmt(sec, '.4f')}" for part, sec in self.timings.items())
        )
        messages = list(getattr(ref, "messages", None) or [])
        if messages:
            lines += ["", "Reference messages"] + [f"  - {m}" for m in messages]
        return "\n".join(lines)

    def __str__(self):
        return self.summary()

    def __repr__(self):
        names = ", ".join(self.estimators)
        return (
            f"EvaluationReport(reference={self.reference.method} {float(self.reference.total):.3f}"
            f" [{self.reference_status}], estimators=[{names}], device={self.device})"
        )

    # -- arviz -----------------------------------------------------------------------------

    def to_inference_data(self):
        """The report's arrays as an :class:`arviz.InferenceData`.

        Groups (custom groups of the arviz schema):

        - ``mpt``: ``curve`` ``(sequence, mask_size)`` :math:`S_n(m)`; ``curve_total``
          ``(mask_size)`` :math:`S(m)` summed over sequences, ``curve_stderr``; coordinate
          ``mask_rate``; attributes ``area``, ``area_stderr``, ``fixed_rate_*``.
        - ``mpt_draws``: one variable per estimator, ``mpt_<name>`` (:func:`draws_variable`),
          ``(chain, draw, sequence)`` with one chain and ``num_masks`` independent draws, so
          ``arviz.summary(idata, group="mpt_draws")`` and ``arviz.ess`` apply; attributes
          hold each total, s.e. and z-score.
        - ``reference``: ``per_sequence``, ``per_sequence_stderr``, ``ess``, ``khat``
          ``(sequence)`` and ``log_weights`` ``(particle, sequence)`` when the method has
          them (rename ``particle`` to ``__sample__`` for :func:`arviz.psislw`); attributes
          ``method``, ``total``, ``stderr``, ``trustworthy`` (0/1), ``khat_threshold``.

        Attributes are numbers and strings only, so ``idata.to_netcdf`` works.
        """
        import numpy as np
        import xarray as xr

        az = _import_arviz()

        def arr(t):
            return t.detach().cpu().numpy()

        N = self.num_sequences
        seq = np.arange(N)
        groups = {}
        ref = self.reference

        if self.curve is not None:
            c = self.curve
            sizes = arr(c.sizes)
            attrs = {
                "area": float(c.area),
                "area_stderr": float(c.area_stderr),
                "exhaustive": int(c.exhaustive),
                "conditionals": c.conditionals,
                "num_tokens": c.num_tokens,
            }
            for b in self.fixed_rates:
                key = f"fixed_rate_{b.rate:g}"
                attrs[key + "_mask_size"] = b.mask_size
                attrs[key + "_estimate"] = b.estimate
                attrs[key + "_bias"] = b.bias
                attrs[key + "_bias_stderr"] = b.bias_stderr
            groups["mpt"] = xr.Dataset(
                {
                    "curve": (("sequence", "mask_size"), arr(c.per_sequence)),
                    "curve_total": (("mask_size",), arr(c.scores)),
                    "curve_stderr": (("mask_size",), arr(c.stderr)),
                },
                coords={
                    "sequence": seq,
                    "mask_size": sizes,
                    "mask_rate": ("mask_size", arr(c.mask_rates)),
                },
                attrs=attrs,
            )

        if self.estimators:
            data, attrs = {}, {}
            for name, r in self.estimators.items():
                draws = arr(r.estimate.draws)  # (K, N)
                var = draws_variable(name)
                data[var] = (("chain", "draw", "sequence"), draws[None])
                attrs[f"{var}_total"] = r.value
                attrs[f"{var}_stderr"] = r.stderr
                attrs[f"{var}_z_score"] = r.z_score
                attrs[f"{var}_conditionals"] = r.conditionals
            K = next(iter(self.estimators.values())).num_masks
            groups["mpt_draws"] = xr.Dataset(
                data,
                coords={"chain": [0], "draw": np.arange(K), "sequence": seq},
                attrs=attrs,
            )

        data = {
            "per_sequence": (("sequence",), arr(ref.per_sequence)),
            "per_sequence_stderr": (("sequence",), arr(ref.per_sequence_stderr)),
        }
        coords = {"sequence": seq}
        for name in ("ess", "khat"):
            value = getattr(ref, name, None)
            if value is not None:
                data[name] = (("sequence",), arr(value))
        if getattr(ref, "log_weights", None) is not None:
            data["log_weights"] = (("particle", "sequence"), arr(ref.log_weights))
            coords["particle"] = np.arange(ref.log_weights.shape[0])
        attrs = {
            "method": ref.method,
            "total": float(ref.total),
            "stderr": float(ref.stderr),
            "trustworthy": int(bool(ref.trustworthy)),
            "status": self.reference_status,
            "messages": "\n".join(ref.messages or []),
        }
        if ref.num_particles is not None:
            attrs["num_particles"] = int(ref.num_particles)
        if ref.khat_threshold is not None:
            attrs["khat_threshold"] = float(ref.khat_threshold)
        groups["reference"] = xr.Dataset(data, coords=coords, attrs=attrs)

        top = {"device": self.device, "num_sequences": N, "pyro_mpt_report": "evaluate"}
        if self.num_tokens is not None:
            top["num_tokens"] = self.num_tokens
        for part, sec in self.timings.items():
            top[f"seconds_{part}"] = float(sec)
        return az.InferenceData(attrs=top, **groups)

    # -- figures ---------------------------------------------------------------------------

    def plot(self, ax=None, **kwargs):
        """The curve figure (:func:`pyro_mpt.plotting.plot_curve`) with this report's
        reference marked; returns the Axes."""
        from .plotting import plot_curve

        if self.curve is None:
            raise ValueError(
                "this report has no curve (evaluate() ran with curve_masks=None); "
                "pass curve_masks >= 1"
            )
        return plot_curve(self.curve, reference=self.reference, ax=ax, **kwargs)

    def plot_fixed_rate_bias(self, ax=None, **kwargs):
        """:func:`pyro_mpt.plotting.plot_fixed_rate_bias` of this report."""
        from .plotting import plot_fixed_rate_bias

        return plot_fixed_rate_bias(self, ax=ax, **kwargs)


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def _import_arviz():
    """ArviZ, imported on first use; its notice about its coming 1.0 refactor (a
    ``FutureWarning`` on import) says nothing about the caller's code."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning
        )
        import arviz
    return arviz


def _show_progress(progress):
    if progress is None:
        stream = sys.stderr
        return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
    return bool(progress)


def _find_device(args, kwargs):
    """The device of the first tensor among the model's arguments (CPU if none)."""
    stack = list(args) + list(kwargs.values())
    while stack:
        x = stack.pop(0)
        if isinstance(x, torch.Tensor):
            return x.device
        if isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return torch.device("cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Wall time per part, synchronising CUDA before each reading so that queued kernels
    are charged to the part that launched them."""

    def __init__(self, device):
        self.device = device
        self.timings = {}
        _sync(device)
        self.start = self.last = time.perf_counter()

    def lap(self, part):
        _sync(self.device)
        now = time.perf_counter()
        self.timings[part] = now - self.last
        self.last = now
        return self.timings[part]

    def total(self):
        self.timings["total"] = time.perf_counter() - self.start
        return self.timings


def _z_score(difference, stderr, reference_value, dtype):
    """``difference / stderr``, or NaN when ``stderr`` is NaN or not above the dtype's
    rounding scale :math:`\\epsilon^{3/4}\\max(1, |\\mathrm{ref}|)`: two deterministic
    numbers (the chain estimator with exact or quadrature conditionals against an exact or
    quadrature reference) differ by rounding or discretisation, not by a sampling error, and
    their ratio to a zero standard error means nothing."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    floor = eps**0.75 * max(1.0, abs(reference_value))
    if not stderr > floor:
        return math.nan
    return difference / stderr


def _estimator_list(estimators):
    if isinstance(estimators, str):
        estimators = (estimators,)
    try:
        estimators = list(estimators)
    except TypeError:
        raise TypeError(
            f"estimators must be a sequence of estimator names, got {estimators!r}"
        ) from None
    out = {}
    for e in estimators:
        est = get_estimator(e)  # unknown names raise ValueError listing the valid ones
        name = est.name
        if name == "fixed":
            name = f"fixed({est.mask_rate:g})"
        if name in out:
            raise ValueError(f"estimator {name!r} is listed twice in estimators={estimators!r}")
        out[name] = est
    return out


def _check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be an integer >= 1{' or None' if allow_none else ''}, got {value!r}"
        )


# ----------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------


def evaluate(
    model,
    *args,
    estimators=("stratified", "uniform", "chain"),
    num_masks=16,
    fixed_rates=(0.15, 0.5, 0.8),
    reference="auto",
    num_particles=4096,
    conditionals="auto",
    mpt_particles=256,
    curve_masks=4,
    token_plate=None,
    guide=None,
    progress=None,
    share_masks=False,
    reference_options=None,
    mpt_options=None,
    **kwargs,
):
    r"""Evaluates masked pre-training against a reference log marginal likelihood for one
    model and data set.

    Computes, in this order (so that a fixed seed reproduces each number by the separate
    call):

    1. the reference :math:`\log p(X)` by
       ``log_marginal_likelihood(model, *args, method=reference, ...)``;
    2. each estimator by ``MaskedELBO(estimator=name, num_masks=num_masks, ...).estimate``,
       with its standard error and :math:`z = (\hat L - L_\mathrm{ref}) /
       \sqrt{\mathrm{se}^2 + \mathrm{se}_\mathrm{ref}^2}`; :math:`z` is NaN (``n/a`` in
       the table) when that standard error is not above the dtype's rounding scale
       :math:`\epsilon^{3/4}\max(1,|L_\mathrm{ref}|)`, i.e. when both numbers are
       deterministic (compare the difference itself) or ``num_masks=1``;
    3. the curve :math:`S(m)` by :func:`~pyro_mpt.mpt_curve` with ``curve_masks`` masks per
       size, and for each fixed rate :math:`r` the bias
       :math:`T\,S(\mathrm{round}(rT)) - L_\mathrm{ref}` with its standard error.

    Everything runs without gradients on the device of the model's data and parameters;
    each part is timed (CUDA synchronised). A reference whose diagnostics fail (k-hat above
    arviz's threshold, small ESS) is kept but flagged ``UNRELIABLE`` in the summary.

    Example::

        report = evaluate(ppca_collapsed, X, 2)
        print(report)                 # the table
        report.plot()                 # the curve with its area and the reference
        idata = report.to_inference_data()

    :param model: a Pyro model; ``*args`` and ``**kwargs`` are passed to it.
    :param estimators: names (or :class:`~pyro_mpt.estimators.MaskEstimator` s) of the
        masked estimators to run; see :data:`pyro_mpt.estimators.ESTIMATORS`.
    :param int num_masks: independent draws per estimator (s.e. needs >= 2).
    :param fixed_rates: mask rates in :math:`(0, 1]` whose bias is reported.
    :param str reference: the reference method: ``"auto"``, ``"exact"``, ``"importance"``
        or ``"quadrature"``.
    :param int num_particles: particles of an importance reference.
    :param conditionals: the MPT conditional backend (``"auto"``, ``"gaussian"``, ...).
    :param int mpt_particles: particles of importance conditionals for the MPT parts.
    :param curve_masks: masks per size for the curve; ``None`` skips the curve and with it
        the fixed-rate rows.
    :param str token_plate: see :class:`~pyro_mpt.MaskedELBO`; used by every part.
    :param guide: proposal of an importance reference (e.g. a trained AutoNormal).
    :param progress: a tqdm bar over the parts: ``None`` (default) shows it when stderr is
        a terminal, ``True`` / ``False`` force it on / off. Also passed to the reference.
    :param bool share_masks: see :class:`~pyro_mpt.MaskedELBO`. For long low-rank Gaussian
        sequences the fast route: collapsed PPCA with T = 784, N = 1000, the stratified
        estimator alone and no curve took 3.5 ms with shared masks and 62 ms with masks per
        sequence on an H200 (``benchmarks/bench_evaluate.py``).
    :param dict reference_options: more keyword arguments of ``log_marginal_likelihood``
        (``chunk_size``, ``quadrature_points``, ``max_elements``, ...).
    :param dict mpt_options: more keyword arguments of ``MaskedELBO`` and ``mpt_curve``
        (``max_plate_nesting``, ``quadrature_points``, ``max_elements``, ...).
    :returns: :class:`EvaluationReport`.

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    ests = _estimator_list(estimators)
    _check_positive_int("num_masks", num_masks)
    _check_positive_int("curve_masks", curve_masks, allow_none=True)
    rates = [check_mask_rate(r) for r in fixed_rates]
    reference_options = dict(reference_options or {})
    mpt_options = dict(mpt_options or {})
    show = _show_progress(progress)
    settings = {
        "estimators": list(ests),
        "num_masks": num_masks,
        "fixed_rates": rates,
        "reference": reference,
        "num_particles": num_particles,
        "conditionals": conditionals,
        "mpt_particles": mpt_particles,
        "curve_masks": curve_masks,
        "token_plate": token_plate,
        "share_masks": share_masks,
    }

    from tqdm.auto import tqdm

    parts = 1 + len(ests) + (curve_masks is not None)
    bar = tqdm(total=parts, desc="evaluate", disable=not show, leave=False)
    clock = _Clock(_find_device(args, kwargs))
    try:
        with torch.no_grad():
            bar.set_postfix_str("reference")
            ref = log_marginal_likelihood(
                model,
                *args,
                method=reference,
                num_particles=num_particles,
                guide=guide,
                token_plate=token_plate,
                progress=progress,
                **reference_options,
                **kwargs,
            )
            device = torch.device(getattr(ref, "device", None) or clock.device)
            clock.device = device
            clock.lap("reference")
            bar.update()
            ref_value = float(ref.total)
            ref_se = float(ref.stderr)
            dtype = ref.total.dtype

            results = {}
            for name, est in ests.items():
                bar.set_postfix_str(name)
                elbo = MaskedELBO(
                    estimator=est,
                    num_masks=num_masks,
                    num_particles=mpt_particles,
                    conditionals=conditionals,
                    token_plate=token_plate,
                    share_masks=share_masks,
                    **mpt_options,
                )
                e = elbo.estimate(model, None, *args, **kwargs)
                seconds = clock.lap(name)
                value = float(e.total)
                diff = value - ref_value
                diff_se = math.hypot(e.stderr, ref_se)
                results[name] = EstimatorResult(
                    name=name,
                    value=value,
                    stderr=float(e.stderr),
                    difference=diff,
                    difference_stderr=diff_se,
                    z_score=_z_score(diff, diff_se, ref_value, dtype),
                    num_masks=num_masks,
                    conditionals=e.conditionals,
                    unbiased=bool(e.unbiased),
                    seconds=seconds,
                    estimate=e,
                )
                bar.update()

            curve, biases = None, []
            if curve_masks is not None:
                bar.set_postfix_str("curve")
                curve = mpt_curve(
                    model,
                    *args,
                    num_masks=curve_masks,
                    conditionals=conditionals,
                    num_particles=mpt_particles,
                    token_plate=token_plate,
                    share_masks=share_masks,
                    **mpt_options,
                    **kwargs,
                )
                clock.lap("curve")
                bar.update()
                T = curve.num_tokens
                for r in rates:
                    m = curve.mask_size(r)
                    estimate = float(curve.fixed_rate_estimate(r))
                    se = T * float(curve.stderr[m - 1])
                    biases.append(
                        FixedRateBias(
                            rate=r,
                            mask_size=m,
                            estimate=estimate,
                            stderr=se,
                            bias=estimate - ref_value,
                            bias_stderr=math.hypot(se, ref_se),
                        )
                    )
    finally:
        bar.close()

    return EvaluationReport(
        reference=ref,
        estimators=results,
        curve=curve,
        fixed_rates=biases,
        timings=clock.total(),
        device=str(device),
        num_sequences=int(ref.per_sequence.shape[-1]),
        num_tokens=None if curve is None else curve.num_tokens,
        settings=settings,
    )


# ----------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------


def compare(
    models,
    *args,
    reference="auto",
    num_particles=4096,
    estimator="stratified",
    num_masks=16,
    conditionals="auto",
    mpt_particles=256,
    token_plate=None,
    guides=None,
    progress=None,
    share_masks=False,
    reference_options=None,
    mpt_options=None,
    **kwargs,
):
    r"""Ranks models of the same data by their log marginal likelihood, as
    :func:`arviz.compare` ranks them by LOO.

    For each model: the reference :math:`\log p(X)`
    (:func:`~pyro_mpt.evaluation.log_marginal_likelihood`) and, unless ``estimator=None``,
    a masked estimate of it (``MaskedELBO(estimator=estimator, num_masks=num_masks)``).

    Columns (one row per model, best first):

    - ``rank``: 0 for the highest LML;
    - ``lml``, ``se``: the reference and its Monte Carlo standard error;
    - ``d_lml``: ``lml_best - lml`` (the log Bayes factor of the best model against this
      one; 0 for the best);
    - ``dse``: its standard error; the models' estimates are independent, so
      :math:`\sqrt{\mathrm{se}^2 + \mathrm{se}_\mathrm{best}^2}` (0 for the best);
    - ``weight``: posterior model probability under a uniform prior over the listed models,
      :math:`\exp(\mathrm{lml} - \mathrm{logsumexp}(\mathrm{lml}))`;
    - ``mpt``, ``mpt_se``: the masked estimate and its standard error;
    - ``method``: the reference method; ``warning``: ``True`` when the reference is not
      trustworthy (its k-hat or ESS failed), as in arviz.

    :param dict models: name -> Pyro model; every model gets the same ``*args`` and
        ``**kwargs``.
    :param dict guides: optional name -> guide, proposals of importance references.
    :returns: a :class:`pandas.DataFrame` indexed by name (a list of row dicts if pandas
        is not installed).

    The other options are those of :func:`evaluate`.

    Example::

        fit1, fit2 = ppca_maximum_likelihood(X, 1), ppca_maximum_likelihood(X, 2)  # X: (N, T)
        table = compare({"K=1": lambda X: ppca_collapsed(X, 1, **fit1),
                         "K=2": lambda X: ppca_collapsed(X, 2, **fit2)}, X)
        table[["rank", "lml", "d_lml", "weight", "mpt"]]

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    if not isinstance(models, dict):
        raise TypeError(f"models must be a dict of name -> Pyro model, got {type(models).__name__}")
    if not models:
        raise ValueError("compare needs at least one model in the dict, got an empty dict")
    for name, m in models.items():
        if not callable(m):
            raise TypeError(f"models[{name!r}] must be a callable Pyro model, got {m!r}")
    guides = dict(guides or {})
    unknown = set(guides) - set(models)
    if unknown:
        raise ValueError(f"guides for models not in `models`: {sorted(unknown)}")
    if estimator is not None:
        get_estimator(estimator)
        _check_positive_int("num_masks", num_masks)
    reference_options = dict(reference_options or {})
    mpt_options = dict(mpt_options or {})

    from tqdm.auto import tqdm

    rows = []
    with torch.no_grad():
        for name, model in tqdm(
            models.items(), desc="compare", disable=not _show_progress(progress), leave=False
        ):
            ref = log_marginal_likelihood(
                model,
                *args,
                method=reference,
                num_particles=num_particles,
                guide=guides.get(name),
                token_plate=token_plate,
                progress=progress,
                **reference_options,
                **kwargs,
            )
            row = {
                "name": name,
                "lml": float(ref.total),
                "se": float(ref.stderr),
                "mpt": float("nan"),
                "mpt_se": float("nan"),
                "method": ref.method,
                "warning": not bool(ref.trustworthy),
            }
            if estimator is not None:
                e = MaskedELBO(
                    estimator=estimator,
                    num_masks=num_masks,
                    num_particles=mpt_particles,
                    conditionals=conditionals,
                    token_plate=token_plate,
                    share_masks=share_masks,
                    **mpt_options,
                ).estimate(model, None, *args, **kwargs)
                row["mpt"], row["mpt_se"] = float(e.total), float(e.stderr)
            rows.append(row)

    rows.sort(key=lambda r: -r["lml"] if math.isfinite(r["lml"]) else math.inf)
    best = rows[0]
    lmls = torch.tensor([r["lml"] for r in rows], dtype=torch.float64)
    weights = torch.softmax(lmls, 0).tolist()
    for rank, (row, w) in enumerate(zip(rows, weights)):
        row["rank"] = rank
        row["d_lml"] = best["lml"] - row["lml"]
        row["dse"] = 0.0 if rank == 0 else math.hypot(row["se"], best["se"])
        row["weight"] = w
    columns = ["rank", "lml", "se", "d_lml", "dse", "weight", "mpt", "mpt_se", "method", "warning"]
    try:
        import pandas as pd
    except ImportError:
        return [{"name": r["name"], **{c: r[c] for c in columns}} for r in rows]
    return pd.DataFrame(
        [[r[c] for c in columns] for r in rows],
        index=pd.Index([r["name"] for r in rows], name="model"),
        columns=columns,
    )

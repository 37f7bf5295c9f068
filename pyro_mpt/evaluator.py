r"""``evaluate`` and ``compare``: how far masked pre-training (MPT) is from the log marginal
likelihood (LML) of a given model and data set.

:func:`evaluate` puts, side by side, a reference :math:`\log p(X)` (exact, importance or
quadrature; :func:`~pyro_mpt.log_marginal_likelihood`), the unbiased masked estimators
(:class:`~pyro_mpt.MaskedELBO`), the curve :math:`S(m)` whose area is the LML
(:func:`~pyro_mpt.mpt_curve`) and the bias of fixed mask rates, with standard errors,
timings and the device, in an :class:`~pyro_mpt.EvaluationReport`. :func:`compare` ranks
models by their LML, as :func:`arviz.compare` ranks them by LOO.

Both only compute: every option is checked before any work, and the results are returned
as objects (the text, arviz export and figures are the report's).

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from .clock import Clock, find_device
from .conditionals import Conditionals
from .curve import mpt_curve
from .estimators import MaskEstimator
from .evaluator_options import (
    check_model,
    check_models_and_guides,
    check_rates,
    check_run_options,
    estimator_list,
)
from .intervals import satterthwaite_dof, verdict
from .options import check_positive_int, renamed_keyword
from .progress import logger, progress_bar
from .reference import log_marginal_likelihood
from .report import EstimatorResult, EvaluationReport, FixedRateBias

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["compare", "evaluate"]


def _reference(model, args, kwargs, opts, guide):
    """The reference :math:`\\log p(X)`: an :class:`~pyro_mpt.LMLEstimate`."""
    return log_marginal_likelihood(model, *args, **opts.reference_kwargs(guide), **kwargs)


def _z_score(difference, stderr, reference_value, dtype):
    r"""``difference / stderr``, or NaN when ``stderr`` is NaN or not above the dtype's
    rounding scale :math:`\epsilon^{3/4}\max(1, |\mathrm{ref}|)`: two deterministic
    numbers (the chain estimator with exact or quadrature conditionals against an exact or
    quadrature reference) differ by rounding or discretisation, not by a sampling error, and
    their ratio to a zero standard error means nothing."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    floor = eps**0.75 * max(1.0, abs(reference_value))
    if not stderr > floor:
        return math.nan
    return difference / stderr


def _estimator_result(name, estimate, ref, num_masks, seconds):
    ref_value, ref_se = float(ref.total), float(ref.stderr)
    value = float(estimate.total)
    difference = value - ref_value
    difference_se = math.hypot(estimate.stderr, ref_se)
    dof = satterthwaite_dof([estimate.stderr**2, ref_se**2], [estimate.dof, ref.dof])
    z = _z_score(difference, difference_se, ref_value, ref.total.dtype)
    return EstimatorResult(
        name=name,
        value=value,
        stderr=float(estimate.stderr),
        difference=difference,
        difference_stderr=difference_se,
        z_score=z,
        num_masks=num_masks,
        conditionals=estimate.conditionals,
        unbiased=bool(estimate.unbiased),
        seconds=seconds,
        estimate=estimate,
        dof=dof,
        # z is NaN for two deterministic numbers: no verdict from their rounding
        verdict="n/a" if math.isnan(z) else verdict(difference, difference_se, dof),
    )


def _fixed_rate_biases(curve, rates, ref):
    r"""One :class:`FixedRateBias` per rate: :math:`T\,S(m)` of the curve against the
    reference, standard errors added in quadrature."""
    ref_value, ref_se = float(ref.total), float(ref.stderr)
    rows = []
    for r in rates:
        m = curve.mask_size(r)
        estimate = float(curve.fixed_rate_estimate(r))
        se = curve.num_tokens * float(curve.stderr[m - 1])
        rows.append(
            FixedRateBias(
                rate=r,
                mask_size=m,
                estimate=estimate,
                stderr=se,
                bias=estimate - ref_value,
                bias_stderr=math.hypot(se, ref_se),
            )
        )
    return rows


def _estimator_rows(model, args, kwargs, elbos, num_masks, ref, clock, bar):
    """One :class:`EstimatorResult` per MaskedELBO, timed."""
    rows = {}
    for name, elbo in elbos.items():
        bar.set_postfix_str(name)
        estimate = elbo.estimate(model, None, *args, **kwargs)
        rows[name] = _estimator_result(name, estimate, ref, num_masks, clock.lap(name))
        bar.update()
    return rows


def _curve(model, args, kwargs, opts, curve_masks, clock, bar):
    """The curve :math:`S(m)` (``None`` when ``curve_masks`` is ``None``), timed."""
    if curve_masks is None:
        return None
    bar.set_postfix_str("curve")
    curve = mpt_curve(model, *args, **opts.curve_kwargs(curve_masks), **kwargs)
    clock.lap("curve")
    bar.update()
    return curve


def evaluate(
    model: Callable[..., Any],
    *args: Any,
    estimators: str | Iterable[str | MaskEstimator] = ("stratified", "uniform", "chain"),
    num_masks: int = 16,
    fixed_rates: Iterable[float] = (0.15, 0.5, 0.8),
    reference: str = "auto",
    reference_samples: int = 4096,
    conditionals: str | Conditionals = "auto",
    mpt_samples: int = 256,
    curve_masks: int | None = 4,
    token_plate: str | None = None,
    guide: Callable[..., Any] | None = None,
    progress: bool | None = None,
    share_masks: bool = False,
    reference_options: dict | None = None,
    mpt_options: dict | None = None,
    num_particles: int | None = None,
    mpt_particles: int | None = None,
    **kwargs: Any,
) -> EvaluationReport:
    r"""Evaluates masked pre-training against a reference log marginal likelihood for one
    model and data set.

    Every option is checked first, before the model runs. Then it computes, in this order
    (so that a fixed seed reproduces each number by the separate call):

    1. the reference :math:`\log p(X)` by ``log_marginal_likelihood(model, *args,
       method=reference, ...)`` with ``reference_samples`` draws;
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
    :param int reference_samples: importance draws of the latents for an importance
        reference (grid points are set by ``reference_options``).
    :param conditionals: the MPT conditional backend (``"auto"``, ``"gaussian"``, ...).
    :param int mpt_samples: importance draws of importance conditionals for the MPT parts.
    :param curve_masks: masks per size for the curve; ``None`` skips the curve and with it
        the fixed-rate rows.
    :param str token_plate: see :class:`~pyro_mpt.MaskedELBO`; used by every part.
    :param guide: proposal of an importance reference (e.g. a trained AutoNormal).
    :param progress: a tqdm bar over the parts: ``None`` (default) shows it when stderr is
        a terminal, ``True`` / ``False`` force it on / off. Also passed to the reference.
    :param bool share_masks: see :class:`~pyro_mpt.MaskedELBO`; for long low-rank Gaussian
        sequences the fast route.
    :param dict reference_options: more keyword arguments of ``log_marginal_likelihood``
        (``chunk_size``, ``quadrature_points``, ``max_elements``, ...).
    :param dict mpt_options: more keyword arguments of ``MaskedELBO`` and ``mpt_curve``
        (``max_plate_nesting``, ``quadrature_points``, ``max_elements``, ...).
    :param int num_particles: deprecated name of ``reference_samples``.
    :param int mpt_particles: deprecated name of ``mpt_samples``.
    :returns: :class:`~pyro_mpt.EvaluationReport`.
    :raises ValueError: for a bad value (naming the argument), before any work.
    :raises TypeError: for a value of the wrong kind or an unknown option key.
    """
    reference_samples = renamed_keyword(
        "evaluate", "num_particles", "reference_samples", num_particles, reference_samples, 4096
    )
    mpt_samples = renamed_keyword(
        "evaluate", "mpt_particles", "mpt_samples", mpt_particles, mpt_samples, 256
    )
    check_model("model", model)
    ests = estimator_list(estimators)
    num_masks = check_positive_int("num_masks", num_masks)
    curve_masks = check_positive_int("curve_masks", curve_masks, allow_none=True)
    rates = check_rates(fixed_rates)
    opts = check_run_options(
        reference=reference,
        reference_samples=reference_samples,
        mpt_samples=mpt_samples,
        conditionals=conditionals,
        token_plate=token_plate,
        share_masks=share_masks,
        progress=progress,
        guides={"guide": guide},
        reference_options=reference_options,
        mpt_options=mpt_options,
    )
    elbos = {name: opts.masked_elbo(est, num_masks) for name, est in ests.items()}
    if curve_masks is not None:
        opts.masked_elbo("stratified", curve_masks)  # checks the options the curve shares
    settings = {"estimators": list(ests), "num_masks": num_masks, "fixed_rates": rates}
    settings.update(opts.settings(), curve_masks=curve_masks)

    clock = Clock(find_device(args, kwargs))
    bar = progress_bar(1 + len(elbos) + (curve_masks is not None), progress, "evaluate")
    try:
        with torch.no_grad():
            bar.set_postfix_str("reference")
            ref = _reference(model, args, kwargs, opts, guide)
            clock.device = torch.device(getattr(ref, "device", None) or clock.device)
            clock.lap("reference")
            bar.update()
            logger.info("evaluate: %s reference on %s", ref.method, clock.device)
            results = _estimator_rows(model, args, kwargs, elbos, num_masks, ref, clock, bar)
            curve = _curve(model, args, kwargs, opts, curve_masks, clock, bar)
    finally:
        bar.close()

    return EvaluationReport(
        reference=ref,
        estimators=results,
        curve=curve,
        fixed_rates=[] if curve is None else _fixed_rate_biases(curve, rates, ref),
        timings=clock.total(),
        device=str(clock.device),
        num_sequences=int(ref.per_sequence.shape[-1]),
        num_tokens=None if curve is None else curve.num_tokens,
        settings=settings,
    )


def compare(
    models: dict[str, Callable[..., Any]],
    *args: Any,
    reference: str = "auto",
    reference_samples: int = 4096,
    estimator: str | MaskEstimator | None = "stratified",
    num_masks: int = 16,
    conditionals: str | Conditionals = "auto",
    mpt_samples: int = 256,
    token_plate: str | None = None,
    guides: Mapping[str, Callable[..., Any]] | None = None,
    progress: bool | None = None,
    share_masks: bool = False,
    reference_options: dict | None = None,
    mpt_options: dict | None = None,
    num_particles: int | None = None,
    mpt_particles: int | None = None,
    **kwargs: Any,
) -> pd.DataFrame | list[dict[str, Any]]:
    r"""Ranks models of the same data by their log marginal likelihood, as
    :func:`arviz.compare` ranks them by LOO.

    For each model: the reference :math:`\log p(X)`
    (:func:`~pyro_mpt.log_marginal_likelihood`) and, unless ``estimator=None``, a masked
    estimate of it (``MaskedELBO(estimator=estimator, num_masks=num_masks)``).

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
    :param int num_particles: deprecated name of ``reference_samples``.
    :param int mpt_particles: deprecated name of ``mpt_samples``.
    :returns: a :class:`pandas.DataFrame` indexed by name (a list of row dicts if pandas
        is not installed).

    The other options are those of :func:`evaluate`; all are checked before any work.

    Example::

        fit1, fit2 = ppca_maximum_likelihood(X, 1), ppca_maximum_likelihood(X, 2)  # X: (N, T)
        table = compare({"K=1": lambda X: ppca_collapsed(X, 1, **fit1),
                         "K=2": lambda X: ppca_collapsed(X, 2, **fit2)}, X)
        table[["rank", "lml", "d_lml", "weight", "mpt"]]
    """
    reference_samples = renamed_keyword(
        "compare", "num_particles", "reference_samples", num_particles, reference_samples, 4096
    )
    mpt_samples = renamed_keyword(
        "compare", "mpt_particles", "mpt_samples", mpt_particles, mpt_samples, 256
    )
    guides = check_models_and_guides(models, guides)
    opts = check_run_options(
        reference=reference,
        reference_samples=reference_samples,
        mpt_samples=mpt_samples,
        conditionals=conditionals,
        token_plate=token_plate,
        share_masks=share_masks,
        progress=progress,
        guides={f"guides[{name!r}]": g for name, g in guides.items()},
        reference_options=reference_options,
        mpt_options=mpt_options,
    )
    elbo = None
    if estimator is not None:
        elbo = opts.masked_elbo(estimator, check_positive_int("num_masks", num_masks))

    rows = []
    bar = progress_bar(len(models), progress, "compare")
    try:
        with torch.no_grad():
            for name, model in models.items():
                ref = _reference(model, args, kwargs, opts, guides.get(name))
                mpt = None if elbo is None else elbo.estimate(model, None, *args, **kwargs)
                rows.append(_compare_row(name, ref, mpt))
                bar.update()
    finally:
        bar.close()
    return _compare_table(rows)


def _compare_row(name, ref, mpt_estimate):
    return {
        "name": name,
        "lml": float(ref.total),
        "se": float(ref.stderr),
        "mpt": float("nan") if mpt_estimate is None else float(mpt_estimate.total),
        "mpt_se": float("nan") if mpt_estimate is None else float(mpt_estimate.stderr),
        "method": ref.method,
        "warning": not bool(ref.trustworthy),
    }


def _compare_table(rows):
    """The rows ranked best first, with ``rank``, ``d_lml``, ``dse`` and ``weight``; a
    :class:`pandas.DataFrame` when pandas is installed."""
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

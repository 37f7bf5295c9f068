r"""An :class:`~pyro_mpt.EvaluationReport` as an :class:`arviz.InferenceData`.

The report's arrays go into the standard ``posterior`` group (the estimators' draws of
log p(X), dims ``chain x draw``, so ``az.summary(idata)``, ``az.plot_forest`` and
``az.plot_posterior`` work with their defaults) and into custom groups of the arviz schema
(``mpt``, ``mpt_draws``, ``reference``); attributes are numbers and strings only, so
``idata.to_netcdf`` works. :func:`to_elpd_data` gives an :class:`arviz.ELPDData`, which
``az.plot_khat`` and ``az.compare`` accept; :func:`compare_reports` ranks models by their
LML in ``az.compare``'s table.
arviz and xarray are imported on first use (``pip install pyro-mpt[arviz]``).

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .compat import import_arviz

if TYPE_CHECKING:
    import arviz

__all__ = ["compare_reports", "draws_variable", "to_elpd_data", "to_inference_data"]


def draws_variable(name: str) -> str:
    """The variable of an estimator's draws in :func:`to_inference_data`: ``"mpt_" + name``
    with every character outside ``[A-Za-z0-9_]`` replaced by ``_`` (``"chain"`` ->
    ``"mpt_chain"``, which would clash with arviz's ``chain`` dimension;
    ``"fixed(0.15)"`` -> ``"mpt_fixed_0_15_"``)."""
    return "mpt_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def to_inference_data(report: Any) -> arviz.InferenceData:
    r"""The arrays of an :class:`~pyro_mpt.EvaluationReport` as an
    :class:`arviz.InferenceData`.

    Groups:

    - ``posterior`` (only with estimators): one variable per estimator, ``mpt_<name>``
      ``(chain, draw)``: the estimator's draw of :math:`\log p(X)`, the per-sequence draws
      summed, :math:`\sum_{n} \hat{\ell}_{n}^{(k)}`, one chain of ``num_masks``
      independent draws. These are Monte Carlo draws of an estimator, not posterior draws of
      model parameters; they sit in ``posterior`` so that arviz's defaults find them
      (``az.summary(idata)``, ``az.plot_forest(idata)``, ``az.plot_posterior(idata,
      ref_val=idata.posterior.attrs["reference_total"])``). With one chain, r_hat is NaN and
      arviz logs "Shape validation failed"; a deterministic estimator (``chain``, zero
      variance) makes arviz warn on its ESS. Attribute ``reference_total``.

    Custom groups of the arviz schema:

    - ``mpt`` (only with a curve): ``curve`` ``(sequence, mask_size)`` :math:`S_n(m)`;
      ``curve_total`` ``(mask_size)`` :math:`S(m)` summed over sequences, ``curve_stderr``;
      coordinate ``mask_rate``; attributes ``area``, ``area_stderr``, ``fixed_rate_*``.
    - ``mpt_draws`` (only with estimators): one variable per estimator, ``mpt_<name>``
      (:func:`draws_variable`), ``(chain, draw, sequence)`` with one chain and
      ``num_masks`` independent draws, so ``arviz.summary(idata, group="mpt_draws")`` and
      ``arviz.ess`` apply; attributes hold each total, s.e. and z-score.
    - ``reference``: ``per_sequence``, ``per_sequence_stderr``, ``ess``, ``khat``
      ``(sequence)`` and ``log_weights`` ``(particle, sequence)`` when the method has
      them (rename ``particle`` to ``__sample__`` for :func:`arviz.psislw`); attributes
      ``method``, ``total``, ``stderr``, ``trustworthy`` (0/1), ``khat_threshold``.

    The InferenceData's own attributes: ``device``, ``num_sequences``, ``num_tokens`` and
    ``seconds_<part>`` for each timing.

    :param report: an :class:`~pyro_mpt.EvaluationReport`.
    :returns: :class:`arviz.InferenceData`.
    """
    az = import_arviz()
    groups = {}
    if report.curve is not None:
        groups["mpt"] = _curve_group(report)
    if report.estimators:
        groups["posterior"] = _posterior_group(report)
        groups["mpt_draws"] = _draws_group(report)
    groups["reference"] = _reference_group(report)
    top = {
        "device": report.device,
        "num_sequences": report.num_sequences,
        "pyro_mpt_report": "evaluate",
    }
    if report.num_tokens is not None:
        top["num_tokens"] = report.num_tokens
    for part, sec in report.timings.items():
        top[f"seconds_{part}"] = float(sec)
    return az.InferenceData(attrs=top, **groups)


def _numpy(t):
    return t.detach().cpu().numpy()


def _curve_group(report):
    import numpy as np
    import xarray as xr

    c = report.curve
    attrs = {
        "area": float(c.area),
        "area_stderr": float(c.area_stderr),
        "exhaustive": int(c.exhaustive),
        "conditionals": c.conditionals,
        "num_tokens": c.num_tokens,
    }
    for b in report.fixed_rates:
        key = f"fixed_rate_{b.rate:g}"
        attrs[key + "_mask_size"] = b.mask_size
        attrs[key + "_estimate"] = b.estimate
        attrs[key + "_bias"] = b.bias
        attrs[key + "_bias_stderr"] = b.bias_stderr
    return xr.Dataset(
        {
            "curve": (("sequence", "mask_size"), _numpy(c.per_sequence)),
            "curve_total": (("mask_size",), _numpy(c.scores)),
            "curve_stderr": (("mask_size",), _numpy(c.stderr)),
        },
        coords={
            "sequence": np.arange(report.num_sequences),
            "mask_size": _numpy(c.sizes),
            "mask_rate": ("mask_size", _numpy(c.mask_rates)),
        },
        attrs=attrs,
    )


def _posterior_group(report):
    import numpy as np
    import xarray as xr

    data = {
        draws_variable(name): (("chain", "draw"), _numpy(r.estimate.draws.sum(-1))[None])
        for name, r in report.estimators.items()
    }
    K = next(iter(report.estimators.values())).num_masks
    attrs = {"reference_total": float(report.reference.total), "pyro_mpt_group": "estimators"}
    return xr.Dataset(data, coords={"chain": [0], "draw": np.arange(K)}, attrs=attrs)


def _draws_group(report):
    import numpy as np
    import xarray as xr

    data, attrs = {}, {}
    for name, r in report.estimators.items():
        draws = _numpy(r.estimate.draws)  # (K, N)
        var = draws_variable(name)
        data[var] = (("chain", "draw", "sequence"), draws[None])
        attrs[f"{var}_total"] = r.value
        attrs[f"{var}_stderr"] = r.stderr
        attrs[f"{var}_z_score"] = r.z_score
        attrs[f"{var}_conditionals"] = r.conditionals
    K = next(iter(report.estimators.values())).num_masks
    coords = {"chain": [0], "draw": np.arange(K), "sequence": np.arange(report.num_sequences)}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _reference_group(report):
    import numpy as np
    import xarray as xr

    ref = report.reference
    data = {
        "per_sequence": (("sequence",), _numpy(ref.per_sequence)),
        "per_sequence_stderr": (("sequence",), _numpy(ref.per_sequence_stderr)),
    }
    coords = {"sequence": np.arange(report.num_sequences)}
    for name in ("ess", "khat"):
        value = getattr(ref, name, None)
        if value is not None:
            data[name] = (("sequence",), _numpy(value))
    if getattr(ref, "log_weights", None) is not None:
        data["log_weights"] = (("particle", "sequence"), _numpy(ref.log_weights))
        coords["particle"] = np.arange(ref.log_weights.shape[0])
    attrs = {
        "method": ref.method,
        "total": float(ref.total),
        "stderr": float(ref.stderr),
        "trustworthy": int(bool(ref.trustworthy)),
        "status": report.reference_status,
        "messages": "\n".join(ref.messages or []),
    }
    if ref.num_samples is not None:
        attrs["num_samples"] = int(ref.num_samples)
    if ref.khat_threshold is not None:
        attrs["khat_threshold"] = float(ref.khat_threshold)
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _describe(reports):
    return f"with {len(reports)} entries" if isinstance(reports, dict) else "(not a dict)"


def to_elpd_data(report: Any, estimator: str | None = None) -> arviz.ELPDData:
    r"""The report's log marginal likelihood as an :class:`arviz.ELPDData` in arviz's
    ``loo`` layout, so that ``az.plot_khat`` and ``az.compare`` take it.

    The fields hold the LML, not a leave-one-out score: ``elpd_loo`` is
    :math:`\log p(X) = \sum_n \log p(x_n)` (the reference's, or ``estimator``'s),
    ``loo_i`` the per-sequence terms :math:`\log p(x_n)` (dim ``sequence``), ``se`` the
    Monte Carlo standard error of the estimate, ``p_loo`` NaN (there is no effective
    number of parameters), ``n_samples`` the reference's importance samples (0 when exact)
    or the estimator's ``num_masks``, ``warning`` True when the reference is not
    trustworthy, ``pareto_k`` the reference's per-sequence :math:`\hat k` (only for a
    reference with importance weights) and ``good_k`` its threshold.

    :param report: an :class:`~pyro_mpt.EvaluationReport`.
    :param estimator: the name of one of ``report.estimators``; ``None`` for the reference.
    :returns: :class:`arviz.ELPDData`.
    :raises ValueError: ``estimator`` is not one of the report's estimators.
    """
    import numpy as np
    import xarray as xr

    az = import_arviz()
    ref = report.reference
    if estimator is None:
        per_sequence, total, se = ref.per_sequence, float(ref.total), float(ref.stderr)
        n_samples = int(ref.num_samples or 0)
    elif estimator in report.estimators:
        row = report.estimators[estimator]
        per_sequence, total, se = row.estimate.per_sequence, row.value, row.stderr
        n_samples = row.num_masks
    else:
        raise ValueError(
            f"to_elpd_data: estimator={estimator!r} is not in the report; use None for the "
            f"reference or one of {sorted(report.estimators)}"
        )
    coords = {"sequence": np.arange(report.num_sequences)}
    values = [total, se, float("nan"), n_samples, report.num_sequences]
    values += [not bool(ref.trustworthy)]
    values += [xr.DataArray(_numpy(per_sequence), dims=("sequence",), coords=coords)]
    index = ["elpd_loo", "se", "p_loo", "n_samples", "n_data_points", "warning", "loo_i"]
    if getattr(ref, "khat", None) is not None:
        khat = xr.DataArray(_numpy(ref.khat), dims=("sequence",), coords=coords)
        values.append(khat.rename("pareto_k"))
        index.append("pareto_k")
    good_k = 0.7 if ref.khat_threshold is None else float(ref.khat_threshold)
    return az.ELPDData(data=values + ["log", good_k], index=index + ["scale", "good_k"])


def compare_reports(reports: dict, estimator: str | None = None) -> Any:
    r"""Rank models by their log marginal likelihood in a table shaped like
    :func:`arviz.compare`'s (it is ``az.compare`` run on :func:`to_elpd_data` of each
    report, ``method="pseudo-bma"``). :func:`pyro_mpt.compare` runs the models itself and
    gives the same ranking in its own columns; this function takes finished reports and
    keeps arviz's column names, so ``az.plot_compare`` draws it.

    Columns: ``rank``; ``elpd_loo`` :math:`\log p(X)` of each model (reference or
    ``estimator``); ``p_loo`` NaN; ``elpd_diff`` :math:`\log p(X \mid \text{best}) -
    \log p(X \mid \text{model})`, the log Bayes factor against the best model; ``weight``
    the posterior model probability under a uniform prior over the models,

    .. math:: w_j = \frac{p(X \mid M_j)}{\sum_i p(X \mid M_i)};

    ``se`` the Monte Carlo standard error; ``dse`` arviz's standard error of the difference
    over sequences, :math:`\sqrt{N \operatorname{Var}_n(\ell_{n}^{\text{best}} -
    \ell_{n}^{j})}`, which needs every report on the same ``N`` sequences; ``warning``
    (reference not trustworthy) and ``scale`` (``"log"``). ``az.plot_compare`` draws it.

    :param reports: model name -> :class:`~pyro_mpt.EvaluationReport`, at least two.
    :param estimator: the estimator whose LML is compared; ``None`` for the reference.
    :returns: :class:`pandas.DataFrame` indexed by model name, best first.
    :raises ValueError: fewer than two reports, or reports on different numbers of sequences.
    """
    if not isinstance(reports, dict) or len(reports) < 2:
        raise ValueError(
            f"compare_reports: reports must be a dict of at least two named reports, got "
            f"{type(reports).__name__} {_describe(reports)}; "
            "pass e.g. {'k=1': report1, 'k=2': report2}"
        )
    sizes = {name: r.num_sequences for name, r in reports.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"compare_reports: the reports are on different numbers of sequences {sizes}; evaluate "
            "every model on the same data"
        )
    import warnings

    az = import_arviz()
    elpds = {name: to_elpd_data(r, estimator) for name, r in reports.items()}
    with warnings.catch_warnings():
        # arviz 0.23 calls DataFrame.sort_values(inplace=True), which pandas >= 3.1
        # deprecates; nothing the caller can act on.
        warnings.filterwarnings("ignore", message=".*inplace keyword.*")
        return az.compare(elpds, method="pseudo-bma")

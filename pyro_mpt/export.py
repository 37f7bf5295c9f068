r"""An :class:`~pyro_mpt.EvaluationReport` as an :class:`arviz.InferenceData`.

The report's arrays go into custom groups of the arviz schema (``mpt``, ``mpt_draws``,
``reference``); attributes are numbers and strings only, so ``idata.to_netcdf`` works.
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

__all__ = ["draws_variable", "to_inference_data"]


def draws_variable(name: str) -> str:
    """The variable of an estimator's draws in :func:`to_inference_data`: ``"mpt_" + name``
    with every character outside ``[A-Za-z0-9_]`` replaced by ``_`` (``"chain"`` ->
    ``"mpt_chain"``, which would clash with arviz's ``chain`` dimension;
    ``"fixed(0.15)"`` -> ``"mpt_fixed_0_15_"``)."""
    return "mpt_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def to_inference_data(report: Any) -> arviz.InferenceData:
    """The arrays of an :class:`~pyro_mpt.EvaluationReport` as an
    :class:`arviz.InferenceData`.

    Groups (custom groups of the arviz schema):

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

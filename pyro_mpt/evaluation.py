"""Deprecated home of the reference log marginal likelihood: use :mod:`pyro_mpt.reference`.

``log_marginal_likelihood``, ``LMLEstimate`` and ``METHODS`` are re-exported unchanged;
the module's other old names still resolve, with a ``DeprecationWarning`` saying where they
live now.
"""

import importlib
import warnings

from .reference import METHODS, LMLEstimate, log_marginal_likelihood

__all__ = ["LMLEstimate", "METHODS", "log_marginal_likelihood"]

# old name -> (module under pyro_mpt, attribute)
_MOVED = {
    "DEFAULT_LML_MAX_ELEMENTS": ("options", "DEFAULT_MAX_ELEMENTS"),
    "KEEP_LOG_WEIGHTS": ("reference.importance", "KEEP_LOG_WEIGHTS"),
    "MIN_ESS": ("reference.importance", "MIN_ESS"),
    "MAX_EDGE_MASS": ("reference.quadrature", "MAX_EDGE_MASS"),
    "COMPILE_MIN_EVALUATIONS": ("reference.compile", "COMPILE_MIN_EVALUATIONS"),
    "SMALL_MATMUL": ("reference.compile", "SMALL_MATMUL"),
}


def __getattr__(name):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _MOVED[name]
    hint = (
        "the chunk budget now depends on the device: see pyro_mpt.options.resolve_max_elements"
        if name == "DEFAULT_LML_MAX_ELEMENTS"
        else f"use pyro_mpt.{module}.{attr}"
    )
    warnings.warn(
        f"pyro_mpt.evaluation.{name} is deprecated and will be removed in the next release; "
        + hint,
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(f"pyro_mpt.{module}"), attr)

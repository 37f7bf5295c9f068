"""Checks of a model's data and sites, and clear errors for the failures Pyro and torch
report obscurely (a plate of size 0, a covariance that is not positive definite, NumPy
data).

Data must be torch tensors, as for Pyro's own ELBOs: NumPy arrays and Python lists are
refused (not converted) with a :class:`TypeError` saying how to convert them, because a
silent conversion would pick a dtype for the user and a list argument is often not data.
"""

from __future__ import annotations

import contextlib
import linecache
import math
import numbers
import os
import re
import traceback

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import Distribution

__all__ = [
    "check_bounds",
    "check_draws_memory",
    "check_enumerable",
    "check_observed_value",
    "check_plate_options",
    "check_sizes",
    "forget_new_params_on_error",
    "model_errors",
    "nonfinite_sites",
    "site_dtype",
    "trace_model",
]

#: Floating dtypes that data of a continuous site may have.
_FLOAT_DATA = (torch.float32, torch.float64)


def check_bounds(bounds) -> tuple:
    """``(low, high)``, two finite floats with ``low < high``.

    :raises ValueError: naming ``quadrature_bounds`` and the value received."""
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(
            f"quadrature_bounds must be two finite numbers (low, high) with low < high, "
            f"got {bounds!r}"
        )
    return (low, high)


def check_plate_options(token_plate, max_plate_nesting):
    """``token_plate`` is a name or ``None``; ``max_plate_nesting`` an integer >= 0 or inf.

    :raises TypeError: for a value of the wrong kind; ValueError: for a negative depth."""
    if token_plate is not None and not isinstance(token_plate, str):
        raise TypeError(f"token_plate must be a plate name (a str) or None, got {token_plate!r}")
    if max_plate_nesting is None or max_plate_nesting == math.inf:
        return
    if isinstance(max_plate_nesting, bool) or not isinstance(max_plate_nesting, numbers.Integral):
        raise TypeError(f"max_plate_nesting must be an integer or inf, got {max_plate_nesting!r}")
    if max_plate_nesting < 0:
        raise ValueError(f"max_plate_nesting must be >= 0, got {max_plate_nesting!r}")


def _support_is_discrete(fn) -> bool:
    try:
        return bool(fn.support.is_discrete)
    except (AttributeError, NotImplementedError):
        return False


def check_observed_value(name, fn, value):
    """The data of observed site ``name`` are a tensor of a dtype its distribution can
    score: float32 or float64 for a continuous distribution (integers, booleans, float16,
    bfloat16 and complex numbers refused), any real dtype for a discrete one.

    :raises TypeError: naming the site, the dtype and the conversion to make.
    """
    if not torch.is_tensor(value):
        raise TypeError(
            f"observed site {name!r} holds a {type(value).__name__}, not a torch.Tensor: "
            "pyro_mpt, like Pyro's ELBOs, needs tensor data; pass torch.as_tensor(data)"
        )
    if value.is_complex():
        raise TypeError(
            f"observed site {name!r} holds complex data ({value.dtype}); log-densities are "
            "real: pass the real and imaginary parts as separate real tokens"
        )
    if _support_is_discrete(fn) or value.dtype in _FLOAT_DATA:
        return
    family = type(fn).__name__
    if value.is_floating_point():
        why = f"{value.dtype} is too coarse for masked conditionals"
    else:
        why = f"{family} has a continuous support and its data are {value.dtype}"
    raise TypeError(
        f"observed site {name!r}: {why}; convert the data with data.double() (or "
        "data.float()) before calling the model"
    )


def site_dtype(fn, value) -> torch.dtype:
    """The dtype the log-density of ``value`` under ``fn`` comes out in: the data's dtype
    promoted with the distribution's floating parameters (float32 data with float64
    parameters give float64, as ``fn.log_prob`` does)."""
    if not value.is_floating_point():
        return fn.log_prob(value).dtype
    dtype, seen, todo = value.dtype, set(), [fn]
    while todo:
        d = todo.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        for v in vars(d).values():
            if torch.is_tensor(v) and v.is_floating_point():
                dtype = torch.promote_types(dtype, v.dtype)
            elif isinstance(v, Distribution):
                todo.append(v)
    return dtype


def check_enumerable(latents):
    """Every latent marked ``infer={"enumerate": "parallel"}`` has a finite support.

    :raises ValueError: naming the site and its distribution."""
    for site in latents:
        if site["infer"].get("enumerate") != "parallel":
            continue
        fn = site["fn"]
        if not getattr(fn, "has_enumerate_support", False):
            raise ValueError(
                f"latent site {site['name']!r} is marked infer={{'enumerate': 'parallel'}} "
                f"but its {type(fn).__name__} has no finite support to enumerate; truncate it "
                "(e.g. a Categorical over 0..K) or drop the mark and use importance sampling "
                "(conditionals='importance', method='importance')"
            )


def check_sizes(sites, seq_shape, num_tokens):
    """At least one sequence and one token.

    :raises ValueError: naming the observed sites and their shapes."""
    names = [s.name for s in sites]
    if num_tokens == 0:
        raise ValueError(
            f"the observed site(s) {names} hold no tokens (T = 0 per sequence): there is "
            "nothing to mask; pass data with at least one token"
        )
    if 0 in tuple(seq_shape):
        raise ValueError(
            f"the observed site(s) {names} hold no sequences (batch shape "
            f"{tuple(seq_shape)}, N = 0); pass data with at least one sequence"
        )


def check_draws_memory(name, num_draws, elements_per_draw, max_elements, dtype):
    """Refuses ``num_draws`` draws whose result tensor (``num_draws * elements_per_draw``
    elements) would exceed ``max_elements``, before anything is allocated.

    :raises ValueError: naming ``name``, the memory needed and the budget."""
    need = num_draws * elements_per_draw
    if need <= max_elements:
        return
    size = torch.empty((), dtype=dtype).element_size()
    raise ValueError(
        f"{name}={num_draws} needs {need:.3g} elements ({need * size / 1e9:.3g} GB in "
        f"{dtype}) to hold its draws, above max_elements={max_elements}: lower {name} "
        f"(at most {max(1, max_elements // max(1, elements_per_draw))} here) or raise "
        "max_elements"
    )


def nonfinite_sites(model, args, kwargs) -> list:
    """Names of the observed sites whose log-density is not finite in one trace of the
    model (latents drawn from the prior), with their counts, as strings."""
    with torch.no_grad():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
        out = []
        for site in trace.nodes.values():
            if site["type"] != "sample" or not site["is_observed"]:
                continue
            lp = site["fn"].log_prob(site["value"])
            bad = int((~torch.isfinite(lp)).sum())
            if bad:
                out.append(f"{site['name']!r} ({bad} of {lp.numel()} log-densities)")
    return out


def _is_array_like(x) -> bool:
    return isinstance(x, np.ndarray) or (
        isinstance(x, (list, tuple)) and any(isinstance(v, (list, float, np.ndarray)) for v in x)
    )


def _array_argument(args, kwargs):
    for i, a in enumerate(args):
        if _is_array_like(a):
            return f"argument {i} of the model", a
    for k, a in kwargs.items():
        if _is_array_like(a):
            return f"keyword argument {k}= of the model", a
    return None, None


def _odd_dtype_argument(args, kwargs):
    named = [(f"argument {i} of the model", a) for i, a in enumerate(args)]
    named += [(f"keyword argument {k}= of the model", a) for k, a in kwargs.items()]
    for where, a in named:
        if torch.is_tensor(a) and a.dtype not in _FLOAT_DATA:
            return where, a
    return None, None


def _meta_argument(args, kwargs):
    named = [(f"argument {i} of the model", a) for i, a in enumerate(args)]
    named += [(f"keyword argument {k}= of the model", a) for k, a in kwargs.items()]
    return next((w for w, a in named if torch.is_tensor(a) and a.device.type == "meta"), None)


def _is_library(filename) -> bool:
    return any(f"{os.sep}{lib}{os.sep}" in filename for lib in ("torch", "pyro"))


def _failing_distribution(tb):
    """``(family, parameter report, site text)`` of the Distribution whose construction
    raised in traceback ``tb``, or ``None``."""
    frames = list(traceback.walk_tb(tb))
    for i, (frame, _) in enumerate(frames):
        obj = frame.f_locals.get("self")
        if isinstance(obj, Distribution) and frame.f_code.co_name == "__init__":
            params = []
            for k, v in frame.f_locals.items():
                if torch.is_tensor(v) and v.is_floating_point() and not k.endswith("_"):
                    bad = (~torch.isfinite(v)).sum() + (v <= 0).sum() * ("diag" in k)
                    if int(bad):
                        params.append(f"{k} has {int(bad)} NaN, infinite or non-positive value(s)")
            callers = [f for f, _ in frames[:i] if not _is_library(f.f_code.co_filename)]
            caller = callers[-1] if callers else None
            where = ""
            if caller is not None:
                line = linecache.getline(caller.f_code.co_filename, caller.f_lineno)
                m = re.search(r"sample\(\s*[\"']([^\"']+)[\"']", line)
                where = (
                    f" at site {m.group(1)!r}"
                    if m
                    else f" at {caller.f_code.co_filename}:{caller.f_lineno}"
                )
            return type(obj).__name__, params, where
    return None


def _linalg_error(exc):
    found = _failing_distribution(exc.__traceback__)
    if found is None:
        return ValueError(
            "a covariance in the model is not positive definite (a zero, negative or NaN "
            f"scale or noise parameter?): {str(exc).splitlines()[0]}"
        )
    family, params, where = found
    detail = "; ".join(params) or "its covariance is singular or ill-conditioned"
    return ValueError(
        f"the model's {family}{where} has a covariance that is not positive definite: "
        f"{detail}. Check its scale / noise parameters (zero, negative or NaN?)"
    )


@contextlib.contextmanager
def model_errors(args=(), kwargs=None):
    """Turns the obscure failures of running a model into clear errors: a ``pyro.plate``
    of size 0 (no sequences), a covariance that is not positive definite (naming the
    distribution, the site and the bad parameter where found), NumPy or list data."""
    try:
        yield
    except ZeroDivisionError as e:
        if "size cannot be zero" not in str(e):
            raise
        raise ValueError(
            "a pyro.plate of the model has size 0: the data hold no sequences (N = 0); pass "
            "data with at least one sequence"
        ) from e
    except torch.linalg.LinAlgError as e:
        raise _linalg_error(e) from e
    except ValueError as e:
        found = _failing_distribution(e.__traceback__) if "Expected parameter" in str(e) else None
        if found is None:
            raise
        # Pyro's validation names the parameter but not the site: add it
        raise ValueError(
            f"the model's {found[0]}{found[2]} got an invalid parameter: "
            f"{str(e).splitlines()[0]}. Check its scale / noise parameters (zero, negative "
            "or NaN?)"
        ) from e
    except (AttributeError, TypeError) as e:
        where, value = _array_argument(args, kwargs or {})
        if where is None:
            raise
        raise TypeError(
            f"{where} is a {type(value).__name__}: pyro_mpt, like Pyro's ELBOs, needs data as "
            "torch tensors; pass torch.as_tensor(data) (a float64 NumPy array stays float64). "
            f"The model failed with {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    except (NotImplementedError, RuntimeError) as e:
        where = _meta_argument(args, kwargs or {})
        if where is not None:
            raise TypeError(
                f"{where} is a tensor on the 'meta' device, which holds shapes but no values, "
                "so the model cannot be scored: pass the data on 'cpu' or 'cuda'. The model "
                f"failed with {type(e).__name__}: {str(e).splitlines()[0]}"
            ) from e
        where, value = _odd_dtype_argument(args, kwargs or {})
        if where is None or "not implemented for" not in str(e):
            raise
        raise TypeError(
            f"{where} is a {value.dtype} tensor and the model failed on it ({str(e).splitlines()[0]}); "
            "a continuous model needs float32 or float64 data: pass data.double()"
        ) from e


@contextlib.contextmanager
def forget_new_params_on_error():
    """On an exception, removes the ``pyro.param`` s created inside the block, so that a
    failing call leaves the param store as it found it (a model's first trace creates its
    parameters before a bad shape or value is found)."""
    store = pyro.get_param_store()
    before = set(store.keys())
    try:
        yield
    except BaseException:
        for name in set(store.keys()) - before:
            del store[name]
        raise


def trace_model(model, args, kwargs):
    """``poutine.trace(model).get_trace(*args, **kwargs)`` with :func:`model_errors`."""
    with model_errors(args, kwargs):
        return poutine.trace(model).get_trace(*args, **kwargs)

"""Every user option is checked here, once, with one error style.

A bad value raises ``ValueError`` (``TypeError`` for a value of the wrong kind) whose
message names the argument, the value received and what is valid. Integers may be Python or
NumPy integers; booleans are not integers, and only real booleans are booleans.

Memory budgets: a chunk of work (mask rows, particles) keeps its largest tensors under
``max_elements`` elements. The default depends on the device and is set here only:
:data:`DEFAULT_MAX_ELEMENTS` on the CPU, :data:`DEFAULT_CUDA_MAX_ELEMENTS` on a GPU.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch

__all__ = [
    "DEFAULT_CUDA_MAX_ELEMENTS",
    "DEFAULT_MAX_ELEMENTS",
    "check_bool",
    "check_choice",
    "check_positive_int",
    "check_probability",
    "renamed_keyword",
    "resolve_max_elements",
]

#: Default memory budget on the CPU, in tensor elements of one chunk (small chunks stay in
#: cache): 2**24 (128 MB in float64).
DEFAULT_MAX_ELEMENTS = 2**24

#: Default memory budget on a GPU: 2**28 elements (1 GB in float32), safe on a 16 GB card;
#: small chunks leave a GPU launch-bound.
DEFAULT_CUDA_MAX_ELEMENTS = 2**28


def check_positive_int(name: str, value, *, allow_none: bool = False) -> int | None:
    """``value`` as a Python ``int`` >= 1 (NumPy integers accepted; ``bool`` refused).

    :raises ValueError: naming ``name`` and the value received.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    extra = " or None" if allow_none else ""
    raise ValueError(f"{name} must be an integer >= 1{extra}, got {value!r}")


def check_bool(name: str, value, *, allow_none: bool = False) -> bool | None:
    """``value`` if it is a ``bool`` (or NumPy bool); a string such as ``"no"`` is refused
    rather than read as true.

    :raises TypeError: naming ``name`` and the value received.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    extra = ", False or None" if allow_none else " or False"
    raise TypeError(f"{name} must be True{extra}, got {value!r}")


def check_probability(name: str, value, *, low_open: bool = True) -> float:
    """``value`` as a float in ``(0, 1]`` (``[0, 1]`` with ``low_open=False``).

    :raises ValueError: naming ``name`` and the value received.
    """
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = float("nan")
    ok = (0.0 < rate <= 1.0) if low_open else (0.0 <= rate <= 1.0)
    if not ok or isinstance(value, bool):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return rate


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices`` (strings).

    :raises ValueError: naming ``name``, the value and the valid choices.
    """
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"unknown {name} {value!r}; valid values are {list(choices)}")


def resolve_max_elements(max_elements, device) -> int:
    """``max_elements`` if given (checked), else the default budget of ``device``'s type:
    :data:`DEFAULT_MAX_ELEMENTS` on the CPU, :data:`DEFAULT_CUDA_MAX_ELEMENTS` on CUDA."""
    if max_elements is not None:
        return check_positive_int("max_elements", max_elements)
    if device is not None and torch.device(device).type == "cuda":
        return DEFAULT_CUDA_MAX_ELEMENTS
    return DEFAULT_MAX_ELEMENTS


def renamed_keyword(owner: str, old: str, new: str, old_value, new_value, default):
    """The value of a keyword renamed from ``old`` to ``new``: ``old_value`` (with a
    ``DeprecationWarning``) when it was given, else ``new_value``. Passing both is an error.

    ``old_value`` is ``None`` when the old keyword was not given.
    """
    if old_value is None:
        return new_value
    if new_value is not default and new_value != default:
        raise TypeError(f"{owner}: pass {new}= only; {old}= is its deprecated old name")
    warnings.warn(
        f"{owner}: {old}= is deprecated and will be removed in the next release; use {new}= "
        f"(it means the same here)",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value

"""Parameters of the reference models: fixed when a tensor is given, else a ``pyro.param``."""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch

__all__ = ["param_or_fixed", "positive_param_or_fixed"]


def param_or_fixed(
    name: str, value: torch.Tensor | None, init: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """A fixed tensor if one is given, else a ``pyro.param`` initialised lazily by ``init``."""
    if value is not None:
        return value
    return pyro.param(name, init)


def positive_param_or_fixed(
    name: str, value: torch.Tensor | None, init: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """As :func:`param_or_fixed`, the ``pyro.param`` constrained to be positive."""
    if value is not None:
        return value
    return pyro.param(name, init, constraint=dist.constraints.positive)

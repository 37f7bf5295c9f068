"""Wall time of the parts of a computation, CUDA synchronised, for :func:`~pyro_mpt.evaluate`'s
timings."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["Clock", "find_device"]


def find_device(args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.device:
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


class Clock:
    """Wall time per part, synchronising CUDA before each reading so that queued kernels
    are charged to the part that launched them.

    Example::

        clock = Clock(X.device)
        ...                       # the first part
        clock.lap("reference")    # seconds since the start
        clock.total()             # {"reference": ..., "total": ...}
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.timings = {}
        self._sync()
        self.start = self.last = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, part: str) -> float:
        """Seconds since the previous lap (or the start), recorded under ``part``."""
        self._sync()
        now = time.perf_counter()
        self.timings[part] = now - self.last
        self.last = now
        return self.timings[part]

    def total(self) -> dict[str, float]:
        """Every lap and ``"total"``, the seconds since the start."""
        self.timings["total"] = time.perf_counter() - self.start
        return self.timings

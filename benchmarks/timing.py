"""Timing shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this
module is importable as ``timing``)."""

import statistics
import time

import pyro
from pyro.infer import SVI
from pyro.optim import Adam


def median_seconds(step, repeats: int, budget_s: float = float("inf"), warmup: int = 1) -> float:
    """Median wall seconds of ``step()`` over ``repeats`` calls after ``warmup`` calls; one
    call only when the first warm-up call already took more than ``budget_s``."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(repeats if first < budget_s else 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def svi_step_seconds(model, loss, X, repeats: int, budget_s: float) -> float:
    """Median seconds of one guide-free SVI step (loss and backward, Adam) of ``model`` on
    ``X``, from a clear param store and seed 0 (:func:`median_seconds`)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = SVI(model, lambda data: None, Adam({"lr": 0.01}), loss=loss)
    return median_seconds(lambda: svi.step(X), repeats, budget_s)

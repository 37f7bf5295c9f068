"""Shared checks of the discrete and mixed zoo: one :class:`ZooCase` per model, its exact
value computed without pyro_mpt, and the checks every case gets (the reference ``"auto"``
method and value, MaskedELBO's chain and stratified estimates)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import TraceEnum_ELBO

from pyro_mpt import MaskedELBO
from pyro_mpt.reference import log_marginal_likelihood


@dataclass
class ZooCase:
    """A zoo model: ``model(*args)``, its exact ``log p(X)`` (computed without pyro_mpt),
    the method ``"auto"`` must choose, and the options both estimators get."""

    name: str
    model: Callable
    args: tuple
    exact: Callable[[], float]
    method: str
    options: dict = field(default_factory=dict)
    num_samples: int = 1000  # MaskedELBO's prior draws
    ref_samples: int = 20000  # the reference's importance draws
    check_stratified: bool = True
    num_masks: int = 10  # MaskedELBO's mask draws


def empty_guide(*args, **kwargs):
    """The guide of a model whose latents are all enumerated: TraceEnum_ELBO's loss is then
    -log p(X) exactly."""


def trace_enum_exact(model, args, max_plate_nesting):
    """``log p(X)`` by Pyro's own variable elimination (TraceEnum_ELBO, empty guide)."""
    elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting)
    return -elbo.loss(model, empty_guide, *args)


def run_case(case: ZooCase, seed: int = 0) -> dict:
    """The reference and both MaskedELBO estimates of ``case``, with their times."""
    pyro.set_rng_seed(seed)
    out = {"exact": float(case.exact())}
    start = time.perf_counter()
    ref = log_marginal_likelihood(
        case.model, *case.args, num_samples=case.ref_samples, **case.options
    )
    out["ref_time"] = time.perf_counter() - start
    out["ref"] = ref
    for estimator in ("chain", "stratified"):
        elbo = MaskedELBO(
            estimator=estimator,
            num_masks=case.num_masks,
            num_samples=case.num_samples,
            **case.options,
        )
        start = time.perf_counter()
        with torch.no_grad():
            out[estimator] = elbo.estimate(case.model, None, *case.args)
        out[estimator + "_time"] = time.perf_counter() - start
    return out


def check_case(case: ZooCase, result: dict) -> None:
    """The zoo's promises: "auto" takes the expected method; an exact method agrees with
    the independent value to 1e-6 (relative) and so does the chain (it telescopes); a Monte
    Carlo reference is within 3 of its standard errors; the stratified estimate within 4 of
    its standard errors (plus the reference's, for a Monte Carlo route)."""
    exact, ref = result["exact"], result["ref"]
    assert ref.method == case.method, (case.name, ref.method, ref.messages)
    total = float(ref.total)
    if case.method == "exact":
        assert abs(total - exact) <= 1e-6 * abs(exact), (case.name, total, exact)
        chain = float(result["chain"].total)
        assert abs(chain - exact) <= 1e-6 * abs(exact), (case.name, chain, exact)
        ref_se = 0.0
    else:
        ref_se = float(ref.stderr)
        assert abs(total - exact) <= 3 * ref_se, (case.name, total, exact, ref_se)
    if not case.check_stratified:
        return
    strat = result["stratified"]
    se = (strat.stderr**2 + ref_se**2) ** 0.5
    assert abs(float(strat.total) - exact) <= 4 * se + 1e-9 * abs(exact), (
        case.name,
        float(strat.total),
        exact,
        se,
    )

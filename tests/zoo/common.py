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
    # the exact value depends on the run (a subsample drawn afresh by each call): computed
    # after each estimate, for the subsample that estimate saw
    per_run_exact: bool = False


#: the reference methods that are exact (no standard error): compared to 1e-6 relative
EXACT_METHODS = ("exact", "gaussian", "conjugate")


def in_float64(make, *args):
    """``make(*args)`` with float64 as the default dtype: module-level data of the zoo are
    built as the tests build them (tests/conftest.py runs every test in float64), whatever
    the default dtype when the module is imported (probabilities normalised in float32 and
    then cast are no longer normalised in float64)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return make(*args)
    finally:
        torch.set_default_dtype(old)


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
    out = {} if case.per_run_exact else {"exact": float(case.exact())}
    start = time.perf_counter()
    ref = log_marginal_likelihood(
        case.model, *case.args, num_samples=case.ref_samples, **case.options
    )
    out["ref_time"] = time.perf_counter() - start
    if case.per_run_exact:
        out["exact"] = float(case.exact())
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
        if case.per_run_exact:
            out["exact_" + estimator] = float(case.exact())
    return out


def value(x) -> float:
    """A float from an estimate's total (a float, or a tensor that may carry a graph)."""
    return float(torch.as_tensor(x).detach())


def check_case(case: ZooCase, result: dict) -> None:
    """The zoo's promises: "auto" takes the expected method; an exact method
    (:data:`EXACT_METHODS`) agrees with the independent value to 1e-6 (relative) and so does
    the chain (it telescopes); a Monte Carlo reference is within 3 of its standard errors;
    the stratified estimate within 4 of its standard errors (plus the reference's, for a
    Monte Carlo route). With ``per_run_exact``, each estimate is compared with the exact
    value of the subsample it saw."""
    exact, ref = result["exact"], result["ref"]
    assert ref.method == case.method, (case.name, ref.method, ref.messages)
    total = value(ref.total)  # differentiable on the gaussian route: detached here
    if case.method in EXACT_METHODS:
        assert abs(total - exact) <= 1e-6 * abs(exact), (case.name, total, exact)
        chain, chain_exact = value(result["chain"].total), result.get("exact_chain", exact)
        assert abs(chain - chain_exact) <= 1e-6 * abs(chain_exact), (case.name, chain, exact)
        ref_se = 0.0
    else:
        ref_se = float(ref.stderr)
        assert abs(total - exact) <= 3 * ref_se, (case.name, total, exact, ref_se)
    if not case.check_stratified:
        return
    strat = result["stratified"]
    exact = result.get("exact_stratified", exact)
    se = (strat.stderr**2 + ref_se**2) ** 0.5
    assert abs(value(strat.total) - exact) <= 4 * se + 1e-9 * abs(exact), (
        case.name,
        value(strat.total),
        exact,
        se,
    )

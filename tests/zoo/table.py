"""The zoo table of the discrete, mixed and whole-sequence models (``python -m
tests.zoo.table``): for each model, the method ``"auto"`` chose for the reference, its
error against the exact value and its z-score (error / standard error, "-" for an exact
method), the same for MaskedELBO's chain and stratified estimates, and the time of one
stratified MaskedELBO step (one mask draw) relative to one Pyro ELBO step on the same model
(``TraceEnum_ELBO`` or ``Trace_ELBO``, with an empty guide or an ``AutoNormal`` guide over
the continuous latents). A subsampled model's errors are against the exact value of the
subsample each call drew (its ``exact`` column: the reference's subsample)."""

from __future__ import annotations

import math
import time

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_mpt import MaskedELBO

from . import (
    test_conjugate,
    test_gaussian_hmm,
    test_hmms,
    test_mixtures,
    test_zoo_linear_gaussian,
    test_zoo_semantics,
)
from .common import EXACT_METHODS, empty_guide, run_case, value

MODULES = [
    test_conjugate,
    test_mixtures,
    test_hmms,
    test_gaussian_hmm,
    test_zoo_linear_gaussian,
    test_zoo_semantics,
]


def _median_time(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _pyro_step_time(case):
    """One loss evaluation of Pyro's TraceEnum_ELBO (Trace_ELBO for a model without
    enumerated sites) on the case's model, one particle, with an AutoNormal guide over the
    latents that are not enumerated."""
    trace = poutine.trace(case.model).get_trace(*case.args)
    continuous = [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and site["infer"].get("enumerate") != "parallel"
        and type(site["fn"]).__name__ != "_Subsample"
    ]
    enumerated = any(
        site["type"] == "sample" and site["infer"].get("enumerate") == "parallel"
        for site in trace.nodes.values()
    )
    pyro.clear_param_store()
    guide = AutoNormal(poutine.block(case.model, expose=continuous)) if continuous else empty_guide
    elbo = TraceEnum_ELBO(max_plate_nesting=2) if enumerated else Trace_ELBO()
    elbo.loss(case.model, guide, *case.args)  # builds the guide's parameters
    return _median_time(lambda: elbo.loss(case.model, guide, *case.args))


def _mpt_step_time(case):
    elbo = MaskedELBO(num_masks=1, num_samples=case.num_samples, **case.options)
    return _median_time(lambda: elbo.loss(case.model, None, *case.args))


def _err(estimate, exact, se):
    err = abs(value(estimate) - exact)
    z = "-" if not se or not math.isfinite(se) else f"{(value(estimate) - exact) / se:+.2f}"
    return err, z


def rows():
    """One row per zoo case of the modules in :data:`MODULES`."""
    out = []
    for module in MODULES:
        for case in module.CASES:
            result = run_case(case)
            exact, ref = result["exact"], result["ref"]
            ref_se = 0.0 if ref.method in EXACT_METHODS else float(ref.stderr)
            ratio = _mpt_step_time(case) / _pyro_step_time(case)
            strat = result["stratified"]
            strat_se = math.sqrt(strat.stderr**2 + ref_se**2)
            out.append(
                (
                    case.name,
                    f"{ref.method}/{strat.conditionals}",
                    exact,
                    *_err(ref.total, exact, ref_se),
                    abs(value(result["chain"].total) - result.get("exact_chain", exact)),
                    *_err(strat.total, result.get("exact_stratified", exact), strat_se),
                    ratio,
                )
            )
    return out


def main():
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # as the test suite runs (tests/conftest.py)
    header = (
        f"{'model':36s} {'method (ref/MPT)':25s} {'exact':>10s} {'|err| ref':>10s} "
        f"{'z':>6s} {'|err| chain':>11s} {'|err| strat':>11s} {'z':>6s} {'time/Pyro':>9s}"
    )
    print(header)
    print("-" * len(header))
    for name, method, exact, e_ref, z_ref, e_chain, e_strat, z_strat, ratio in rows():
        print(
            f"{name:36s} {method:25s} {exact:10.4f} {e_ref:10.2e} {z_ref:>6s} "
            f"{e_chain:11.2e} {e_strat:11.2e} {z_strat:>6s} {ratio:9.1f}"
        )


if __name__ == "__main__":
    main()

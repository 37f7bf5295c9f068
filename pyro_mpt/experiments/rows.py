r"""The rows of ``report.md``: for each experiment, what was measured, the verdict on the
paper's claim (:mod:`~pyro_mpt.experiments.fidelity`) and the rule that gave it.

Each row function takes the experiment's results, one per seed (the binary and MLM
comparisons run over several seeds, the others once: their spread is the Monte Carlo error
they report themselves), and returns ``(measured, verdict, rule)``.
"""

from __future__ import annotations

import math
from typing import Any

from .fidelity import NOT_DISTINGUISHABLE, SeedSpread, combine, verdict

__all__ = ["ROWS"]

#: the interval's critical value for single-run checks with a standard error
_Z = 3.0


def _row_convergence(runs: list[Any]) -> tuple[str, str, str]:
    r = runs[0]
    err = r.final_abs_error
    measured = "; ".join(f"T={T}: {float(e):.3g}" for T, e in zip(r.T_values, err))
    measured = (
        f"final |MPT − LML| per sequence at p={r.permutations[-1]} "
        f"(mean of {r.repeats} repeats): {measured}"
    )
    # one difference |error at the first p| - |error at the last p| per T and repeat
    shrink = SeedSpread.of((r.errors[:, 0].abs() - r.errors[:, -1].abs()).flatten().tolist())
    rule = (
        f"|error| at p={r.permutations[0]} minus at p={r.permutations[-1]}: "
        f"{shrink.mean:.3g} ± {shrink.stderr:.2g} (s.e. over {shrink.n} T x repeats) > 0"
    )
    return measured, shrink.verdict("positive"), rule


def _row_area(runs: list[Any]) -> tuple[str, str, str]:
    r = runs[0]
    a, se, z = r.areas[-1], r.area_stderr[-1], r.z_scores()[-1]
    measured = (
        f"area {a / r.N:.4f} ± {se / r.N:.4f} vs exact LML {r.exact / r.N:.4f} nats/seq "
        f"(p={r.permutations[-1]}; p={r.permutations[0]}: {r.areas[0] / r.N:.4f})"
    )
    ok = verdict(a - r.exact, se, "zero", _Z) if math.isfinite(se) else NOT_DISTINGUISHABLE
    return measured, ok, f"area − LML = 0 within {_Z:g} s.e. (z = {z:.2f})"


def _row_training(runs: list[Any]) -> tuple[str, str, str]:
    r = runs[0]
    strat, fixed = r.final_lml("stratified"), r.final_lml("fixed 80%")
    measured = (
        f"final LML/seq: stratified {strat:.4f}, fixed 80% {fixed:.4f}; "
        f"closed-form ML {r.ml_lml:.4f}"
    )
    # the spread is the optimiser's noise: the exact LMLs of the last quarter of the
    # recorded steps; their sd (not divided by sqrt(n): successive steps are correlated)
    tail = max(2, len(r.steps) // 4)
    s, f = r.lml["stratified"][-tail:], r.lml["fixed 80%"][-tail:]
    gap = SeedSpread.of((s - r.ml_lml).tolist())
    beats = SeedSpread.of((s - f).tolist())
    tol = 0.05
    reach = verdict(max(0.0, abs(gap.mean) - tol), gap.sd, "zero", 2.0)
    apart = verdict(beats.mean, beats.sd, "positive", 2.0)
    rule = (
        f"stratified − ML {gap.mean:+.4f} ± {gap.sd:.4f} within {tol} + 2 sd: {reach}; "
        f"stratified − fixed 80% {beats.mean:+.4f} ± {beats.sd:.4f} > 2 sd: {apart} "
        f"(sd over the last {tail} recorded steps)"
    )
    return measured, combine([reach, apart]), rule


def _row_binary(runs: list[Any]) -> tuple[str, str, str]:
    r = runs[0]
    diff = SeedSpread.of([x.lml_mpt - x.lml_vae for x in runs])
    mpt = SeedSpread.of([x.lml_mpt for x in runs])
    vae = SeedSpread.of([x.lml_vae for x in runs])
    measured = (
        f"LML/image: MPT-trained {mpt.mean:.3f} ± {mpt.sd:.3f}, VAE {vae.mean:.3f} ± "
        f"{vae.sd:.3f} ({r.data_source}, N={r.N}; mean ± sd over {diff.n} seeds)"
    )
    rule = f"MPT-trained − VAE = {diff.text()} > 0 (95% t interval of the mean)"
    return measured, diff.verdict("positive"), rule


def _row_mlm(runs: list[Any]) -> tuple[str, str, str]:
    def over(key):
        return SeedSpread.of([x.areas[key] for x in runs])

    lml = SeedSpread.of([x.exact_lml for x in runs])
    exact_gap = SeedSpread.of([x.areas["exact"] - x.exact_lml for x in runs])
    trained = SeedSpread.of(
        [min(x.areas["fixed"], x.areas["uniform"]) - x.areas["untrained"] for x in runs]
    )
    closer = SeedSpread.of(
        [abs(x.gaps["fixed"]) - abs(x.gaps["uniform"]) for x in runs]  # > 0: (b) closer
    )
    measured = (
        f"nats/token, mean ± sd over {lml.n} seeds: exact LML {lml.mean:.4f} ± {lml.sd:.4f}; "
        f"areas: exact predictor {over('exact').mean:.4f}, (a) fixed 15% "
        f"{over('fixed').mean:.4f} ± {over('fixed').sd:.4f}, (b) uniform rates "
        f"{over('uniform').mean:.4f} ± {over('uniform').sd:.4f}, (c) untrained "
        f"{over('untrained').mean:.4f}"
    )
    parts = [exact_gap.verdict("zero"), trained.verdict("positive"), closer.verdict("positive")]
    rule = (
        f"exact predictor's area − LML {exact_gap.text(4)} = 0: {parts[0]}; trained − "
        f"untrained area {trained.text(4)} > 0: {parts[1]}; |gap (a)| − |gap (b)| "
        f"{closer.text(4)} > 0, (b) closer: {parts[2]}"
    )
    return measured, combine(parts), rule


#: experiment name -> row function over its per-seed results
ROWS = {
    "convergence": _row_convergence,
    "area": _row_area,
    "training": _row_training,
    "binary": _row_binary,
    "mlm": _row_mlm,
}

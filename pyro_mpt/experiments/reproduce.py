r"""Runs the paper's experiments end to end: every figure as a PNG and a ``report.md`` with
each experiment's headline number beside the paper's claim.

``quick=True`` runs reduced sizes (a CPU in well under two minutes); ``quick=False`` runs the
paper's sizes (see :data:`~pyro_mpt.experiments.reproduce.PRESETS`). The command line is ``pyro-mpt reproduce``.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from typing import Any

import torch

from ..mlm.experiment import mlm_experiment
from ..progress import logger, progress_bar
from .area import area
from .binary import binary
from .convergence import convergence
from .training import training

__all__ = ["EXPERIMENTS", "PRESETS", "reproduce", "check_device"]

#: The experiments, in the order they run.
EXPERIMENTS = ("convergence", "area", "training", "binary", "mlm")

#: Keyword arguments of each experiment per size preset. ``"full"`` is the paper's sizes,
#: ``"quick"`` a CPU run in under two minutes; ``"_tiny"`` is for the test suite.
PRESETS = {
    "full": {
        "convergence": dict(
            T_values=(5, 10, 20, 50),
            K=2,
            N=100,
            permutations=(1, 3, 10, 30, 100, 300),
            repeats=5,
        ),
        "area": dict(T=200, K=5, N=1000, permutations=(1, 100), share_masks=True),
        "training": dict(T=10, N=2000, K=2, steps=1500, lr=0.05, record_every=10),
        "binary": dict(data=None, K=2, steps=3000, batch_size=128, lr=0.05),
        "mlm": dict(quick=False),
    },
    "quick": {
        "convergence": dict(
            T_values=(5, 10, 20, 50), K=2, N=100, permutations=(1, 3, 10, 30, 100), repeats=3
        ),
        "area": dict(T=100, K=5, N=500, permutations=(1, 100), share_masks=True),
        "training": dict(T=10, N=1000, K=2, steps=300, lr=0.05, record_every=5),
        "binary": dict(
            data=None,
            K=2,
            steps=1000,
            batch_size=128,
            lr=0.05,
            num_data=None,
            train_quadrature_points=10,
        ),
        "mlm": dict(quick=True),
    },
    "_tiny": {
        "convergence": dict(T_values=(4, 8), K=2, N=20, permutations=(1, 30)),
        "area": dict(T=20, K=2, N=50, permutations=(1, 10), share_masks=True),
        "training": dict(T=5, N=200, K=2, steps=30, lr=0.1, record_every=5),
        "binary": dict(data="synthetic", K=2, steps=10, batch_size=30, num_data=60),
        "mlm": dict(
            num_states=3,
            vocab_size=5,
            seq_len=6,
            num_train=200,
            num_test=30,
            steps=15,
            num_masks=2,
            batch_size=16,
        ),
    },
}

#: The paper's claim per experiment, as written in the report.
CLAIMS = {
    "convergence": "the stratified estimate minus the exact LML shrinks to 0 as the "
    "permutations per size grow (1..300)",
    "area": "the area under S(m) is the LML (1 and 100 permutations per size)",
    "training": "cumulative MPT training reaches the LML of the ML fit; a fixed 80% rate "
    "converges elsewhere",
    "binary": "MPT-trained Bernoulli latent model vs a linear VAE trained by its ELBO, both "
    "scored by the 20 x 20 quadrature LML (MPT trains the LML itself: it should not be worse)",
    "mlm": "masked-LM loss against mask rate: a trained model has the larger area; with a known "
    "LML (HMM data) the area of an exact predictor is the LML and the cumulative (uniform-rate) "
    "objective should land closer to it than a fixed 15% rate",
}


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, or a ValueError saying why it cannot be used."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but torch.cuda.is_available() is False")
    if dev.type == "mps" and not (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    ):
        raise ValueError(f"device {device!r} was requested but MPS is not available")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: only cpu, cuda and mps are supported")
    return dev


def _row_convergence(r):
    err = r.final_abs_error
    first = r.abs_errors[:, 0]
    measured = "; ".join(f"T={T}: {float(e):.3g}" for T, e in zip(r.T_values, err))
    measured = (
        f"final |MPT − LML| per sequence at p={r.permutations[-1]} "
        f"(mean of {r.repeats} repeats): {measured}"
    )
    ok = bool(err.mean() < first.mean())
    rule = f"mean error at p={r.permutations[-1]} ({float(err.mean()):.3g}) < at p={r.permutations[0]} ({float(first.mean()):.3g})"
    return measured, ok, rule


def _row_area(r):
    a, se, z = r.areas[-1], r.area_stderr[-1], r.z_scores()[-1]
    measured = (
        f"area {a / r.N:.4f} ± {se / r.N:.4f} vs exact LML {r.exact / r.N:.4f} nats/seq "
        f"(p={r.permutations[-1]}; p={r.permutations[0]}: {r.areas[0] / r.N:.4f})"
    )
    ok = math.isfinite(z) and abs(z) < 3
    return measured, ok, f"|area − LML| / s.e. = {abs(z):.2f} < 3"


def _row_training(r):
    strat, fixed = r.final_lml("stratified"), r.final_lml("fixed 80%")
    measured = (
        f"final LML/seq: stratified {strat:.4f}, fixed 80% {fixed:.4f}; "
        f"closed-form ML {r.ml_lml:.4f}"
    )
    tol = 0.05
    ok = (r.ml_lml - strat) < tol and strat > fixed
    rule = f"ML − stratified ({r.ml_lml - strat:.4f}) < {tol} and stratified > fixed 80%"
    return measured, ok, rule


def _row_binary(r):
    measured = (
        f"LML/image: MPT-trained {r.lml_mpt:.3f}, VAE {r.lml_vae:.3f} ({r.data_source}, N={r.N})"
    )
    ok = math.isfinite(r.lml_mpt) and r.lml_mpt >= r.lml_vae
    return measured, ok, f"MPT-trained − VAE = {r.lml_mpt - r.lml_vae:+.3f} nats/image ≥ 0"


def _row_mlm(r):
    se_exact = r.area_stderr["exact"]
    z_exact = (r.areas["exact"] - r.exact_lml) / se_exact if se_exact > 0 else 0.0
    diff, se = r.paired_difference("uniform", "fixed")
    measured = (
        f"nats/token: exact LML {r.exact_lml:.4f}; areas: exact predictor "
        f"{r.areas['exact']:.4f}, (a) fixed 15% {r.areas['fixed']:.4f}, (b) uniform rates "
        f"{r.areas['uniform']:.4f}, (c) untrained {r.areas['untrained']:.4f}; (b) - (a) = "
        f"{diff:+.4f} ± {se:.4f} ({'(b)' if r.uniform_closer else '(a)'} closer to the LML)"
    )
    trained = min(r.areas["fixed"], r.areas["uniform"])
    ok = abs(z_exact) < 3 and trained > r.areas["untrained"]
    rule = (
        f"exact predictor's area within 3 s.e. of the LML (z = {z_exact:.2f}) and trained "
        "areas above the untrained one; which of (a), (b) is closer is reported, not checked"
    )
    return measured, ok, rule


_ROWS = {
    "convergence": _row_convergence,
    "area": _row_area,
    "training": _row_training,
    "binary": _row_binary,
    "mlm": _row_mlm,
}

_FUNCS = {
    "convergence": convergence,
    "area": area,
    "training": training,
    "binary": binary,
    "mlm": mlm_experiment,
}


def _notes(name, r):
    notes = []
    if name == "area" and r.share_masks:
        notes.append("masks shared across sequences (share_masks=True) for speed; unbiased")
    if name == "binary":
        notes.append(
            f"MaskedELBO estimator {r.estimator!r} with {r.train_quadrature_points} x "
            f"{r.train_quadrature_points} quadrature conditionals on minibatches (scored on "
            "20 x 20); VAE: linear Gaussian encoder, Trace_ELBO"
        )
        if r.data_source == "synthetic":
            notes.append(
                "synthetic images from a Bernoulli latent linear model "
                "(scikit-learn not installed: `pip install scikit-learn` for the digits)"
                + (f"; true parameters' LML {r.lml_truth:.3f}/image" if r.lml_truth else "")
            )
        for m in dict.fromkeys(r.messages):
            notes.append("scoring: " + m)
    return notes


def _cell(text):
    """Escapes ``|`` for a markdown table cell."""
    return text.replace("|", "\\|")


def _write_report(path, rows, details, *, preset, seed, device, elapsed):
    lines = [
        "# pyro_mpt: reproduction of Moreno-Muñoz et al. (2023)",
        "",
        f"Sizes: `{preset}`; seed {seed}; device `{device}`; total {sum(elapsed.values()):.1f} s.",
        "",
        "| Experiment | Measured | Paper's claim | Consistent | Check | Figure | Time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (measured, ok, rule) in rows.items():
        measured, rule = _cell(measured), _cell(rule)
        lines.append(
            f"| {name} | {measured} | {CLAIMS[name]} | {'yes' if ok else 'NO'} | {rule} | "
            f"[{name}.png]({name}.png) | {elapsed[name]:.1f} s |"
        )
    lines.append("")
    for name, (headline, notes) in details.items():
        lines.append(f"## {name}")
        lines.append("")
        lines.append(headline)
        for n in notes:
            lines.append(f"- {n}")
        lines.append("")
        lines.append(f"![{name}]({name}.png)")
        lines.append("")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def reproduce(
    output_dir: str | os.PathLike[str],
    quick: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool | None = None,
    only: str | Iterable[str] | None = None,
    _preset: str | None = None,
) -> dict[str, Any]:
    """Runs the experiments, writes ``<name>.png`` for each and ``report.md`` into
    ``output_dir`` (created if missing), and returns ``{name: result}``.

    Example::

        results = reproduce("out", quick=True)
        print(open("out/report.md").read())

    :param str output_dir: where the figures and the report go.
    :param bool quick: reduced sizes (:data:`~pyro_mpt.experiments.reproduce.PRESETS` ``"quick"``) instead of the paper's.
    :param str device: torch device (``"cpu"``, ``"cuda"``...).
    :param int seed: seeds every experiment.
    :param bool progress: a tqdm bar over the experiments; ``None``: only on a terminal.
    :param only: an experiment name or a list of them (default: all of :data:`EXPERIMENTS`).
    :raises ValueError: for an unusable device or an unknown experiment name.
    """
    device = check_device(device)
    preset = _preset or ("quick" if quick else "full")
    sizes = PRESETS[preset]
    if only is None:
        names = list(EXPERIMENTS)
    else:
        names = [only] if isinstance(only, str) else list(only)
        bad = [n for n in names if n not in EXPERIMENTS]
        if bad:
            raise ValueError(f"unknown experiment(s) {bad}; choose from {list(EXPERIMENTS)}")
        names = [n for n in EXPERIMENTS if n in names]
    os.makedirs(output_dir, exist_ok=True)

    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    results, rows, details, elapsed = {}, {}, {}, {}
    try:
        bar = progress_bar(len(names), progress, "experiments", unit="experiment")
        for i, name in enumerate(names):
            bar.set_postfix_str(name)
            logger.info("experiment %s (%d of %d) started", name, i + 1, len(names))
            start = time.perf_counter()
            r = _FUNCS[name](seed=seed, device=device, **sizes[name])
            elapsed[name] = time.perf_counter() - start
            fig = r.figure()
            fig = getattr(fig, "figure", fig)  # mlm_experiment's figure() returns its Axes
            fig.savefig(os.path.join(output_dir, f"{name}.png"), dpi=120)
            fig.clf()
            results[name] = r
            rows[name] = _ROWS[name](r)
            details[name] = (r.headline(), _notes(name, r))
            bar.update()
            logger.info("experiment %s done in %.1f s", name, elapsed[name])
        bar.close()
    finally:
        torch.set_default_dtype(old_dtype)
    _write_report(
        os.path.join(output_dir, "report.md"),
        rows,
        details,
        preset=preset,
        seed=seed,
        device=device,
        elapsed=elapsed,
    )
    return results

r"""Runs the paper's experiments end to end: every figure as a PNG and a ``report.md`` with
each experiment's headline number beside the paper's claim.

``quick=True`` runs reduced sizes (a few minutes on a 2-core CPU, see the README);
``quick=False`` runs the paper's sizes (see :data:`~pyro_mpt.experiments.reproduce.PRESETS`).
The binary and MLM comparisons run over :data:`~pyro_mpt.experiments.reproduce.SEEDS` seeds
and every row of the report carries a verdict that follows from the spread
(:mod:`~pyro_mpt.experiments.fidelity`). The command line is ``pyro-mpt reproduce``.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

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
from .rows import ROWS
from .training import training

__all__ = ["EXPERIMENTS", "PRESETS", "SEEDS", "reproduce", "check_device"]

#: The experiments, in the order they run.
EXPERIMENTS = ("convergence", "area", "training", "binary", "mlm")

#: Keyword arguments of each experiment per size preset. ``"full"`` is the paper's sizes,
#: ``"quick"`` a CPU run of a few minutes; ``"_tiny"`` is for the test suite.
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
        # binary and mlm run once per seed (SEEDS), so each run is about a fifth of the
        # single run they used to be (1000 and 800 steps): 200 steps at twice the rate on an
        # 8 x 8 training grid, and 200 steps of each TinyMLM
        "binary": dict(
            data=None,
            K=2,
            steps=200,
            batch_size=128,
            lr=0.1,
            num_data=None,
            train_quadrature_points=8,
        ),
        "mlm": dict(quick=True, steps=200),
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

#: Seeds per size preset of the comparisons whose verdict rests on the spread over seeds
#: (binary: MPT against the VAE; mlm: the cumulative objective against a fixed rate): seeds
#: ``seed, seed + 1, ...``; the figure and the details are the first seed's.
SEEDS = {"full": 5, "quick": 5, "_tiny": 2}
SEEDED = ("binary", "mlm")

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


_FUNCS = {
    "convergence": convergence,
    "area": area,
    "training": training,
    "binary": binary,
    "mlm": mlm_experiment,
}


def _seeds(name, seed, preset):
    """The seeds ``name`` runs with: several for the comparisons in :data:`SEEDED`."""
    return list(range(seed, seed + (SEEDS[preset] if name in SEEDED else 1)))


def _notes(name, r, seeds):
    notes = []
    if len(seeds) > 1:
        notes.append(
            f"run with seeds {seeds[0]}..{seeds[-1]}; the verdict rests on the spread over "
            f"these {len(seeds)} seeds; the numbers below and the figure are seed {seeds[0]}'s"
        )
    if name == "area" and r.share_masks:
        notes.append("masks shared across sequences (share_masks=True) for speed; unbiased")
    if name == "binary":
        notes.append(
            f"{len(r.mpt_objective)} training steps per model: the verdict is about this "
            "training budget (the MPT objective converges more slowly than the VAE's ELBO); "
            "`--full` trains 3000 steps"
        )
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
        f"Verdicts follow from the spread (`pyro_mpt.experiments.fidelity`): binary and mlm "
        f"over {SEEDS[preset]} seeds from {seed} (mean ± sd; 95% t interval of the mean), the "
        "others from their own standard errors; *not distinguishable* means the interval "
        "cannot tell the claim from its opposite at this size.",
        "",
        "| Experiment | Measured | Paper's claim | Verdict | Check | Figure | Time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (measured, ok, rule) in rows.items():
        measured, rule = _cell(measured), _cell(rule)
        lines.append(
            f"| {name} | {measured} | {CLAIMS[name]} | {ok} | {rule} | "
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
        seeds = {n: _seeds(n, seed, preset) for n in names}
        bar = progress_bar(sum(map(len, seeds.values())), progress, "runs", unit="run")
        for i, name in enumerate(names):
            logger.info("experiment %s (%d of %d) started", name, i + 1, len(names))
            start = time.perf_counter()
            runs = []
            for s in seeds[name]:
                bar.set_postfix_str(f"{name}, seed {s}")
                runs.append(_FUNCS[name](seed=s, device=device, **sizes[name]))
                bar.update()
            elapsed[name] = time.perf_counter() - start
            r = runs[0]
            fig = r.figure()
            fig = getattr(fig, "figure", fig)  # mlm_experiment's figure() returns its Axes
            fig.savefig(os.path.join(output_dir, f"{name}.png"), dpi=120)
            fig.clf()
            results[name] = r
            rows[name] = ROWS[name](runs)
            details[name] = (r.headline(), _notes(name, r, seeds[name]))
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

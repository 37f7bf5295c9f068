"""The ``pyro-mpt`` command line (also ``python -m pyro_mpt``).

Subcommands:

``pyro-mpt demo [--seed S] [--steps N] [--device cpu|cuda] [--plot FILE]``
    Trains probabilistic PCA by SVI on :class:`~pyro_mpt.MaskedELBO` (stratified masks), then
    compares the cumulative masked pre-training score (the area under the MPT curve) with the
    exact log marginal likelihood of the trained model and of the closed-form
    maximum-likelihood PPCA fit.

``pyro-mpt reproduce --output DIR [--quick | --full] [--device D] [--seed S] [--only NAME]``
    Runs the paper's experiments (:func:`pyro_mpt.experiments.reproduce`) and writes one PNG
    per experiment and ``report.md`` into ``DIR``.

Every argument is checked before the work starts (a bad one is a usage error, exit code 2).
Log lines (``-v`` more, ``-q`` fewer) and, when stderr is not a terminal, periodic progress
lines go to stderr; results go to stdout. Heavy imports (torch, pyro) happen inside the
subcommand so ``pyro-mpt --help`` is instant.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from .cli_args import StepReporter, figure_path, logging_to_stderr, output_dir, positive_float

if TYPE_CHECKING:
    import torch

__all__ = ["main", "demo"]


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="pyro-mpt",
        description="Masked pre-training as log marginal likelihood, for Pyro models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    talk = common.add_mutually_exclusive_group()
    talk.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        const=1,
        default=0,
        dest="verbosity",
        help="log the package's decisions (backends, chunk sizes) too",
    )
    talk.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbosity",
        help="no progress or log lines, only warnings and results",
    )
    _add_demo_parser(sub, common)
    _add_reproduce_parser(sub, common)
    return parser


def _add_demo_parser(sub, common):
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="train PPCA with MaskedELBO and compare the MPT estimate with the exact LML",
        description=(
            "Generate PPCA data, train the collapsed PPCA model by SVI on MaskedELBO "
            "(stratified estimator), and print the MPT estimate of log p(X) against the exact "
            "log marginal likelihood of the trained model and of the closed-form "
            "maximum-likelihood PPCA solution."
        ),
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--steps", type=_positive_int, default=300, help="SVI steps (default: 300)")
    p.add_argument(
        "--device", default="cpu", help="torch device for data and parameters (default: cpu)"
    )
    p.add_argument("--num-data", type=_positive_int, default=200, help="sequences N (default: 200)")
    p.add_argument(
        "--num-tokens", type=_positive_int, default=10, help="tokens per sequence T (default: 10)"
    )
    p.add_argument("--latent-dim", type=_positive_int, default=2, help="latent dim K (default: 2)")
    p.add_argument(
        "--noise-scale",
        type=positive_float,
        default=0.5,
        help="true noise scale sigma (default: 0.5)",
    )
    p.add_argument(
        "--lr", type=positive_float, default=0.05, help="Adam learning rate (default: 0.05)"
    )
    p.add_argument(
        "--num-masks",
        type=_positive_int,
        default=4,
        help="masks per size for the final MPT curve (default: 4)",
    )
    p.add_argument(
        "--plot",
        metavar="FILE",
        type=figure_path,
        default=None,
        help="also save the MPT curve S(m) to FILE (needs matplotlib: pip install pyro-mpt[plots])",
    )
    p.set_defaults(func=_run_demo)


def _add_reproduce_parser(sub, common):
    r = sub.add_parser(
        "reproduce",
        parents=[common],
        help="run the paper's experiments; write their figures and report.md",
        description=(
            "Run the experiments of Moreno-Muñoz et al. (2023) -- convergence, area, training, "
            "binary -- and write one PNG per experiment and report.md (each headline number "
            "beside the paper's claim) into the output directory."
        ),
    )
    r.add_argument(
        "--output", "-o", required=True, metavar="DIR", type=output_dir, help="output directory"
    )
    size = r.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="quick",
        action="store_true",
        default=True,
        help="reduced sizes, a CPU in under two minutes (default)",
    )
    size.add_argument("--full", dest="quick", action="store_false", help="the paper's sizes (slow)")
    r.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    r.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        choices=("convergence", "area", "training", "binary", "mlm"),
        help="run only this experiment (repeatable): convergence, area, training, binary, mlm",
    )
    r.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bar (default: shown on a terminal)",
    )
    r.set_defaults(func=_run_reproduce)


def _version():
    try:
        from importlib.metadata import version

        return version("pyro-mpt")
    except Exception:  # not installed (e.g. run from a source tree)
        return "unknown"


def demo(
    seed: int = 0,
    steps: int = 300,
    device: str | torch.device = "cpu",
    num_data: int = 200,
    num_tokens: int = 10,
    latent_dim: int = 2,
    noise_scale: float = 0.5,
    lr: float = 0.05,
    num_masks: int = 4,
    progress: bool | None = None,
    plot: str | os.PathLike[str] | None = None,
    file: TextIO | None = None,
) -> dict[str, float | int | None]:
    """Runs the PPCA demo and prints its table; returns the numbers as a dict.

    :param int seed: random seed for data, initialisation and masks.
    :param int steps: SVI steps.
    :param str device: torch device for data and parameters.
    :param int num_data: N, sequences.
    :param int num_tokens: T, tokens per sequence.
    :param int latent_dim: K.
    :param float noise_scale: true noise scale of the generated data.
    :param float lr: Adam learning rate.
    :param int num_masks: masks per mask size for the final MPT curve.
    :param bool progress: show a progress bar; ``None`` shows it only on a terminal.
    :param str plot: optional path to save the MPT curve figure to.
    :param file: text stream for the table (default ``sys.stdout``).
    :returns: dict with keys ``"mpt"``, ``"mpt_stderr"``, ``"trained"``, ``"ml"``,
        ``"truth"`` (log p(X) in nats) and ``"num_data"``.
    """
    import pyro
    import torch
    from pyro.infer import SVI
    from pyro.optim import Adam

    from pyro_mpt import MaskedELBO, mpt_curve
    from pyro_mpt.experiments.reproduce import check_device
    from pyro_mpt.models import (
        ppca_collapsed,
        ppca_log_marginal,
        ppca_maximum_likelihood,
        sample_ppca,
    )
    from pyro_mpt.progress import logger

    file = sys.stdout if file is None else file
    device = check_device(device)

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    N, T, K = num_data, num_tokens, latent_dim
    X, truth = sample_ppca(
        num_data=N, num_tokens=T, latent_dim=K, noise_scale=noise_scale, dtype=torch.float64
    )
    X = X.to(device)
    truth = {k: torch.as_tensor(v).to(device) for k, v in truth.items()}

    def model(data):
        return ppca_collapsed(data, K)

    svi = SVI(model, None, Adam({"lr": lr}), loss=MaskedELBO(estimator="stratified", num_masks=1))
    logger.info("demo: %d SVI steps on PPCA (N=%d, T=%d, K=%d), device %s", steps, N, T, K, device)
    # a bar on a terminal; log lines every few seconds when piped, so the run is never silent
    bar = StepReporter(steps, progress, "SVI (MaskedELBO, stratified)")
    for _ in range(steps):
        bar.update(loss_per_seq=svi.step(X) / N)
    bar.close()

    logger.info("demo: MPT curve (%d masks per size) and exact log p(X)", num_masks)
    with torch.no_grad():
        trained = {name: pyro.param(name).detach() for name in ("W", "loc", "noise_scale")}
        curve = mpt_curve(model, X, num_masks=num_masks)
        ml = ppca_maximum_likelihood(X, K)
        results = {
            "mpt": float(curve.area),
            "mpt_stderr": _area_stderr(curve),
            "trained": float(ppca_log_marginal(X, **trained)),
            "ml": float(ppca_log_marginal(X, **ml)),
            "truth": float(ppca_log_marginal(X, **truth)),
            "num_data": N,
        }

    _print_table(results, N=N, T=T, K=K, steps=steps, seed=seed, device=device, file=file)
    if plot is not None:
        _save_curve(curve, results, plot)
        print(f"MPT curve saved to {plot}", file=file)
    file.flush()
    return results


def _area_stderr(curve):
    """The standard error of the curve's area (None when unknown: one mask per size)."""
    se = float(curve.area_stderr)
    return None if math.isnan(se) else se


def _print_table(r, *, N, T, K, steps, seed, device, file):
    se = r["mpt_stderr"]
    rows = [
        ("MPT estimate (area of S(m), trained model)", r["mpt"], se),
        ("exact log p(X), trained model", r["trained"], None),
        ("exact log p(X), closed-form ML PPCA", r["ml"], None),
        ("exact log p(X), true parameters", r["truth"], None),
    ]
    print(
        f"PPCA: N={N} sequences, T={T} tokens, K={K}; {steps} SVI steps, seed {seed}, "
        f"device {device}",
        file=file,
    )
    w = max(len(name) for name, _, _ in rows)
    header = f"{'':<{w}}  {'log p(X) [nats]':>16}  {'± s.e.':>8}  {'per sequence':>12}"
    print(header, file=file)
    print("-" * len(header), file=file)
    for name, value, err in rows:
        err_text = "" if err is None else f"{err:.2f}"
        print(f"{name:<{w}}  {value:>16.2f}  {err_text:>8}  {value / N:>12.4f}", file=file)
    gap = r["mpt"] - r["trained"]
    print(
        f"MPT - exact (trained): {gap:+.2f} nats ({gap / N:+.4f} per sequence)"
        + ("" if se is None or se == 0 else f", {gap / se:+.1f} standard errors"),
        file=file,
    )


def _save_curve(curve, results, path):
    """The demo's curve (:func:`~pyro_mpt.plotting.plot_curve`, s.e. band around the curve)
    with the trained model's exact log p(X) as the reference line."""
    from pyro_mpt.plotting import bare_axes, plot_curve

    fig, ax = bare_axes(figsize=(6.5, 4.2))
    plot_curve(curve, reference=results["trained"], ax=ax, per_sequence=True, shade="band")
    N = results["num_data"]
    ax.set_title(
        f"PPCA demo: MPT curve, area {results['mpt'] / N:.3f} vs exact "
        f"{results['trained'] / N:.3f} nats/sequence",
        fontsize="medium",
    )
    fig.savefig(path, dpi=120)
    return fig


def _run_demo(args, parser):
    # arviz >= 0.23 prints a FutureWarning about its own refactor once a day on import; it is
    # noise in a command-line demo.
    warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
    from pyro_mpt.experiments.reproduce import check_device

    try:
        check_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    demo(
        seed=args.seed,
        steps=args.steps,
        device=args.device,
        num_data=args.num_data,
        num_tokens=args.num_tokens,
        latent_dim=args.latent_dim,
        noise_scale=args.noise_scale,
        lr=args.lr,
        num_masks=args.num_masks,
        plot=args.plot,
        progress=False if args.verbosity < 0 else None,
    )
    return 0


def _run_reproduce(args, parser):
    warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
    from pyro_mpt.experiments.reproduce import check_device, reproduce

    try:
        check_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    reproduce(
        args.output,
        quick=args.quick,
        device=args.device,
        seed=args.seed,
        progress=False if args.verbosity < 0 else args.progress,
        only=args.only,
    )
    print(f"figures and report written to {args.output}/report.md")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyro-mpt``; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    with logging_to_stderr(args.verbosity):
        return args.func(args, parser)


if __name__ == "__main__":
    sys.exit(main())

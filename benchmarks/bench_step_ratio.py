"""Benchmark: one training step (loss + backward) of MaskedELBO against a Trace_ELBO step on
the same model, in one process, reported as ratios. The DEFAULT, ``MaskedELBO()``, comes
first.

Model: collapsed PPCA (``pyro_mpt.models.ppca_collapsed``), N sequences of T tokens, K = 5,
float64; Trace_ELBO runs the same model (no latents, so its loss is -log p(X) exactly and its
step is the cost of one exact log-likelihood and its gradient). One thread by default, as a
user's laptop core would give. Median of ``--repeats`` steps after one warm-up step.

Run:  python benchmarks/bench_step_ratio.py [--tokens 50 200 784] [--num-data 256]
"""

import argparse

import pyro
import torch
from pyro.infer import Trace_ELBO
from timing import svi_step_seconds

from pyro_mpt import MaskedELBO
from pyro_mpt.estimators import StratifiedEstimator
from pyro_mpt.models import ppca_collapsed, sample_ppca

#: (label, MaskedELBO keywords): the default first.
CONFIGS = [
    ("stratified (default)", {}),
    ("stratified, share_masks", {"share_masks": True}),
    ("stratified, independent masks", {"estimator": StratifiedEstimator(masks="independent")}),
    ("stratified, nested masks", {"estimator": StratifiedEstimator(masks="nested")}),
    ("uniform", {"estimator": "uniform"}),
    ("uniform, share_masks", {"estimator": "uniform", "share_masks": True}),
    ("chain", {"estimator": "chain"}),
    ("chain, share_masks", {"estimator": "chain", "share_masks": True}),
]


def step_seconds(loss, X, K, repeats, budget_s):
    """Median seconds of one SVI step (loss and backward) after one warm-up step; fewer
    repeats when one step already exceeds ``budget_s``."""

    def model(data):
        ppca_collapsed(data, K)

    return svi_step_seconds(model, loss, X, repeats, budget_s)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[50, 200, 784])
    parser.add_argument("--num-data", type=int, default=256)
    parser.add_argument("--latent-dim", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--budget", type=float, default=20.0, help="one repeat only when a step takes longer"
    )
    parser.add_argument("--only", nargs="*", default=None, help="labels to run (default all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    N, K = args.num_data, args.latent_dim
    configs = [c for c in CONFIGS if args.only is None or c[0] in args.only]
    print(
        f"collapsed PPCA, N={N}, K={K}, float64, {args.threads} thread(s); step = loss + backward"
    )
    header = f"{'T':>5} {'Trace_ELBO':>11} " + " ".join(f"{label:>26}" for label, _ in configs)
    print(header)
    for T in args.tokens:
        pyro.set_rng_seed(0)
        X, _ = sample_ppca(num_data=N, num_tokens=T, latent_dim=K, noise_scale=0.5)
        base = step_seconds(Trace_ELBO(), X, K, args.repeats, args.budget)
        cells = []
        for _, kw in configs:
            t = step_seconds(MaskedELBO(**kw), X, K, args.repeats, args.budget)
            cells.append(f"{t * 1e3:10.1f} ms {t / base:8.1f}x")
        print(f"{T:>5} {base * 1e3:8.2f} ms " + " ".join(f"{c:>26}" for c in cells), flush=True)


if __name__ == "__main__":
    main()

"""Benchmark: one training step (loss + backward) of MaskedELBO on a discrete HMM against a
TraceEnum_ELBO step on the same model (an empty guide: its loss is -log p(X) exactly, by
the forward algorithm), in one process, reported as ratios.

Model: ``pyro_mpt.models.hmm`` (``pyro.markov`` chain, ``Vindex`` emissions), C hidden
states, V symbols, N sequences of T tokens, learnable logits, float64, one thread by
default. Median of ``--repeats`` steps after one warm-up step. Targets (issue 11): chain at
most 2x a TraceEnum_ELBO step, stratified at most T/4 x.

Run:  python benchmarks/bench_hmm.py [--tokens 100] [--states 8] [--num-data 64]
"""

import argparse

import pyro
import torch
from pyro.infer import TraceEnum_ELBO
from timing import svi_step_seconds

from pyro_mpt import MaskedELBO
from pyro_mpt.models import hmm, sample_hmm

#: (label, MaskedELBO keywords or None for TraceEnum_ELBO)
CONFIGS = [
    ("stratified (default)", {}),
    ("stratified, share_masks", {"share_masks": True}),
    ("stratified, independent masks", {"masks": "independent"}),
    ("stratified, nested masks", {"masks": "nested"}),
    ("chain", {"estimator": "chain"}),
    ("uniform", {"estimator": "uniform"}),
]


def _model(C, V):
    def model(data):
        init = torch.softmax(pyro.param("init_logits", torch.zeros(C)), -1)
        trans = torch.softmax(pyro.param("trans_logits", 0.1 * torch.eye(C)), -1)
        emit = torch.softmax(pyro.param("emit_logits", 0.01 * torch.randn(C, V)), -1)
        hmm(data, init, trans, emit)

    return model


def step_seconds(loss, X, C, V, repeats, budget_s):
    """Median seconds of one SVI step after one warm-up step (one repeat when the warm-up
    already exceeds ``budget_s``)."""
    return svi_step_seconds(_model(C, V), loss, X, repeats, budget_s)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--states", type=int, default=8)
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--num-data", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=20.0)
    parser.add_argument("--only", nargs="*", default=None, help="labels to run (default all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    C, V, T, N = args.states, args.symbols, args.tokens, args.num_data
    g = torch.Generator().manual_seed(0)
    init = torch.softmax(torch.randn(C, generator=g), 0)
    trans = torch.softmax(2 * torch.randn(C, C, generator=g), -1)
    emit = torch.softmax(2 * torch.randn(C, V, generator=g), -1)
    X = sample_hmm(N, T, init, trans, emit, generator=g)
    print(f"HMM, C={C} states, V={V}, N={N}, T={T}, float64, {args.threads} thread(s)")
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    base = step_seconds(elbo, X, C, V, args.repeats, args.budget)
    print(f"{'TraceEnum_ELBO':<26} {base * 1e3:10.1f} ms {1.0:8.1f}x", flush=True)
    for label, kw in CONFIGS:
        if args.only is not None and label not in args.only:
            continue
        t = step_seconds(MaskedELBO(**kw), X, C, V, args.repeats, args.budget)
        print(f"{label:<26} {t * 1e3:10.1f} ms {t / base:8.1f}x", flush=True)


if __name__ == "__main__":
    main()

"""Benchmark: nested and affine against independent stratified masks, variance x time.

For each model the scorer is built once (same particles for both kinds of masks) and
``--draws`` independent draws are scored without gradients; printed per kind of masks
(``StratifiedEstimator.MASKS``): the
sd over draws of one draw's estimate of sum_n log p(x_n), the seconds per draw, and
variance x seconds (the time to reach a given standard error is proportional to it: smaller
is better).

A last row per model times the uniform estimator (one random mask size per draw, scored
with the same conditionals) for scale.

Models: collapsed PPCA (``gaussian``, low-rank), an HMM (``enumerate``, variable
elimination) and latent PPCA with ``importance`` conditionals. float64, one thread.

Run:  python benchmarks/bench_nested_masks.py [--draws 100] [--threads 1]
"""

import argparse
import time

import pyro
import torch

from pyro_mpt.engine import MPTOptions, prepare, score
from pyro_mpt.estimators import StratifiedEstimator, UniformEstimator
from pyro_mpt.models import hmm, ppca_collapsed, ppca_latent, sample_hmm, sample_ppca


def _ppca(N, T, K):
    pyro.set_rng_seed(0)
    X, truth = sample_ppca(num_data=N, num_tokens=T, latent_dim=K, noise_scale=0.5)
    return X, (truth["W"], truth["loc"], truth["noise_scale"])


def models(args):
    """``(label, model, model args, options)`` of the three models."""
    X, (W, loc, s) = _ppca(args.num_data, args.tokens, 5)
    yield "PPCA, gaussian", ppca_collapsed, (X, 5, W, loc, s), {}
    g = torch.Generator().manual_seed(1)
    C, V = 3, 4
    init = torch.softmax(torch.randn(C, generator=g), 0)
    trans = torch.softmax(2 * torch.randn(C, C, generator=g), -1)
    emit = torch.softmax(2 * torch.randn(C, V, generator=g), -1)
    Xh = sample_hmm(args.num_data // 4, args.hmm_tokens, init, trans, emit, generator=g)
    yield "HMM, enumerate", hmm, (Xh, init, trans, emit), {}
    X, (W, loc, s) = _ppca(args.num_data // 2, args.tokens // 2, 2)
    opts = {"conditionals": "importance", "num_samples": 256}
    yield "latent PPCA, importance", ppca_latent, (X, 2, W, loc, s), opts


def measure(model, model_args, opts, estimator, draws):
    """``(sd of one draw's total, seconds per draw)``."""
    pyro.set_rng_seed(0)
    layout, scorer, _ = prepare(model, model_args, {}, MPTOptions(**opts))
    with torch.no_grad():
        score(layout, scorer, estimator, 1, max_elements=None)  # warm-up
        t0 = time.perf_counter()
        out, _ = score(layout, scorer, estimator, draws, max_elements=None)
        seconds = (time.perf_counter() - t0) / draws
    return float(out.sum(-1).std()), seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--num-data", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--hmm-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    print(f"{args.draws} draws, float64, {args.threads} thread(s), no gradients")
    print(f"{'model':<26} {'masks':<12} {'sd':>10} {'ms/draw':>10} {'var x s':>12}")
    for label, model, model_args, opts in models(args):
        for kind in [k for k in StratifiedEstimator.MASKS if k != "auto"]:  # affine here
            est = StratifiedEstimator(masks=kind)
            sd, sec = measure(model, model_args, opts, est, args.draws)
            print(f"{label:<26} {kind:<12} {sd:10.4f} {sec * 1e3:10.3f} {sd**2 * sec:12.3e}")
        # the uniform estimator (one mask size per draw) for scale: ten times the draws
        sd, sec = measure(model, model_args, opts, UniformEstimator(), 10 * args.draws)
        print(f"{label:<26} {'(uniform)':<12} {sd:10.4f} {sec * 1e3:10.3f} {sd**2 * sec:12.3e}")


if __name__ == "__main__":
    main()

"""Benchmark: stratified MPT on collapsed PPCA against the paper's per-mask dense algorithm
and against one exact LML evaluation by a dense MultivariateNormal.

Sizes of the core issue: T = 784 tokens, N = 1000 sequences, K = 5, one mask per size.
All timings come from this one process and are reported as ratios, since the machines are
noisy. Run:  python benchmarks/bench_ppca_stratified.py [--dtype float32] [--device cuda]
"""

import argparse
import statistics
import time

import pyro.distributions as dist
import torch

from pyro_mpt import MaskedELBO
from pyro_mpt.models import ppca_collapsed, sample_ppca


def paper_per_mask_dense(X, loc, cov, generator=None):
    """The paper's algorithm, written out as the baseline: for every mask size m one random
    mask (shared by the N sequences), the conditional of x_M given x_O by a dense inverse of
    Sigma_OO, scored per token and averaged over the mask; summed over m."""
    N, T = X.shape
    total = X.new_zeros(())
    for m in range(1, T + 1):
        perm = torch.randperm(T, generator=generator, device=X.device)
        M, O = perm[:m], perm[m:]
        r_O = X[:, O] - loc[O]
        if O.numel():
            K_OO_inv = torch.linalg.inv(cov[O][:, O])
            K_MO = cov[M][:, O]
            B = K_MO @ K_OO_inv
            mean = loc[M] + r_O @ B.T
            var = cov[M, M] - (B * K_MO).sum(-1)
        else:
            mean = loc[M].expand(N, m)
            var = cov[M, M]
        lp = dist.Normal(mean, var.sqrt()).log_prob(X[:, M])
        total = total + lp.sum() / m
    return total


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-tokens", type=int, default=784)
    parser.add_argument("--num-data", type=int, default=1000)
    parser.add_argument("--latent-dim", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--skip-per-sequence",
        "--skip-independent",
        action="store_true",
        help="skip the default (masks per sequence), the slowest",
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    T, N, K = args.num_tokens, args.num_data, args.latent_dim
    gen = torch.Generator(device="cpu").manual_seed(0)
    X, truth = sample_ppca(N, T, K, 0.447, generator=gen, dtype=dtype)
    X = X.to(args.device)
    W, loc, sigma = (truth[k].to(args.device) for k in ("W", "loc", "noise_scale"))
    cov = W @ W.T + sigma**2 * torch.eye(T, dtype=dtype, device=args.device)

    def model(X):
        ppca_collapsed(X, K, W, loc, sigma)

    print(
        f"collapsed PPCA T={T} N={N} K={K} {args.dtype} on {X.device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    with torch.no_grad():
        t_exact, exact = timed(
            lambda: dist.MultivariateNormal(loc, cov).log_prob(X).sum(), args.repeats
        )
        print(
            f"exact LML, dense MVN (Cholesky of T x T): {t_exact * 1e3:9.1f} ms  "
            f"LML = {exact.item():.2f}"
        )
        t_default = None
        if not args.skip_per_sequence:  # the default options first: masks per sequence
            default = MaskedELBO()
            t_default, est = timed(lambda: default.estimate(model, None, X).total, 1)
            print(
                f"MPT stratified, default (per sequence):  {t_default * 1e3:9.1f} ms  "
                f"estimate = {est.item():.2f}"
            )
        shared = MaskedELBO(share_masks=True)
        t_shared, est = timed(lambda: shared.estimate(model, None, X).total, args.repeats)
        print(
            f"MPT stratified, masks shared per step:   {t_shared * 1e3:9.1f} ms  "
            f"estimate = {est.item():.2f}"
        )
        t_base = None
        if not args.skip_baseline:
            t_base, est = timed(lambda: paper_per_mask_dense(X, loc, cov, None), 1)
            print(
                f"paper's per-mask dense conditioning:     {t_base * 1e3:9.1f} ms  "
                f"estimate = {est.item():.2f}"
            )
    print("ratios (same process):")
    if t_default is not None:
        print(
            f"  default MPT / exact dense LML         = {t_default / t_exact:8.1f}x  (target <= 15x)"
        )
        if t_base is not None:
            print(
                f"  paper baseline / default MPT          = {t_base / t_default:8.1f}x"
                "  (target >= 150x)"
            )
    print(f"  shared-mask MPT / exact dense LML     = {t_shared / t_exact:8.1f}x")
    if t_base is not None:
        print(f"  paper baseline / shared-mask MPT      = {t_base / t_shared:8.1f}x")


if __name__ == "__main__":
    main()

"""Benchmark: ``evaluate()`` on collapsed PPCA (T = 784, N = 1000, K = 5) with the stratified
estimator, the exact reference and no curve, as the evaluator issue sizes it. Timings are
medians after a warm-up, in one process, with masks shared per step and drawn per sequence.

Run:  python benchmarks/bench_evaluate.py [--device cuda] [--dtype float32] [--profile]

Measured on one H200 (torch 2.11.0+cu130, float32):

    share_masks=True :      3.5 ms (target < 50 ms on an H100/H200)  device=cuda:0
    share_masks=False:     62.1 ms (target < 50 ms on an H100/H200)  device=cuda:0

``--profile`` shows a third of the per-sequence GPU time in drawing the masks (a segmented
sort of T * T * N random keys).
"""

import argparse
import statistics
import time

import torch

from pyro_mpt import evaluate
from pyro_mpt.models import ppca_collapsed, sample_ppca


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--num-tokens", type=int, default=784)
    parser.add_argument("--num-data", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-per-sequence", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="profile one per-sequence run: the top kernels"
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    T, N, K = args.num_tokens, args.num_data, 5
    X, t = sample_ppca(N, T, K, 0.447, generator=torch.Generator().manual_seed(0), dtype=dtype)
    X = X.to(args.device)
    W, loc, sigma = (t[k].to(args.device) for k in ("W", "loc", "noise_scale"))

    def model(X):
        ppca_collapsed(X, K, W, loc, sigma)

    print(f"evaluate(): collapsed PPCA T={T} N={N} K={K} {args.dtype} on {X.device}")
    for share in (True, False):
        if not share and args.skip_per_sequence:
            continue

        def run(share=share):
            return evaluate(
                model,
                X,
                estimators=("stratified",),
                num_masks=1,
                curve_masks=None,
                share_masks=share,
                progress=False,
            )

        run()  # warm-up
        times = []
        for _ in range(args.repeats if share else 1):
            _sync()
            t0 = time.perf_counter()
            report = run()
            _sync()
            times.append(time.perf_counter() - t0)
        print(
            f"  share_masks={share!s:5}: {statistics.median(times) * 1e3:8.1f} ms "
            f"(target < 50 ms on an H100/H200)  device={report.device}",
            flush=True,
        )
        if args.profile and not share:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if X.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            with profile(activities=activities) as prof:
                run()
                _sync()
            key = "cuda_time_total" if X.device.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()

"""Benchmark: peak memory of each conditional backend and of the references against the
memory budget ``max_elements``.

Every case runs in a fresh subprocess (so peaks do not mix): the data are built, the
resident set size noted, then one ``MaskedELBO().estimate`` (or one reference) runs without
gradients; printed: the peak RSS above the baseline (``resource.getrusage``), the budget in
bytes (``max_elements`` times 8, float64) and their ratio. Target (issue 11): at most 2x the
budget plus the data, at N=2000, T=100 and at N=200, T=2000.

Run:  python benchmarks/bench_memory.py [--max-elements 1048576] [--sizes 2000x100 200x2000]
"""

import argparse
import json
import os
import subprocess
import sys

#: case -> (model family, options)
CASES = {
    "gaussian (low-rank)": ("ppca_collapsed", {"conditionals": "gaussian"}),
    "gaussian, nested": ("ppca_collapsed", {"conditionals": "gaussian", "masks": "nested"}),
    "importance": ("ppca_latent", {"conditionals": "importance", "num_samples": 64}),
    "quadrature": ("ppca_latent1", {"conditionals": "quadrature", "quadrature_points": 20}),
    "reference importance": ("ppca_latent", {"method": "importance", "num_samples": 64}),
    "reference quadrature": ("ppca_latent1", {"method": "quadrature", "quadrature_points": 20}),
}

_CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
from pyro_mpt import MaskedELBO
from pyro_mpt.models import ppca_collapsed, ppca_latent, sample_ppca
from pyro_mpt.reference import log_marginal_likelihood
family, opts, N, T, budget = json.loads(sys.argv[1])
K = 1 if family == "ppca_latent1" else 2
model = ppca_collapsed if family == "ppca_collapsed" else ppca_latent
def run(N, T):
    X, truth = sample_ppca(N, T, K, 0.5, generator=torch.Generator().manual_seed(0))
    args = (X, K, truth["W"], truth["loc"], truth["noise_scale"])
    with torch.no_grad():
        if "method" in opts:
            log_marginal_likelihood(model, *args, max_elements=budget, progress=False, **opts)
        else:
            MaskedELBO(max_elements=budget, **opts).estimate(model, None, *args)
    return X
run(2, 4)  # warm-up: first-use allocations of torch and pyro are not the case's
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
X = run(N, T)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_kib": peak - base, "data_kib": X.numel() * 8 / 1024}))
"""


def run_case(family, opts, N, T, budget, timeout):
    """``(peak MiB above baseline, data MiB)`` or ``(None, reason)``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _CHILD, json.dumps([family, opts, N, T, budget])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"over {timeout} s"
    if out.returncode != 0:
        return None, out.stderr.strip().splitlines()[-1][:90]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["peak_kib"] / 1024, result["data_kib"] / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-elements", type=int, default=2**20)
    parser.add_argument("--sizes", nargs="+", default=["2000x100", "200x2000"])
    parser.add_argument("--only", nargs="*", default=None, help="cases to run (default all)")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    budget_mib = args.max_elements * 8 / 2**20
    print(f"max_elements={args.max_elements} ({budget_mib:.0f} MiB in float64); no gradients")
    print(f"{'case':<24} {'N x T':>10} {'peak MiB':>9} {'data MiB':>9} {'peak/budget':>12}")
    for size in args.sizes:
        N, T = (int(v) for v in size.split("x"))
        for label, (family, opts) in CASES.items():
            if args.only is not None and label not in args.only:
                continue
            peak, data = run_case(family, opts, N, T, args.max_elements, args.timeout)
            if peak is None:
                print(f"{label:<24} {size:>10}  failed: {data}", flush=True)
                continue
            ratio = peak / budget_mib
            print(f"{label:<24} {size:>10} {peak:9.1f} {data:9.1f} {ratio:11.1f}x", flush=True)


if __name__ == "__main__":
    main()

"""Benchmark: peak memory of each conditional backend and of the references against the
memory budget ``max_elements``.

Every case runs in a fresh subprocess (so peaks do not mix): the data are built, the
resident set size noted, then one ``MaskedELBO().estimate`` (or one reference) runs without
gradients; printed: the peak RSS above the baseline (``resource.getrusage``), the budget in
bytes (``max_elements`` times 8, float64) and their ratio. Target (issue 11): at most 2x the
budget plus the data, at N=2000, T=100 and at N=200, T=2000.

By default the children run with glibc's ``MALLOC_MMAP_THRESHOLD_=131072``: every tensor of
128 KiB or more is then its own mapping, returned to the system when freed, so the peak RSS
is the peak of the live tensors. With glibc's default (a threshold that rises to 32 MiB as
large blocks are freed), chunks of a few MiB to 32 MiB are kept in the heap after use and
the peak RSS also counts that retention (``--glibc-default`` measures it).

Run:  python benchmarks/bench_memory.py [--max-elements 1048576] [--sizes 2000x100 200x2000]
"""

import argparse
import json
import os
import subprocess
import sys
import time

#: case -> (model family, options). The particle backends run the "uniform" estimator (one
#: mask row per draw) so that a case stays within seconds; the stratified default runs the
#: same chunks, T times as many rows.
CASES = {
    "gaussian (low-rank)": ("ppca_collapsed", {"conditionals": "gaussian"}),
    "gaussian, nested": ("ppca_collapsed", {"conditionals": "gaussian", "masks": "nested"}),
    "enumerate (HMM, chain)": ("hmm", {"conditionals": "enumerate", "estimator": "chain"}),
    "importance": (
        "ppca_latent",
        {"conditionals": "importance", "num_samples": 64, "estimator": "uniform"},
    ),
    "quadrature": (
        "ppca_latent1",
        {"conditionals": "quadrature", "quadrature_points": 20, "estimator": "uniform"},
    ),
    "mixed (GMM per token)": (
        "gmm",
        {"conditionals": "mixed", "num_samples": 64, "estimator": "uniform", "token_plate": "t"},
    ),
    "reference exact": ("ppca_collapsed", {"method": "exact"}),
    "reference gaussian": ("ppca_latent", {"method": "gaussian"}),
    "reference importance": ("ppca_latent", {"method": "importance", "num_samples": 64}),
    "reference quadrature": ("ppca_latent1", {"method": "quadrature", "quadrature_points": 20}),
}

_CHILD = r"""
import json, resource, sys, warnings, torch, pyro, pyro.distributions as dist
warnings.simplefilter("ignore")  # diagnostics of a tiny importance run are not the point
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
from pyro_mpt import MaskedELBO
from pyro_mpt.models import hmm, ppca_collapsed, ppca_latent, sample_hmm, sample_ppca
from pyro_mpt.reference import log_marginal_likelihood
family, opts, N, T, budget = json.loads(sys.argv[1])
def gmm(X):  # a per-sequence shift (drawn) and a per-token component (summed out)
    with pyro.plate("n", X.shape[0], dim=-2):
        shift = pyro.sample("shift", dist.Normal(0.0, 2.0))
        with pyro.plate("t", X.shape[1], dim=-1):
            c = pyro.sample("c", dist.Categorical(torch.tensor([0.4, 0.6])),
                            infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(shift + 2.0 * c - 1.0, 0.5), obs=X)
def data(N, T):
    g = torch.Generator().manual_seed(0)
    if family == "gmm":
        return gmm, torch.randn(N, T, generator=g), ()
    if family == "hmm":  # 4 states, 6 symbols
        init, trans = torch.full((4,), 0.25), torch.full((4, 4), 0.1) + 0.6 * torch.eye(4)
        emit = torch.softmax(torch.randn(4, 6, generator=g), -1)
        return hmm, sample_hmm(N, T, init, trans, emit, generator=g), (init, trans, emit)
    K = 1 if family == "ppca_latent1" else 2
    X, truth = sample_ppca(N, T, K, 0.5, generator=g)
    model = ppca_collapsed if family == "ppca_collapsed" else ppca_latent
    return model, X, (K, truth["W"], truth["loc"], truth["noise_scale"])
def run(N, T):
    model, X, rest = data(N, T)
    with torch.no_grad():
        if "method" in opts:
            log_marginal_likelihood(model, X, *rest, max_elements=budget, progress=False, **opts)
        else:
            MaskedELBO(max_elements=budget, **opts).estimate(model, None, X, *rest)
    return X
run(2, 4)  # warm-up: first-use allocations of torch and pyro are not the case's
try:  # nor is importing ArviZ (its Pareto fit, for sequences with tied tail weights)
    from pyro_mpt.compat import import_arviz
    import_arviz()
except ImportError:
    pass
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
X = run(N, T)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_kib": peak - base, "data_kib": X.numel() * X.element_size() / 1024}))
"""


def run_case(family, opts, N, T, budget, timeout, glibc_default=False):
    """``(peak MiB above baseline, data MiB, seconds)`` or ``(None, reason, None)``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not glibc_default:  # freed tensors go back to the system (see the module docstring)
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    cmd = [sys.executable, "-c", _CHILD, json.dumps([family, opts, N, T, budget])]
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"over {timeout} s", None
    if out.returncode != 0:
        return None, out.stderr.strip().splitlines()[-1][:100], None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["peak_kib"] / 1024, result["data_kib"] / 1024, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-elements", type=int, default=2**20)
    parser.add_argument("--sizes", nargs="+", default=["2000x100", "200x2000"])
    parser.add_argument("--only", nargs="*", default=None, help="cases to run (default all)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--glibc-default", action="store_true", help="keep glibc's own mmap threshold"
    )
    args = parser.parse_args(argv)
    budget_mib = args.max_elements * 8 / 2**20
    malloc = "glibc default" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=131072"
    print(
        f"max_elements={args.max_elements} ({budget_mib:.0f} MiB in float64); no gradients; "
        + malloc
    )
    print(
        f"{'case':<26} {'N x T':>10} {'peak MiB':>9} {'data MiB':>9} {'peak/budget':>12} {'s':>6}"
    )
    for size in args.sizes:
        N, T = (int(v) for v in size.split("x"))
        for label, (family, opts) in CASES.items():
            if args.only is not None and label not in args.only:
                continue
            peak, data, secs = run_case(
                family, opts, N, T, args.max_elements, args.timeout, args.glibc_default
            )
            if peak is None:
                print(f"{label:<26} {size:>10}  failed: {data}", flush=True)
                continue
            ratio = peak / budget_mib
            print(
                f"{label:<26} {size:>10} {peak:9.1f} {data:9.1f} {ratio:11.1f}x {secs:6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

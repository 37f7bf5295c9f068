"""Benchmark: the SMC reference against prior importance sampling at equal wall time, on
PPCA with an explicit latent in the hard regime of issue 13 (N = 50 sequences, T = 8
tokens, noise 0.5), against the exact collapsed log-likelihood.

For each data seed: time ``log_marginal_likelihood(method="smc")``, then give prior
importance sampling as many draws as fit in the same time (calibrated on two probes, then
measured), and record both errors |estimate - exact|. Times are CPU times of this one
process (``time.process_time``; with ``OMP_NUM_THREADS=1`` the wall time of an idle
machine, and robust to a shared one); the ratio of the root-mean-square errors is the
figure, with the median of the seeds' ratios. One untimed call of each method comes first,
so that a process's one-off costs (ArviZ's import) are charged to neither. Run:

    OMP_NUM_THREADS=1 python benchmarks/bench_smc.py [--latent-dim 2] [--seeds 4]
        [--method smc_importance --smc-samples 2048]

``--method smc_importance``: importance sampling from Student-t's fitted to SMC runs
(``pyro_mpt.reference.smc_importance``) instead of the SMC runs.
"""

import argparse
import math
import statistics
import time
import warnings

import pyro
import pyro.distributions as dist
import torch

from pyro_mpt.models import ppca_latent, sample_ppca
from pyro_mpt.reference import log_marginal_likelihood


def exact_lml(X, truth):
    T = X.shape[-1]
    cov_diag = (truth["noise_scale"] ** 2).expand(T)
    return float(
        dist.LowRankMultivariateNormal(truth["loc"], truth["W"], cov_diag).log_prob(X).sum()
    )


def timed_reference(X, truth, K, method, num_samples):
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # importance is flagged, as expected
        ref = log_marginal_likelihood(
            ppca_latent, X, K, **truth, method=method, num_samples=num_samples
        )
    return float(ref.total), time.process_time() - t0, ref.trustworthy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-data", type=int, default=50)
    parser.add_argument("--num-tokens", type=int, default=8)
    parser.add_argument("--latent-dim", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--smc-samples", type=int, default=512, help="8 runs of S/8 particles")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--method", default="smc", choices=["smc", "smc_importance"])
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    K = args.latent_dim
    # one untimed call of each method first: the one-off costs of a process (ArviZ's
    # import for k-hat, about 2 s of CPU, and torch's first calls) were charged to whichever
    # method ran first, the SMC method on seed 0
    X, truth = sample_ppca(4, args.num_tokens, K, args.noise, generator=torch.Generator())
    for method in (args.method, "importance"):
        timed_reference(X, truth, K, method, 64)
    rows = []
    for seed in range(args.seeds):
        X, truth = sample_ppca(
            args.num_data,
            args.num_tokens,
            K,
            args.noise,
            generator=torch.Generator().manual_seed(seed),
        )
        exact = exact_lml(X, truth)
        pyro.set_rng_seed(seed)
        smc, t_smc, ok_smc = timed_reference(X, truth, K, args.method, args.smc_samples)
        # the rate of importance sampling from the faster of two probes of 16384 draws
        t_probe = min(timed_reference(X, truth, K, "importance", 16384)[1] for _ in range(2))
        S_is = max(4096, int(16384 * t_smc / t_probe))
        imp, t_imp, ok_imp = timed_reference(X, truth, K, "importance", S_is)
        rows.append((smc - exact, imp - exact, t_smc, t_imp, S_is, ok_smc, ok_imp))
        print(
            f"seed {seed}: exact {exact:.3f}  {args.method} err {smc - exact:+.3f} ({t_smc:.2f}s, "
            f"trustworthy={ok_smc})  importance S={S_is} err {imp - exact:+.3f} ({t_imp:.2f}s, "
            f"trustworthy={ok_imp}); error ratio {abs(imp - exact) / abs(smc - exact):.1f}"
        )
    rms_smc = math.sqrt(sum(r[0] ** 2 for r in rows) / len(rows))
    rms_imp = math.sqrt(sum(r[1] ** 2 for r in rows) / len(rows))
    t_smc = sum(r[2] for r in rows) / len(rows)
    t_imp = sum(r[3] for r in rows) / len(rows)
    median_ratio = statistics.median(abs(r[1]) / abs(r[0]) for r in rows)
    print(
        f"N={args.num_data} T={args.num_tokens} K={K} noise={args.noise}: RMS error "
        f"{args.method} (num_samples={args.smc_samples}) "
        f"{rms_smc:.3f} nats in {t_smc:.2f}s, prior importance {rms_imp:.3f} nats in "
        f"{t_imp:.2f}s; importance / {args.method} error ratio {rms_imp / rms_smc:.1f} "
        f"(median over the seeds {median_ratio:.1f})"
    )


if __name__ == "__main__":
    main()

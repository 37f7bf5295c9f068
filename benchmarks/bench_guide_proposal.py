"""Prior against guide as proposal (issue 13) on latent PPCA, against the exact collapsed
value (a LowRankMultivariateNormal log-density, not pyro_mpt): MaskedELBO's chain and
stratified estimates with ``ImportanceConditionals(proposal=...)`` and the SMC and
importance references with ``guide=...``. Per row: the mean |error|, the mean reported
s.e., how many seeds' 95% intervals hold the exact value, and the time per estimate.

The guide is an AutoNormal trained by ``Trace_ELBO`` (``--svi-steps``) once, on the data of
seed 0; the seeds vary the estimators' randomness only.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_guide_proposal.py [--num-data 50] [--seeds 5]
"""

import argparse
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals import ImportanceConditionals
from pyro_mpt.models import ppca_latent, sample_ppca
from pyro_mpt.reference import log_marginal_likelihood


def _rows(model, X, guide, S):
    """(name, seed -> estimate) of every compared estimator."""

    def masked(proposal, estimator):
        conditionals = ImportanceConditionals(S, proposal=proposal)
        elbo = MaskedELBO(conditionals=conditionals, estimator=estimator, num_masks=8)
        return lambda: elbo.estimate(model, None, X)

    def reference(method, proposal):
        return lambda: log_marginal_likelihood(
            model, X, method=method, guide=proposal, num_samples=S, progress=False
        )

    return [
        ("chain, prior", masked(None, "chain")),
        ("chain, guide", masked(guide, "chain")),
        ("stratified, prior", masked(None, "stratified")),
        ("stratified, guide", masked(guide, "stratified")),
        ("smc reference, prior", reference("smc", None)),
        ("smc reference, guide", reference("smc", guide)),
        ("importance reference, prior", reference("importance", None)),
        ("importance reference, guide", reference("importance", guide)),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-data", type=int, default=10)
    parser.add_argument("--num-tokens", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--svi-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    N, T, K = args.num_data, args.num_tokens, 2
    X, truth = sample_ppca(N, T, K, args.noise, generator=torch.Generator().manual_seed(0))
    noise_var = truth["noise_scale"] ** 2 * torch.ones(T)
    exact = float(
        dist.LowRankMultivariateNormal(truth["loc"], truth["W"], noise_var).log_prob(X).sum()
    )

    def model(X):
        ppca_latent(X, K, **truth)

    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(args.svi_steps):
        svi.step(X)
    print(
        f"latent PPCA N={N} T={T} noise {args.noise}: exact log p(X) = {exact:.3f}; "
        f"{args.num_samples} draws; AutoNormal after {args.svi_steps} Trace_ELBO steps"
    )
    print(f"{'':30s} {'mean |err|':>10s} {'mean s.e.':>10s} {'covered':>8s} {'s/run':>7s}")
    for name, run in _rows(model, X, guide, args.num_samples):
        errors, ses, covered, start = [], [], 0, time.perf_counter()
        for seed in range(args.seeds):
            pyro.set_rng_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the prior's diagnostics fail: expected
                est = run()
            total = float(est.total)
            lo, hi = est.ci(0.95)
            errors.append(abs(total - exact))
            ses.append(est.stderr)
            covered += float(lo) <= exact <= float(hi)
        seconds = (time.perf_counter() - start) / args.seeds
        print(
            f"{name:30s} {sum(errors) / len(errors):10.3f} {sum(ses) / len(ses):10.3f} "
            f"{covered:>4d}/{args.seeds:<3d} {seconds:7.2f}"
        )


if __name__ == "__main__":
    main()

"""When importance sampling fails

PPCA with an explicit latent z_n in the hard regime of issue 13 (N = 50 sequences of T = 8
tokens, noise 0.5): every sequence pins its z_n down, so prior draws rarely land where the
posterior is. The importance reference is off by nats with an error bar that does not
cover it (and says so: its Pareto k-hat fails); SMC along the token order (method="smc")
reveals the tokens one at a time, resampling and moving its particles, and lands on the
exact value within its standard error. "auto" tries importance first and escalates.
"""

import os
import sys
import warnings

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch

from pyro_mpt import log_marginal_likelihood
from pyro_mpt.models import ppca_latent, sample_ppca

smoke_test = "CI" in os.environ
budgets = [256, 1024] if smoke_test else [256, 1024, 4096]
torch.set_default_dtype(torch.float64)
pyro.set_rng_seed(0)

X, truth = sample_ppca(50, 8, 2, noise_scale=0.5, generator=torch.Generator().manual_seed(0))
cov_diag = (truth["noise_scale"] ** 2).expand(8)
exact = float(dist.LowRankMultivariateNormal(truth["loc"], truth["W"], cov_diag).log_prob(X).sum())
print(f"exact log p(X) (collapsed PPCA): {exact:.2f} nats")

results = {"importance": [], "smc": []}
for S in budgets:
    for method in results:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")  # importance warns that it failed its diagnostics
            ref = log_marginal_likelihood(ppca_latent, X, 2, **truth, method=method, num_samples=S)
        results[method].append((float(ref.total) - exact, ref.stderr, ref.trustworthy))
        print(f"{method:>10} S={S:5d}: {ref}")

# "auto": importance, then SMC when importance's diagnostics fail; the messages say why.
auto = log_marginal_likelihood(ppca_latent, X, 2, **truth, num_samples=budgets[-1])
print(auto.method, [m[:100] for m in auto.messages if m.startswith("auto ladder")])

fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
for shift, (method, rows) in zip((0.95, 1.05), results.items()):
    err, se, ok = zip(*rows)
    xs = [b * shift for b in budgets]
    ax.errorbar(xs, err, yerr=[2 * s for s in se], marker="o", capsize=4, label=method)
    for x, e, good in zip(xs, err, ok):
        if not good:
            ax.annotate("flagged", (x, e), textcoords="offset points", xytext=(6, -10))
ax.axhline(0.0, color="k", lw=1, label="exact (closed form)")
ax.set_xscale("log")
ax.set_xlabel("num_samples (SMC: 8 runs of num_samples / 8 particles)")
ax.set_ylabel("estimate - exact log p(X)  [nats, +-2 SE]")
ax.set_title("PPCA with explicit z, N=50, T=8, noise 0.5")
ax.legend()

# Run as a script, `python tutorials/when_importance_fails.py [figure.png]` saves the figure (default: a
# png next to this file). The docs' plot directive executes this code without __file__ and
# captures the figure itself, so nothing is written into the source tree then.
if "__file__" in globals():
    out = (
        sys.argv[1]
        if len(sys.argv) > 1
        else os.path.splitext(os.path.abspath(__file__))[0] + ".png"
    )
    fig.savefig(out, dpi=100)
    print(f"figure saved to {os.path.relpath(out)}")

"""Is my reference trustworthy?

evaluate() scores a model by several masked estimators and fixed rates against a reference
log p(X). For latent-variable PPCA (z_n explicit) the reference is an importance estimate,
and its Pareto k-hat and effective sample size say whether it can be trusted. compare()
ranks models by their log marginal likelihood.
"""

import os
import sys
import warnings

import arviz as az
import matplotlib.pyplot as plt
import pyro

from pyro_mpt import compare, evaluate
from pyro_mpt.export import to_elpd_data
from pyro_mpt.models import ppca_latent, ppca_log_marginal, sample_ppca

smoke_test = "CI" in os.environ
N, T = 30, 6
num_masks = 4 if smoke_test else 16
warnings.filterwarnings("ignore", category=FutureWarning)
pyro.set_rng_seed(0)

X, truth = sample_ppca(num_data=N, num_tokens=T, latent_dim=2, noise_scale=1.0)
W, loc, noise = truth["W"], truth["loc"], truth["noise_scale"]


def model(X):
    ppca_latent(X, latent_dim=2, W=W, loc=loc, noise_scale=noise)


print(f"exact log p(X) (closed form): {float(ppca_log_marginal(X, W, loc, noise)):.2f} nats")

# A good reference: many prior particles per sequence.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    report = evaluate(
        model, X, reference="importance", reference_samples=16384, num_masks=num_masks
    )
print(f"warnings raised: {len(caught)}")
print(report.summary())

# A poor reference: 32 particles from the prior. k-hat exceeds its threshold, and evaluate() warns.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    poor = evaluate(model, X, reference="importance", reference_samples=32, num_masks=num_masks)
for w in caught:
    if "k-hat" in str(w.message) or "ESS" in str(w.message) or "Pareto" in str(w.message):
        print("warning:", str(w.message).splitlines()[0])
print(poor.summary())


# compare(): the true model against one with a too-large noise scale.
def wrong_noise(X):
    ppca_latent(X, latent_dim=2, W=W, loc=loc, noise_scale=3 * noise)


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    table = compare(
        {"true": model, "noise x3": wrong_noise}, X, reference_samples=2048, num_masks=num_masks
    )
print(table.to_string() if hasattr(table, "to_string") else table)

# The same numbers the arviz way: the estimators' draws of log p(X) in the posterior group
# (az.summary, az.plot_forest), the reference's per-sequence k-hats in an ELPDData.
idata = report.to_inference_data()
print(az.summary(idata, var_names=["mpt_stratified", "mpt_uniform"], kind="stats"))
elpd_good, elpd_poor = to_elpd_data(report), to_elpd_data(poor)
print(
    f"k-hat above {elpd_poor['good_k']:.2f}: {int((elpd_poor['pareto_k'] > elpd_poor['good_k']).sum())}"
    f" of {N} sequences with 32 draws, "
    f"{int((elpd_good['pareto_k'] > elpd_good['good_k']).sum())} with 16384"
)

fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
report.plot(ax=axes[0], shade="band")  # s.e. band around the curve, not down to 0
az.plot_khat(elpd_poor, ax=axes[1], show_hlines=True)
axes[1].set_title("Pareto k-hat per sequence, 32 prior draws (az.plot_khat)")

# Run as a script, `python tutorials/trustworthy_reference.py [figure.png]` saves the figure (default: a
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

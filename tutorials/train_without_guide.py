"""Train any Pyro model without a guide.

MaskedELBO's loss is an unbiased masked estimate of -log p(X): no guide is needed. We train
collapsed PPCA and a Gaussian mixture (an enumerated discrete latent) with it, and check the
trained models against the exact log marginal likelihood.
"""

import os
import sys
import warnings

import matplotlib.pyplot as plt
import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_mpt import MaskedELBO, log_marginal_likelihood, mpt_curve
from pyro_mpt.models import gaussian_mixture, ppca_collapsed, ppca_log_marginal, sample_ppca

smoke_test = "CI" in os.environ
steps = 60 if smoke_test else 300
warnings.filterwarnings("ignore", category=UserWarning)
pyro.set_rng_seed(0)

# --- 1. Collapsed PPCA: x_n ~ N(loc, W W^T + noise^2 I), Gaussian conditionals (Woodbury)
X, truth = sample_ppca(num_data=200, num_tokens=10, latent_dim=2, noise_scale=0.5)


def ppca(X):
    ppca_collapsed(X, latent_dim=2)


pyro.clear_param_store()
svi = SVI(ppca, None, Adam({"lr": 0.05}), loss=MaskedELBO(estimator="stratified"))
ppca_mpt, ppca_exact = [], []
for _step in range(steps):
    ppca_mpt.append(-svi.step(X))
    with torch.no_grad():
        exact = ppca_log_marginal(X, pyro.param("W"), pyro.param("loc"), pyro.param("noise_scale"))
    ppca_exact.append(float(exact))

curve = mpt_curve(ppca, X, num_masks=4)
print(
    f"PPCA: MPT area {float(curve.area):.1f} ± {curve.area_stderr:.1f} nats, "
    f"exact LML {ppca_exact[-1]:.1f} nats"
)

# --- 2. Gaussian mixture: c_n ~ Categorical(pi), x_n | c_n ~ N(mu_c, sigma^2 I);
# conditionals by enumerating c.
torch.manual_seed(1)
centres = 3.0 * torch.randn(3, 6, dtype=torch.float64)
Y = centres[torch.randint(3, (300,))] + 0.7 * torch.randn(300, 6, dtype=torch.float64)


def mixture(Y):
    gaussian_mixture(Y, num_components=3)


pyro.clear_param_store()
svi = SVI(mixture, None, Adam({"lr": 0.2}), loss=MaskedELBO(estimator="stratified"))
gmm_mpt, gmm_exact = [], []
for step in range(steps):
    gmm_mpt.append(-svi.step(Y))
    if step % 10 == 0 or step == steps - 1:
        gmm_exact.append((step, float(log_marginal_likelihood(mixture, Y, method="exact").total)))

curve = mpt_curve(mixture, Y, num_masks=4)
print(
    f"Gaussian mixture: MPT area {float(curve.area):.1f} ± {curve.area_stderr:.1f} nats, "
    f"exact LML {gmm_exact[-1][1]:.1f} nats"
)

fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
axes[0].plot(ppca_mpt, alpha=0.7, label="MaskedELBO estimate of log p(X)")
axes[0].plot(ppca_exact, label="exact log p(X)")
axes[0].set_title("collapsed PPCA")
axes[1].plot(gmm_mpt, alpha=0.7, label="MaskedELBO estimate of log p(X)")
axes[1].plot(*zip(*gmm_exact), label="exact log p(X)")
axes[1].set_title("Gaussian mixture (enumerated)")
for ax in axes:
    ax.set_xlabel("SVI step")
    ax.set_ylabel("nats")
    ax.legend()
    lo = min(ax.get_lines()[1].get_ydata()[len(ax.get_lines()[1].get_ydata()) // 4 :])
    ax.set_ylim(bottom=lo - 0.3 * abs(lo))

# Run as a script, `python tutorials/train_without_guide.py [figure.png]` saves the figure (default: a
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

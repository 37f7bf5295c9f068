"""Masking rate and bias.

The cumulative MPT score sum_m S(m) is log p(X); a fixed mask rate r estimates T S(round(rT)),
which is not. We draw the curve m -> S(m) for PPCA, compare its area with the exact LML, and
measure the bias of fixed rates of 15%, 50% and 80%.
"""

import os
import sys
import warnings

import matplotlib.pyplot as plt
import pyro

from pyro_mpt import mpt_curve, plot_curve
from pyro_mpt.models import ppca_collapsed, ppca_log_marginal, sample_ppca

smoke_test = "CI" in os.environ
T = 20 if smoke_test else 50
num_masks = 4 if smoke_test else 16
warnings.filterwarnings("ignore", category=UserWarning)
pyro.set_rng_seed(0)

X, truth = sample_ppca(num_data=100, num_tokens=T, latent_dim=2, noise_scale=0.5)
W, loc, noise = truth["W"], truth["loc"], truth["noise_scale"]


def model(X):
    ppca_collapsed(X, latent_dim=2, W=W, loc=loc, noise_scale=noise)


exact = float(ppca_log_marginal(X, W, loc, noise))
curve = mpt_curve(model, X, num_masks=num_masks)
print(f"T = {T} tokens, N = {X.shape[0]} sequences, {num_masks} masks per size")
print(f"area sum_m S(m) = {float(curve.area):.1f} ± {curve.area_stderr:.1f} nats")
print(f"exact log p(X)  = {exact:.1f} nats")
for rate in (0.15, 0.5, 0.8):
    m = curve.mask_size(rate)
    est = float(curve.fixed_rate_estimate(rate))
    print(
        f"fixed rate {rate:.0%} (m = {m}): T S(m) = {est:.1f}, bias vs exact {est - exact:+.1f} nats"
    )

fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
plot_curve(curve, reference=exact, ax=ax, shade="band")  # band around the curve
ax.set_title(f"PPCA, T = {T}: the MPT curve S(m) (area = log p(X))")

# Run as a script, `python tutorials/mask_rate_bias.py [figure.png]` saves the figure (default: a
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

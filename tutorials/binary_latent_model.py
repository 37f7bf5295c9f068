"""The binary experiment: a Bernoulli latent linear model without a guide.

A logistic latent linear model (K = 2) on binarised 8 x 8 digits (scikit-learn's, nothing is
downloaded; synthetic images without scikit-learn), trained by MaskedELBO with quadrature
conditionals, against a linear VAE trained by its ELBO. Both are scored by the 20 x 20
quadrature log marginal likelihood, in nats per image.
"""

import os
import sys
import warnings

import matplotlib.pyplot as plt

from pyro_mpt.experiments import binary

smoke_test = "CI" in os.environ
try:
    import sklearn  # noqa: F401

    data = "digits"
except ImportError:
    data = "synthetic"

warnings.filterwarnings("ignore", category=UserWarning)
result = binary(
    data=data,
    steps=40 if smoke_test else 150,
    num_data=200 if smoke_test else 500,
    batch_size=64 if smoke_test else 128,
    train_quadrature_points=10 if smoke_test else 12,
    seed=0,
)
print(result.headline())
print(f"MPT-trained minus VAE: {result.lml_mpt - result.lml_vae:+.3f} nats per image")
for message in result.messages:
    print("note:", message)

# figure(ax=...) draws onto the given axes, so the plot directive captures it.
fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
result.figure(ax=ax)

# Run as a script, `python tutorials/binary_latent_model.py [figure.png]` saves the figure (default: a
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

"""Masked language models scored by their MPT curve, on data with a known LML.

Sequences come from a small hidden Markov model, so the held-out log marginal likelihood is
exact (forward algorithm) and the exact posterior predictive is the ideal masked predictor.
A tiny transformer MLM is trained (a) at a fixed 15% mask rate and (b) on uniformly random
rates (the cumulative MPT objective); (c) is an untrained copy. Their curves S(m) and areas
are set beside the exact LML, in nats per token.
"""

import os
import sys

import matplotlib.pyplot as plt

from pyro_mpt.mlm import mlm_experiment

smoke_test = "CI" in os.environ
if smoke_test:  # a few seconds: small HMM, short training
    sizes = dict(
        num_states=3,
        vocab_size=5,
        seq_len=8,
        num_train=400,
        num_test=50,
        steps=60,
        num_masks=2,
    )
else:  # the quick preset of `pyro-mpt reproduce`, about 20 s on a CPU
    sizes = dict()

result = mlm_experiment(quick=True, seed=0, **sizes)
print(result.headline())

fig, ax = plt.subplots(figsize=(7, 4.5))
result.figure(ax=ax)
fig.tight_layout()

# Run as a script, `python tutorials/masked_language_models.py [figure.png]` saves the figure (default: a
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

"""Masked language models scored by their MPT curve, on data with a known LML.

Sequences come from a small hidden Markov model, so the held-out log marginal likelihood is
exact (forward algorithm) and the exact posterior predictive is the ideal masked predictor.
A tiny transformer MLM is trained (a) at a fixed 15% mask rate and (b) on uniformly random
rates (the cumulative MPT objective); (c) is an untrained copy. Their curves S(m) and areas
are set beside the exact LML, in nats per token.
"""

import os

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

"""The experiments of the paper, one parameterised function each, and :func:`reproduce`
that runs them all and writes their figures and a report.

Each function returns a small dataclass of numbers with a ``figure(ax=None)`` method that
draws on ``ax`` (or on a new bare :class:`matplotlib.figure.Figure`) and returns the Figure;
none touches matplotlib's global state (no pyplot, no rcParams).

- :func:`convergence`: stratified MPT minus the exact LML against permutations per size.
- :func:`area`: the curve :math:`S(m)` and its area against the exact LML.
- :func:`training`: SVI by stratified MPT vs a fixed 80% rate, exact LML along the way.
- :func:`binary`: Bernoulli latent linear model by MPT (quadrature) vs a linear VAE.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from .area import AreaResult, area
from .binary import BinaryResult, binary, load_digits_binary, prepare_binary, synthetic_binary
from .convergence import ConvergenceResult, convergence
from .reproduce import EXPERIMENTS, PRESETS, reproduce
from .training import TrainingResult, training

__all__ = [
    "AreaResult",
    "BinaryResult",
    "ConvergenceResult",
    "EXPERIMENTS",
    "PRESETS",
    "TrainingResult",
    "area",
    "binary",
    "convergence",
    "load_digits_binary",
    "prepare_binary",
    "reproduce",
    "synthetic_binary",
    "training",
]

"""pyro_mpt: masked pre-training as log marginal likelihood, for Pyro models.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from . import conditionals, estimators, models
from .curve import MPTCurve, mpt_curve
from .masked_elbo import MaskedELBO
from .scoring import MPTEstimate

__version__ = "0.1.0"

__all__ = [
    "MPTCurve",
    "MPTEstimate",
    "MaskedELBO",
    "conditionals",
    "estimators",
    "models",
    "mpt_curve",
]

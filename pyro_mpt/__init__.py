"""pyro_mpt: masked pre-training as log marginal likelihood, for Pyro models.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from . import conditionals, diagnostics, estimators, mlm, models
from .curve import MPTCurve, mpt_curve
from .engine import MPTEstimate
from .evaluator import compare, evaluate
from .masked_elbo import MaskedELBO
from .plotting import plot_curve, plot_fixed_rate_bias
from .reference import LMLEstimate, log_marginal_likelihood
from .report import EstimatorResult, EvaluationReport, FixedRateBias

__version__ = "0.1.0"

__all__ = [
    "EstimatorResult",
    "EvaluationReport",
    "FixedRateBias",
    "LMLEstimate",
    "MPTCurve",
    "MPTEstimate",
    "MaskedELBO",
    "compare",
    "conditionals",
    "diagnostics",
    "estimators",
    "evaluate",
    "log_marginal_likelihood",
    "mlm",
    "models",
    "mpt_curve",
    "plot_curve",
    "plot_fixed_rate_bias",
]

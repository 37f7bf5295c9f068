r"""Masked language models: MPT curves, areas (LML estimates), fixed-rate estimates and
pseudo-log-likelihoods for any masked predictor, and an exact HMM predictor as ground truth.

A masked predictor is a callable ``predictor(tokens, mask) -> log_probs``: ``tokens`` long
``(B, T)``, ``mask`` bool ``(B, T)`` (True = hidden), ``log_probs`` ``(B, T, V)``.
"""

from .curve import (
    LeaveOneOutEstimator,
    MLMCurve,
    mlm_curve,
    mlm_estimate,
    pseudo_log_likelihood,
)
from .experiment import MLMExperimentResult, mlm_experiment
from .hmm import hmm_predictor, random_hmm
from .huggingface import huggingface_predictor
from .scorer import PredictorScorer
from .transformer import TinyMLM, train_mlm

__all__ = [
    "LeaveOneOutEstimator",
    "MLMCurve",
    "MLMExperimentResult",
    "PredictorScorer",
    "TinyMLM",
    "hmm_predictor",
    "huggingface_predictor",
    "mlm_experiment",
    "mlm_curve",
    "mlm_estimate",
    "pseudo_log_likelihood",
    "random_hmm",
    "train_mlm",
]

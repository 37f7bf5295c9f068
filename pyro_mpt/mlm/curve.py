r"""MPT curves, areas and pseudo-log-likelihoods of masked language models.

A *masked predictor* is any callable ``predictor(tokens, mask) -> log_probs`` with ``tokens``
long ``(B, T)``, ``mask`` bool ``(B, T)`` (True = hidden: the predictor replaces those tokens
by its own mask token) and ``log_probs`` ``(B, T, V)``, the log-probabilities of the
vocabulary at every position. Only hidden positions are read.

The masks are those of :mod:`pyro_mpt.estimators` (the same rows as
:class:`~pyro_mpt.MaskedELBO`): the predictor hides every token outside a row's conditioning
set ``observed`` and the log-probabilities of the ``scored`` tokens are summed with the row's
weight. For the stratified, uniform, fixed-rate and exhaustive estimators ``observed`` is the
complement of ``scored``; for the chain estimator the tokens after the scored one in the
order are hidden as well (they are not conditioned on).

Memory: the mask rows of all sequences are flattened into predictor batches of ``B`` rows
with ``B * T * V <= max_elements`` (:class:`~pyro_mpt.mlm.scorer.PredictorScorer`), so a
long sequence never holds all its masks at once. The vocabulary size ``V`` is read from one
probe call of a single row. ``max_elements=None`` is the device's default budget
(:func:`pyro_mpt.options.resolve_max_elements`).

Padding: ``pad_mask`` (bool ``(N, T)``, True = padding) removes tokens from a sequence. The
sequences are grouped by length and each group's real tokens are packed to the left, so the
predictor never sees padding and every mask is uniform over the real tokens only.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520; J. Salazar, D. Liang, T. Q. Nguyen,
K. Kirchhoff, "Masked Language Model Scoring", ACL 2020, arXiv:1910.14659 (the
pseudo-log-likelihood).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..curve import MPTCurve
from ..engine import MPTEstimate
from ..estimators import MaskBatch, MaskEstimator, get_estimator
from ..options import check_bool, check_positive_int, resolve_max_elements
from .scorer import PredictedSequences, score_sequences

__all__ = [
    "LeaveOneOutEstimator",
    "MLMCurve",
    "mlm_curve",
    "mlm_estimate",
    "pseudo_log_likelihood",
]

#: The name the results carry in their ``conditionals`` field.
CONDITIONALS_NAME = "mlm"


class LeaveOneOutEstimator(MaskEstimator):
    r"""The ``T`` leave-one-out masks (deterministic): row ``j`` scores token ``j`` given all
    the others, weight 1. One draw sums to the pseudo-log-likelihood
    :math:`\sum_j \log p(x_j \mid x_{-j}) = T\,S(1)` (Salazar et al. 2020). Not an estimator of
    :math:`\log p(x)`.

    Example::

        est = mlm_estimate(predictor, tokens, estimator=LeaveOneOutEstimator())  # tokens: (N, T)
        est.per_sequence                        # (N,), equals pseudo_log_likelihood(...)
    """

    name = "leave_one_out"
    unbiased = False

    def rows_per_draw(self, T: int) -> int:
        return T

    def batches(
        self,
        N: int,
        T: int,
        num_draws: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        max_rows: int,
        generator: torch.Generator | None = None,
    ) -> Iterator[MaskBatch]:
        for start in range(0, num_draws * T, max_rows):
            stop = min(num_draws * T, start + max_rows)
            rows = torch.arange(start, stop, device=device)
            j = rows % T
            scored = (torch.arange(T, device=device) == j.unsqueeze(-1)).unsqueeze(1)
            scored = scored.expand(-1, N, -1)
            weight = torch.ones(stop - start, N, dtype=dtype, device=device)
            size = torch.ones(stop - start, N, dtype=torch.long, device=device)
            yield MaskBatch(~scored, scored, weight, size, rows // T)


@dataclass
class MLMCurve(MPTCurve):
    r"""An :class:`~pyro_mpt.MPTCurve` of a masked language model. Sequences may have
    different lengths (``pad_mask``): ``per_sequence[n, m - 1]`` is :math:`S_n(m)` for
    :math:`m \le T_n` and 0 beyond, and ``scores[m - 1]`` sums the sequences long enough.

    :ivar torch.Tensor lengths: long ``(N,)`` the number of real tokens :math:`T_n`.

    The area is :math:`\sum_m S(m) = \sum_n \sum_{m=1}^{T_n} S_n(m)`, an estimate of
    :math:`\sum_n \log p(x_n)`; the fields are those of :class:`~pyro_mpt.MPTCurve`, with
    ``scores`` ``(T,)`` and ``per_sequence`` ``(N, T)``.

    Example::

        curve = mlm_curve(predictor, tokens, pad_mask=pad)   # tokens, pad: (N, T)
        curve.lengths, curve.area, curve.per_sequence.shape  # (N,), scalar, (N, T)
    """

    lengths: torch.Tensor | None = None

    def fixed_rate_estimate(self, rate: float) -> torch.Tensor:
        r"""What a fixed mask rate estimates:
        :math:`\sum_n T_n\,S_n(\max(1, \mathrm{round}(r T_n)))` (equal to
        :math:`T\,S(\mathrm{round}(rT))` when all sequences have ``T`` tokens)."""
        self.mask_size(rate)  # validates the rate
        if self.lengths is None:
            return super().fixed_rate_estimate(rate)
        lengths = self.lengths.to(self.per_sequence.device)
        m = torch.minimum(
            lengths, (float(rate) * lengths.to(torch.float64)).round().long().clamp(min=1)
        )
        picked = self.per_sequence.gather(-1, (m - 1).unsqueeze(-1)).squeeze(-1)
        return (lengths.to(picked.dtype) * picked).sum()


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def _check_tokens(tokens, pad_mask):
    if not torch.is_tensor(tokens):
        raise ValueError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype != torch.long:
        raise ValueError(f"tokens must have dtype torch.long (token ids), got {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(
            f"tokens must have shape (N, T) (N sequences of T tokens), got {tuple(tokens.shape)}"
        )
    N, T = tokens.shape
    if N == 0 or T == 0:
        raise ValueError(f"tokens must hold at least one token, got shape {tuple(tokens.shape)}")
    if int(tokens.min()) < 0:
        raise ValueError("tokens must be non-negative token ids")
    if pad_mask is None:
        return torch.zeros(N, T, dtype=torch.bool, device=tokens.device)
    if not torch.is_tensor(pad_mask) or pad_mask.dtype != torch.bool:
        raise ValueError("pad_mask must be a bool tensor (True = padding)")
    if pad_mask.shape != tokens.shape:
        raise ValueError(
            f"pad_mask shape {tuple(pad_mask.shape)} does not match tokens shape "
            f"{tuple(tokens.shape)}"
        )
    pad_mask = pad_mask.to(tokens.device)
    empty = (~pad_mask).sum(-1) == 0
    if bool(empty.any()):
        raise ValueError(
            f"pad_mask hides every token of sequence(s) {empty.nonzero().flatten().tolist()}"
        )
    return pad_mask


def _sequences(predictor, tokens, pad_mask, max_elements):
    """The checked sequences, the budget resolved on their device (``None``: the default)."""
    max_elements = check_positive_int("max_elements", max_elements, allow_none=True)
    if not callable(predictor):
        raise ValueError("predictor must be callable: predictor(tokens, mask) -> (B, T, V)")
    pad_mask = _check_tokens(tokens, pad_mask)
    budget = resolve_max_elements(max_elements, tokens.device)
    return PredictedSequences(predictor, tokens, pad_mask, budget)


# ----------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------

_CURVE_ESTIMATORS = ("stratified", "exhaustive", "chain", "uniform")


def mlm_curve(
    predictor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    *,
    estimator: str | MaskEstimator = "stratified",
    num_masks: int = 1,
    exhaustive: bool = False,
    max_elements: int | None = None,
    pad_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> MLMCurve:
    r"""The MPT curve :math:`m \mapsto S(m)` of a masked predictor and its area
    :math:`\sum_m S(m)`, an estimate of :math:`\sum_n \log p(x_n)` (exact for a predictor with
    exact conditionals and ``exhaustive=True``).

    Example::

        curve = mlm_curve(predictor, tokens, num_masks=8)
        curve.area, curve.area_stderr, curve.fixed_rate_estimate(0.15)

    :param predictor: ``predictor(tokens (B, T) long, mask (B, T) bool) -> (B, T, V)``
        log-probabilities; ``mask`` is True where a token is hidden.
    :param torch.Tensor tokens: long ``(N, T)``, N sequences of T token ids.
    :param str estimator: ``"stratified"`` (one uniform mask per size :math:`m`, the paper's),
        ``"chain"`` (one random order; zero variance for exact conditionals), ``"uniform"``
        (one random size per draw; bins weighted :math:`T/m`) or ``"exhaustive"``. Each size's
        bin is an unbiased estimate of :math:`S(m)`.
    :param int num_masks: independent draws (masks per size for ``"stratified"``).
    :param bool exhaustive: enumerate all :math:`2^T - 1` masks (``T <= 16``); same as
        ``estimator="exhaustive"``.
    :param int max_elements: memory budget: ``B * T * V`` of one predictor call (``None``:
        the device's default).
    :param pad_mask: optional bool ``(N, T)``, True at padding (never masked, scored or shown).
    :param torch.Generator generator: optional random generator for the masks.
    :returns: :class:`MLMCurve` (an :class:`~pyro_mpt.MPTCurve`, ``conditionals="mlm"``).
        Computed without gradients.
    """
    num_masks = check_positive_int("num_masks", num_masks)
    exhaustive = check_bool("exhaustive", exhaustive)
    name = estimator.name if isinstance(estimator, MaskEstimator) else estimator
    if exhaustive:
        name = "exhaustive"
    if name not in _CURVE_ESTIMATORS:
        raise ValueError(
            f"mlm_curve estimator must be one of {list(_CURVE_ESTIMATORS)}, got {estimator!r} "
            "(a fixed rate scores one size only: use curve.fixed_rate_estimate or mlm_estimate)"
        )
    est = (
        estimator
        if isinstance(estimator, MaskEstimator) and not exhaustive
        else get_estimator(name)
    )
    K = 1 if name == "exhaustive" else num_masks
    with torch.no_grad():
        sequences = _sequences(predictor, tokens, pad_mask, max_elements)
        draws, bins = score_sequences(sequences, est, K, by_size=True, generator=generator)
    return MLMCurve.from_bins(
        bins,
        draws,
        conditionals=CONDITIONALS_NAME,
        exhaustive=name == "exhaustive",
        lengths=sequences.lengths,
    )


def mlm_estimate(
    predictor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    *,
    estimator: str | MaskEstimator = "uniform",
    num_masks: int = 1,
    mask_rate: float = 0.15,
    max_elements: int | None = None,
    pad_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> MPTEstimate:
    r"""A masked estimate of :math:`\sum_n \log p(x_n)` under a masked predictor, with
    gradients (the cumulative MPT objective when the estimator is unbiased).

    :param estimator: ``"uniform"``, ``"stratified"``, ``"chain"``, ``"exhaustive"`` (all
        unbiased for :math:`\log p(x)` with exact conditionals) or ``"fixed"`` (BERT's rate
        ``mask_rate``: estimates :math:`T\,S(\mathrm{round}(rT))`, biased), or a
        :class:`~pyro_mpt.estimators.MaskEstimator`.
    :param int num_masks: independent draws per sequence.
    :returns: :class:`~pyro_mpt.MPTEstimate` (``conditionals="mlm"``).

    With gradients enabled every chunk's activations stay alive until ``backward``:
    ``max_elements`` then bounds one predictor call, not the whole graph.
    The other parameters are those of :func:`mlm_curve`.

    Shapes: ``tokens`` long ``(N, T)``; the result's ``per_sequence`` is ``(N,)`` and ``draws``
    ``(num_masks, N)``. With the ``"uniform"`` estimator one draw is :math:`T\,s(M)`,
    :math:`|M| \sim \mathcal U\{1..T\}`, whose expectation is
    :math:`\sum_{m=1}^T S(m) = \log p(x)` for exact conditionals.

    Example::

        est = mlm_estimate(model, tokens, estimator="uniform", num_masks=4)  # tokens: (N, T)
        loss = -est.total / tokens.numel()
        loss.backward()
    """
    num_masks = check_positive_int("num_masks", num_masks)
    est = get_estimator(estimator, mask_rate)
    sequences = _sequences(predictor, tokens, pad_mask, max_elements)
    draws, _ = score_sequences(sequences, est, num_masks, by_size=False, generator=generator)
    return MPTEstimate.from_draws(draws, est, CONDITIONALS_NAME)


def pseudo_log_likelihood(
    predictor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    *,
    max_elements: int | None = None,
    pad_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The pseudo-log-likelihood (Salazar et al. 2020) of every sequence,
    :math:`\mathrm{PLL}(x_n) = \sum_j \log p(x_{n,j} \mid x_{n,-j})`: the ``T`` leave-one-out
    masks, batched under ``max_elements``. Equals :math:`T\,S(1)`; it is *not* an estimate of
    :math:`\log p(x)` (it overestimates it for any model whose tokens are dependent).

    :param predictor: ``predictor(tokens (B, T) long, mask (B, T) bool) -> (B, T, V)``
        log-probabilities (see :func:`mlm_curve`).
    :param torch.Tensor tokens: long ``(N, T)``.
    :param int max_elements: memory budget of one predictor call (``None``: the default).
    :param pad_mask: optional bool ``(N, T)``, True at padding.
    :returns: ``(N,)`` per-sequence PLLs (differentiable; ``.sum()`` for the data set).

    Example::

        pll = pseudo_log_likelihood(hmm_predictor(*random_hmm(4, 8)), tokens)  # tokens: (N, T)
        pll.shape, pll.sum()                    # (N,), the data set's PLL
    """
    sequences = _sequences(predictor, tokens, pad_mask, max_elements)
    draws, _ = score_sequences(sequences, LeaveOneOutEstimator(), 1, by_size=False)
    return draws[0]

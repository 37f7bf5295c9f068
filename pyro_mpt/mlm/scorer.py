r"""A masked predictor as a scorer of the engine (:func:`pyro_mpt.engine.score_masks`).

A *masked predictor* is any callable ``predictor(tokens, mask) -> log_probs`` with ``tokens``
long ``(B, T)``, ``mask`` bool ``(B, T)`` (True = hidden) and ``log_probs`` ``(B, T, V)``.
:class:`PredictorScorer` hides every token outside a mask row's conditioning set
``observed`` and sums the log-probabilities of the row's ``scored`` tokens,

.. math:: \mathrm{row}_{r,n} = \sum_{j \in \mathrm{scored}_r} \log q(x_{n,j} \mid x_{n,O_r}),

in predictor batches of ``B`` rows with ``B * T * V <= max_elements``.

Padding (:func:`score_sequences`): the sequences are grouped by their number of real tokens
and each group's real tokens are packed to the left, so the predictor never sees padding;
the engine is called once per group.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..conditionals.base import Scorer
from ..engine import score_masks
from ..estimators import MaskEstimator
from ..progress import logger

__all__ = ["PredictorScorer", "PredictedSequences", "score_sequences"]


def call_predictor(
    predictor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    hidden: torch.Tensor,
) -> torch.Tensor:
    """One predictor call, its output checked: ``(B, T, V)`` floating point."""
    out = predictor(tokens, hidden)
    B, T = tokens.shape
    if not torch.is_tensor(out):
        raise ValueError(
            f"the predictor must return a tensor of log-probabilities (B, T, V), got "
            f"{type(out).__name__}"
        )
    if out.dim() != 3 or tuple(out.shape[:2]) != (B, T):
        raise ValueError(
            f"the predictor returned shape {tuple(out.shape)} for tokens of shape {(B, T)}; "
            f"expected log-probabilities of shape (B, T, V) = ({B}, {T}, V)"
        )
    if not out.is_floating_point():
        raise ValueError(
            f"the predictor must return floating-point log-probabilities, got {out.dtype}"
        )
    return out


class PredictorScorer(Scorer):
    r"""Scores the mask rows of ``n`` sequences of ``L`` tokens by a masked predictor (see
    the module docstring for the row score).

    :param predictor: ``predictor(tokens (B, L) long, mask (B, L) bool) -> (B, L, V)``.
    :param torch.Tensor tokens: long ``(n, L)``, the sequences (no padding).
    :param int vocab_size: ``V``, the predictor's vocabulary size.
    :param int max_elements: the budget ``B * L * V`` of one predictor call.

    Example::

        scorer = PredictorScorer(hmm_predictor(*random_hmm(4, 8)), tokens, 8, 2**20)
        scorer.row_scores(batch.observed, batch.scored)        # batch: a MaskBatch -> (R, n)
    """

    def __init__(
        self,
        predictor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        tokens: torch.Tensor,
        vocab_size: int,
        max_elements: int,
    ) -> None:
        self.predictor = predictor
        self.tokens = tokens
        self.vocab_size = vocab_size
        self.max_elements = max_elements

    def row_cost(self, shared: bool = False) -> int:
        """``n * L * V``: the predictor's output for one mask row of every sequence."""
        n, L = self.tokens.shape
        return n * L * self.vocab_size

    def _log_probs(
        self, observed: torch.Tensor, scored: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields ``(scored (B, L), log q (B, L))`` per predictor batch, every mask row of
        every sequence flattened in order, the tokens outside ``observed`` hidden."""
        n, L = self.tokens.shape
        R = observed.shape[0]
        observed, scored = observed.expand(R, n, L), scored.expand(R, n, L)
        flat_tokens = self.tokens.unsqueeze(0).expand(R, n, L).reshape(R * n, L)
        hidden = (~observed).reshape(R * n, L)
        flat_scored = scored.reshape(R * n, L)
        B = max(1, self.max_elements // (L * self.vocab_size))
        for start in range(0, R * n, B):
            sl = slice(start, start + B)
            toks = flat_tokens[sl]
            logp = call_predictor(self.predictor, toks, hidden[sl])
            if logp.shape[-1] != self.vocab_size:
                raise ValueError(
                    f"the predictor returned a vocabulary of {logp.shape[-1]} entries, "
                    f"earlier {self.vocab_size}"
                )
            yield flat_scored[sl], logp.gather(-1, toks.unsqueeze(-1)).squeeze(-1)

    def __call__(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """``(R, n, L)``: :math:`\\log q(x_{n,j} \\mid x_{n,O_r})` where ``scored``, else 0."""
        parts = [
            torch.where(s, lp, lp.new_zeros(())) for s, lp in self._log_probs(observed, scored)
        ]
        return torch.cat(parts).reshape(observed.shape[0], *self.tokens.shape)

    def row_scores(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """``(R, n)``: each row's sum of its scored tokens' log-probabilities."""
        parts = [
            torch.where(s, lp, lp.new_zeros(())).sum(-1)
            for s, lp in self._log_probs(observed, scored)
        ]
        return torch.cat(parts).reshape(observed.shape[0], self.tokens.shape[0])


class PredictedSequences:
    """Token sequences (with optional padding) to be scored by a predictor: their lengths,
    their real tokens packed left, and the predictor's vocabulary size ``V`` and dtype read
    from one probe call of a single row.

    :param predictor: a masked predictor.
    :param torch.Tensor tokens: long ``(N, T)`` token ids (checked by the caller).
    :param torch.Tensor pad_mask: bool ``(N, T)``, True at padding (checked by the caller).
    :param int max_elements: the budget of one predictor call (resolved by the caller).
    :raises ValueError: for a token id outside the vocabulary, or a budget smaller than one
        predictor row.
    """

    def __init__(
        self,
        predictor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        tokens: torch.Tensor,
        pad_mask: torch.Tensor,
        max_elements: int,
    ) -> None:
        if not callable(predictor):
            raise ValueError("predictor must be callable: predictor(tokens, mask) -> (B, T, V)")
        self.predictor = predictor
        self.tokens = tokens
        self.max_elements = max_elements
        self.lengths = (~pad_mask).sum(-1)
        # real tokens first, in their order: a stable sort of the padding flags
        self.order = torch.sort(pad_mask.to(torch.uint8), dim=-1, stable=True).indices
        # probe: one row of the shortest sequence reveals V and the output dtype
        L0, n0 = int(self.lengths.min()), int(self.lengths.argmin())
        probe_tokens = tokens[n0 : n0 + 1].gather(-1, self.order[n0 : n0 + 1, :L0])
        with torch.no_grad():
            probe = call_predictor(
                predictor, probe_tokens, torch.zeros_like(probe_tokens, dtype=torch.bool)
            )
        self.V, self.dtype = probe.shape[-1], probe.dtype
        if int(tokens.max()) >= self.V:
            raise ValueError(
                f"tokens contain the id {int(tokens.max())} but the predictor's vocabulary has "
                f"V = {self.V} entries"
            )
        Tmax = int(self.lengths.max())
        if Tmax * self.V > max_elements:
            raise ValueError(
                f"max_elements = {max_elements} is smaller than one predictor row of "
                f"T * V = {Tmax} * {self.V} = {Tmax * self.V} elements"
            )
        logger.debug("pyro_mpt.mlm: vocabulary V = %d, %s", self.V, self.dtype)

    def groups(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(index, tokens)`` for every distinct length: the sequences' indices and their
        real tokens packed to the left, ``(N_L, L)``."""
        for L in torch.unique(self.lengths).tolist():
            index = (self.lengths == L).nonzero().flatten()
            yield index, self.tokens[index].gather(-1, self.order[index, :L])


def score_sequences(
    sequences: PredictedSequences,
    estimator: MaskEstimator,
    num_draws: int,
    *,
    by_size: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(draws, bins)`` of all sequences, :func:`~pyro_mpt.engine.score_masks` run once per
    length group: ``(K, N)`` and ``(K, N, Tmax + 1)`` (bins 0 beyond a sequence's length; or
    ``None`` unless ``by_size``)."""
    N = sequences.tokens.shape[0]
    Tmax = int(sequences.lengths.max())
    device, dtype, K = sequences.tokens.device, sequences.dtype, num_draws
    draws = torch.zeros(K, N, dtype=dtype, device=device)
    bins = torch.zeros(K, N, Tmax + 1, dtype=dtype, device=device) if by_size else None
    for index, tokens in sequences.groups():
        n, L = tokens.shape
        scorer = PredictorScorer(sequences.predictor, tokens, sequences.V, sequences.max_elements)
        g_draws, g_bins = score_masks(
            scorer,
            estimator,
            K,
            num_sequences=n,
            num_tokens=L,
            dtype=dtype,
            device=device,
            max_elements=sequences.max_elements,
            by_size=by_size,
            generator=generator,
        )
        draws = draws.index_copy(1, index, g_draws)
        if by_size:
            bins = bins.index_copy(1, index, torch.nn.functional.pad(g_bins, (0, Tmax - L)))
    return draws, bins

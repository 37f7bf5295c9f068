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
with ``B * T * V <= max_elements``, so a long sequence never holds all its masks at once.
The vocabulary size ``V`` is read from one probe call of a single row.

Padding: ``pad_mask`` (bool ``(N, T)``, True = padding) removes tokens from a sequence. The
sequences are grouped by length and each group's real tokens are packed to the left, so the
predictor never sees padding and every mask is uniform over the real tokens only.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023; J. Salazar, D. Liang, T. Q. Nguyen, K. Kirchhoff,
"Masked Language Model Scoring", ACL 2020 (the pseudo-log-likelihood).
"""

import math
from dataclasses import dataclass

import torch

from ..conditionals.base import DEFAULT_MAX_ELEMENTS
from ..curve import MPTCurve
from ..estimators import (
    MaskBatch,
    MaskEstimator,
    get_estimator,
)
from ..scoring import MPTEstimate

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

    Reference: J. Salazar, D. Liang, T. Q. Nguyen, K. Kirchhoff, "Masked Language Model
    Scoring", ACL 2020, arXiv:1910.14659.
    """

    name = "leave_one_out"
    unbiased = False

    def rows_per_draw(self, T):
        return T

    def batches(self, N, T, num_draws, *, device, dtype, max_rows, generator=None):
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

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """

    lengths: torch.Tensor = None

    def fixed_rate_estimate(self, rate):
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


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _call(predictor, tokens, hidden):
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


# ----------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------


class _Engine:
    """Runs an estimator's mask rows through a predictor, one length group at a time."""

    def __init__(self, predictor, tokens, pad_mask, max_elements):
        _check_int("max_elements", max_elements)
        if not callable(predictor):
            raise ValueError("predictor must be callable: predictor(tokens, mask) -> (B, T, V)")
        self.predictor = predictor
        self.tokens = tokens
        self.pad_mask = _check_tokens(tokens, pad_mask)
        self.max_elements = max_elements
        N, T = tokens.shape
        self.lengths = (~self.pad_mask).sum(-1)
        # real tokens first, in their order: a stable sort of the padding flags
        self.order = torch.sort(self.pad_mask.to(torch.uint8), dim=-1, stable=True).indices
        # probe: one row of the shortest sequence reveals V and the output dtype
        L0 = int(self.lengths.min())
        n0 = int(self.lengths.argmin())
        probe_tokens = tokens[n0 : n0 + 1].gather(-1, self.order[n0 : n0 + 1, :L0])
        with torch.no_grad():
            probe = _call(predictor, probe_tokens, torch.zeros_like(probe_tokens, dtype=torch.bool))
        self.V = probe.shape[-1]
        self.dtype = probe.dtype
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

    def groups(self):
        """``(index, tokens)`` for every distinct length: the sequences' indices and their
        real tokens packed to the left, ``(N_L, L)``."""
        for L in torch.unique(self.lengths).tolist():
            index = (self.lengths == L).nonzero().flatten()
            yield index, self.tokens[index].gather(-1, self.order[index, :L])

    def _row_scores(self, tokens, observed, scored):
        """``(R, N)``: each row's sum of the scored tokens' log-probabilities, hiding every
        token outside ``observed``; predictor batches of at most ``max_elements // (T V)``
        rows."""
        R, N, T = observed.shape
        flat_tokens = tokens.unsqueeze(0).expand(R, N, T).reshape(R * N, T)
        hidden = (~observed).reshape(R * N, T)
        flat_scored = scored.reshape(R * N, T)
        B = max(1, self.max_elements // (T * self.V))
        out = []
        for start in range(0, R * N, B):
            sl = slice(start, start + B)
            toks = flat_tokens[sl]
            logp = _call(self.predictor, toks, hidden[sl])
            if logp.shape[-1] != self.V:
                raise ValueError(
                    f"the predictor returned a vocabulary of {logp.shape[-1]} entries, "
                    f"earlier {self.V}"
                )
            lp = logp.gather(-1, toks.unsqueeze(-1)).squeeze(-1)  # (B, T)
            out.append(torch.where(flat_scored[sl], lp, lp.new_zeros(())).sum(-1))
        return torch.cat(out).reshape(R, N)

    def score(self, estimator, num_draws, *, by_size, generator=None):
        """``(draws, bins)`` over all sequences: ``(K, N)`` and ``(K, N, Tmax + 1)`` (or
        ``None``), as :func:`pyro_mpt.scoring.score`."""
        N = self.tokens.shape[0]
        Tmax = int(self.lengths.max())
        device, dtype = self.tokens.device, self.dtype
        K = num_draws
        draws = torch.zeros(K, N, dtype=dtype, device=device)
        bins = torch.zeros(K, N, Tmax + 1, dtype=dtype, device=device) if by_size else None
        for index, tokens in self.groups():
            n, L = tokens.shape
            g_draws = torch.zeros(K * n, dtype=dtype, device=device)
            g_bins = torch.zeros(K * n * (L + 1), dtype=dtype, device=device) if by_size else None
            seq = torch.arange(n, device=device)
            max_rows = max(1, self.max_elements // (L * self.V) // n)
            for batch in estimator.batches(
                n, L, K, device=device, dtype=dtype, max_rows=max_rows, generator=generator
            ):
                rows = self._row_scores(tokens, batch.observed, batch.scored) * batch.weight
                flat = (batch.draw.unsqueeze(-1) * n + seq).reshape(-1)
                g_draws = g_draws.index_add(0, flat, rows.reshape(-1))
                if by_size:
                    size = batch.size.expand(rows.shape)
                    idx = (batch.draw.unsqueeze(-1) * n + seq) * (L + 1) + size
                    g_bins = g_bins.index_add(0, idx.reshape(-1), rows.reshape(-1))
            draws = draws.index_copy(1, index, g_draws.reshape(K, n))
            if by_size:
                g_bins = g_bins.reshape(K, n, L + 1)
                g_bins = torch.nn.functional.pad(g_bins, (0, Tmax - L))
                bins = bins.index_copy(1, index, g_bins)
        return draws, bins


# ----------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------

_CURVE_ESTIMATORS = ("stratified", "exhaustive", "chain", "uniform")


def mlm_curve(
    predictor,
    tokens,
    *,
    estimator="stratified",
    num_masks=1,
    exhaustive=False,
    max_elements=DEFAULT_MAX_ELEMENTS,
    pad_mask=None,
    generator=None,
):
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
    :param int max_elements: memory budget: ``B * T * V`` of one predictor call.
    :param pad_mask: optional bool ``(N, T)``, True at padding (never masked, scored or shown).
    :param torch.Generator generator: optional random generator for the masks.
    :returns: :class:`MLMCurve` (an :class:`~pyro_mpt.MPTCurve`, ``conditionals="mlm"``).
        Computed without gradients.

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    _check_int("num_masks", num_masks)
    if isinstance(estimator, MaskEstimator):
        name = estimator.name
    else:
        name = estimator
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
        engine = _Engine(predictor, tokens, pad_mask, max_elements)
        draws, bins = engine.score(est, K, by_size=True, generator=generator)
    T = bins.shape[-1] - 1
    bins = bins[..., 1:]  # (K, N, T): sizes 1..T
    per_sequence = bins.mean(0)
    scores = per_sequence.sum(0)
    area = scores.sum()
    if name == "exhaustive":
        stderr = torch.zeros_like(scores)
        area_stderr = 0.0
    elif K > 1:
        stderr = (bins.var(0).sum(0) / K).sqrt()
        area_stderr = math.sqrt(float(draws.var(0).sum() / K))
    else:
        stderr = torch.full_like(scores, float("nan"))
        area_stderr = float("nan")
    return MLMCurve(
        sizes=torch.arange(1, T + 1, device=scores.device),
        scores=scores,
        stderr=stderr,
        per_sequence=per_sequence,
        area=area,
        area_stderr=area_stderr,
        exhaustive=name == "exhaustive",
        conditionals=CONDITIONALS_NAME,
        lengths=engine.lengths,
    )


def mlm_estimate(
    predictor,
    tokens,
    *,
    estimator="uniform",
    num_masks=1,
    mask_rate=0.15,
    max_elements=DEFAULT_MAX_ELEMENTS,
    pad_mask=None,
    generator=None,
):
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

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    _check_int("num_masks", num_masks)
    est = get_estimator(estimator, mask_rate)
    engine = _Engine(predictor, tokens, pad_mask, max_elements)
    draws, _ = engine.score(est, num_masks, by_size=False, generator=generator)
    K = draws.shape[0]
    per_sequence = draws.mean(0)
    stderr = math.sqrt(float(draws.detach().var(0).sum() / K)) if K > 1 else float("nan")
    return MPTEstimate(
        total=per_sequence.sum(),
        per_sequence=per_sequence,
        draws=draws,
        stderr=stderr,
        estimator=est.name,
        conditionals=CONDITIONALS_NAME,
        unbiased=est.unbiased,
    )


def pseudo_log_likelihood(predictor, tokens, *, max_elements=DEFAULT_MAX_ELEMENTS, pad_mask=None):
    r"""The pseudo-log-likelihood (Salazar et al. 2020) of every sequence,
    :math:`\mathrm{PLL}(x_n) = \sum_j \log p(x_{n,j} \mid x_{n,-j})`: the ``T`` leave-one-out
    masks, batched under ``max_elements``. Equals :math:`T\,S(1)`; it is *not* an estimate of
    :math:`\log p(x)` (it overestimates it for any model whose tokens are dependent).

    :param predictor: ``predictor(tokens (B, T) long, mask (B, T) bool) -> (B, T, V)``
        log-probabilities (see :func:`mlm_curve`).
    :param torch.Tensor tokens: long ``(N, T)``.
    :param pad_mask: optional bool ``(N, T)``, True at padding.
    :returns: ``(N,)`` per-sequence PLLs (differentiable; ``.sum()`` for the data set).

    Example::

        pll = pseudo_log_likelihood(hmm_predictor(*random_hmm(4, 8)), tokens)  # tokens: (N, T)
        pll.shape, pll.sum()                    # (N,), the data set's PLL

    Reference: J. Salazar, D. Liang, T. Q. Nguyen, K. Kirchhoff, "Masked Language Model
    Scoring", ACL 2020, arXiv:1910.14659.
    """
    engine = _Engine(predictor, tokens, pad_mask, max_elements)
    draws, _ = engine.score(LeaveOneOutEstimator(), 1, by_size=False)
    return draws[0]

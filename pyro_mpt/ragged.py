r"""Masks for ragged sequences: sequence :math:`n` has :math:`T_n \le T` present tokens
(the others masked out by Pyro's masks, :mod:`pyro_mpt.tokens.masks`), and every mask is
drawn over its present tokens only. A token that is not present is never observed nor
scored; backends marginalise it (it integrates to one under Pyro's masks).

Each estimator keeps its law, with :math:`T_n` in place of :math:`T`, so it stays unbiased
for :math:`\log p(x_{n,\mathrm{present}})`:

- stratified: for :math:`m = 1..T_n` one uniform :math:`m`-subset :math:`M_m` of the present
  tokens, weight :math:`1/m` (rows :math:`m > T_n` get weight 0),
  :math:`\sum_{m=1}^{T_n} \frac1m \sum_{j\in M_m} \log p(x_j \mid x_{\mathrm{present}
  \setminus M_m})`;
- chain: one uniform order of the present tokens;
- uniform: :math:`m \sim \mathcal U\{1..T_n\}`, weight :math:`T_n / m`; fixed rate:
  :math:`m_n = \max(1, \mathrm{round}(r T_n))`, weight :math:`T_n / m_n`;
- exhaustive: every non-empty subset of the present tokens, weight
  :math:`1/(m \binom{T_n}{m})`.

A uniform order of the present tokens is the argsort of i.i.d. uniform keys with the absent
tokens' keys set above every present one: the present tokens take the ranks
:math:`0..T_n-1` uniformly at random.
"""

from __future__ import annotations

import math

import torch

from .estimators import (
    ChainEstimator,
    ExhaustiveEstimator,
    FixedRateEstimator,
    MaskBatch,
    StratifiedEstimator,
    UniformEstimator,
)

__all__ = ["ragged_batches"]


def _present_ranks(present, shape, generator):
    """``(*shape, N, T)`` long ranks: present tokens a uniform order of ``0..T_n - 1``,
    absent ones after them."""
    keys = torch.rand(*shape, *present.shape, device=present.device, generator=generator)
    keys = torch.where(present, keys, 2.0)
    return keys.argsort(-1).argsort(-1)


def _chunks(num_rows, max_rows):
    for start in range(0, num_rows, max_rows):
        yield start, min(num_rows, start + max_rows)


def _batch(present, scored, weight, size, draw):
    scored = scored & present
    return MaskBatch(present & ~scored, scored, weight, size, draw)


def _stratified(est, present, Tn, num_draws, max_rows, dtype, generator):
    T = present.shape[-1]
    # "auto" is affine only where every token is present: independent masks here
    if est.masks == "affine":
        raise ValueError(
            "masks='affine' needs every token present (its maps live on Z_T); this model's "
            "masks (poutine.mask / obs_mask) leave sequences of different lengths: use "
            "masks='independent' or masks='nested'"
        )
    if est.masks == "nested":
        ranks = _present_ranks(present, (num_draws,), generator)
    for start, stop in _chunks(num_draws * T, max_rows):
        rows = torch.arange(start, stop, device=present.device)
        m = (rows % T + 1).unsqueeze(-1).expand(-1, present.shape[0])  # (R, N)
        if est.masks == "nested":  # the last m present tokens of the draw's order
            scored = ranks[rows // T] >= (Tn - m).unsqueeze(-1)
        else:
            ranks_r = _present_ranks(present, (stop - start,), generator)
            scored = ranks_r < m.unsqueeze(-1)
        keep = m <= Tn
        weight = torch.where(keep, 1.0 / m.to(dtype), 0.0)
        yield _batch(present, scored & keep.unsqueeze(-1), weight, m, rows // T)


def _chain(present, Tn, num_draws, max_rows, dtype, generator):
    T = present.shape[-1]
    ranks = _present_ranks(present, (num_draws,), generator)
    for start, stop in _chunks(num_draws * T, max_rows):
        rows = torch.arange(start, stop, device=present.device)
        r = ranks[rows // T]
        i = (rows % T).view(-1, 1, 1)
        observed = (r < i) & present
        scored = (r == i) & present
        weight = torch.ones(stop - start, present.shape[0], dtype=dtype, device=present.device)
        size = (Tn - (rows % T).unsqueeze(-1)).clamp(min=0)
        yield MaskBatch(observed, scored, weight, size, rows // T)


def _one_mask(est, present, Tn, num_draws, max_rows, dtype, generator):
    """Uniform and fixed-rate estimators: one mask per draw and sequence."""
    N = present.shape[0]
    Tf = Tn.to(dtype)
    for start, stop in _chunks(num_draws, max_rows):
        R = stop - start
        if isinstance(est, UniformEstimator):
            u = torch.rand(R, N, device=present.device, generator=generator, dtype=dtype)
            size = (u * Tf).floor().long() + 1
        else:
            size = (est.mask_rate * Tf).round().long().clamp(min=1).expand(R, N)
        size = torch.minimum(size, Tn.clamp(min=1))
        scored = _present_ranks(present, (R,), generator) < size.unsqueeze(-1)
        weight = torch.where(Tn > 0, Tf / size.to(dtype), 0.0)
        draw = torch.arange(start, stop, device=present.device)
        yield _batch(present, scored, weight, size, draw)


def _exhaustive(est, present, Tn, num_draws, max_rows, dtype):
    T = present.shape[-1]
    batches = est.batches(
        present.shape[0], T, num_draws, device=present.device, dtype=dtype, max_rows=max_rows
    )
    comb = torch.tensor(
        [[math.comb(t, m) for m in range(T + 1)] for t in range(T + 1)], dtype=dtype
    ).to(present.device)
    for b in batches:
        inside = ~(b.scored & ~present).any(-1)  # (R, N): the mask holds present tokens only
        m = b.scored.sum(-1)
        weight = torch.where(inside, 1.0 / (m.to(dtype) * comb[Tn, m].clamp(min=1)), 0.0)
        yield _batch(present, b.scored & inside.unsqueeze(-1), weight, m, b.draw)


def ragged_batches(estimator, present, num_draws, *, dtype, max_rows, generator=None):
    r"""The :class:`~pyro_mpt.estimators.MaskBatch` chunks of ``estimator`` for sequences
    whose present tokens are ``present``: each draw's masks are drawn over the
    :math:`T_n` present tokens of sequence :math:`n` with the estimator's law at
    :math:`T_n`, so the draw is unbiased for :math:`\log p(x_{n,\mathrm{present}}) =
    \sum_{m=1}^{T_n} S_n(m)`; absent tokens are never observed nor scored.

    :param estimator: one of the registered estimators.
    :param torch.Tensor present: bool ``(N, T)``.
    :param int num_draws: independent draws.
    :param int max_rows: the most rows per chunk.
    :raises ValueError: for an estimator or mask kind without a ragged law.
    """
    Tn = present.sum(-1)
    args = (present, Tn, num_draws, max_rows, dtype)
    if isinstance(estimator, StratifiedEstimator):
        return _stratified(estimator, *args, generator)
    if isinstance(estimator, ChainEstimator):
        return _chain(*args, generator)
    if isinstance(estimator, (UniformEstimator, FixedRateEstimator)):
        return _one_mask(estimator, *args, generator)
    if isinstance(estimator, ExhaustiveEstimator):
        return _exhaustive(estimator, *args)
    raise ValueError(
        f"estimator {estimator!r} has no law for masked-out tokens (poutine.mask / obs_mask "
        "leave sequences of different lengths); use one of 'stratified', 'chain', "
        "'uniform', 'fixed', 'exhaustive'"
    )

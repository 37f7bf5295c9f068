r"""The nested masks of token orders (:mod:`~pyro_mpt.conditionals.orders`) for particles
held in chunks (:mod:`~pyro_mpt.conditionals.chunked`).

For an order :math:`\pi` and the prefix weights :math:`a_{s,k} = \log w^0_s + \sum_{i<k}
l_{s,\pi_i}`, the conditional of the token at position ``j`` after the prefix of length
``k`` is, split over the particle chunks :math:`c`,

.. math::
    \log p(x_{\pi_j} \mid x_{\pi_{<k}}) =
    \operatorname{LSE}_c \Big(\log \sum_{s \in c} e^{a_{s,k} - A_{c,k}}\, e^{l_{s,\pi_j} -
    B_{c,j}} + A_{c,k} + B_{c,j}\Big) - \operatorname{LSE}_c \operatorname{LSE}_{s\in c}
    a_{s,k},

:math:`A_{c,k} = \max_{s\in c} a_{s,k}`, :math:`B_{c,j} = \max_{s\in c} l_{s,\pi_j}`: one
``(T, s) x (s, T)`` matrix product per (sequence, order) and chunk, merged by a running
log-sum-exp. Pairs of (draw, sequence) are taken in groups under the budget (outer loop),
particle chunks inside it (the model is run again for each chunk of each group). Where a
chunk's product underflows, ``None`` is returned and the caller scores rows instead, as
:func:`~pyro_mpt.conditionals.orders.factorized_suffix_scores` does.
"""

from __future__ import annotations

import torch

from ..progress import logger
from .kernels import FactorizedKernel

__all__ = ["chunked_suffix_scores"]


def _chunk_terms(table, log_w0, order):
    r"""``(num, den)`` of one particle chunk for ``P`` pairs, ``None`` on underflow:
    ``num`` ``(P, T_k, T_j)`` :math:`\operatorname{LSE}_{s\in c}(a_{s,k} + l_{s,\pi_j})`,
    ``den`` ``(P, T_k)`` :math:`\operatorname{LSE}_{s\in c} a_{s,k}`.

    :param table: ``(s, P, T)`` each pair's sequence's :math:`l_{s,t}`.
    :param log_w0: ``(s, P)``.
    :param order: long ``(P, T)``."""
    S, P, T = table.shape
    lp = table.gather(-1, order.unsqueeze(0).expand(S, P, T))  # (s, P, T) in order
    prefix = torch.cat([lp.new_zeros(S, P, 1), lp[..., :-1].cumsum(-1)], -1)
    a = log_w0.unsqueeze(-1) + prefix
    A = a.amax(0)  # (P, T_k)
    # a chunk whose particles all weigh 0 (a reweighting of particle_error) adds nothing
    live = torch.isfinite(A)
    A = torch.where(live, A, A.new_zeros(()))
    B = lp.amax(0)  # (P, T_j)
    weight = (a - A).exp().permute(1, 2, 0)  # (P, T_k, s)
    likelihood = (lp - B).exp().permute(1, 0, 2)  # (P, s, T_j)
    mix = torch.bmm(weight, likelihood)  # (P, T_k, T_j)
    finfo = torch.finfo(mix.dtype)
    if not bool(((mix > finfo.tiny / finfo.eps) | ~live.unsqueeze(-1)).all()):
        return None
    num = mix.log() + A.unsqueeze(-1) + B.unsqueeze(1)
    return num, torch.logsumexp(a, 0)


def _factorized_table(kernels):
    """``(s, N, T)`` the chunk's tables side by side, or ``None`` unless every kernel is a
    :class:`~pyro_mpt.conditionals.kernels.FactorizedKernel`."""
    if not all(isinstance(k, FactorizedKernel) for _, k in kernels):
        return None
    tables = [k.table for _, k in sorted(kernels, key=lambda item: item[0].start)]
    S = max(t.shape[0] for t in tables)
    return torch.cat([t.expand(S, *t.shape[1:]) for t in tables], -1)


def _merge(total, part):
    return part if total is None else torch.logaddexp(total, part)


def chunked_suffix_scores(scorer, ranks: torch.Tensor, max_elements: int) -> torch.Tensor | None:
    r"""``(D, N, T)``: :math:`\sum_{j \ge k} \log p(x_{n,\pi_j} \mid x_{n,\pi_{<k}})` for the
    orders ``ranks`` (long ``(D, N|1, T)``, each token's position), by the formula of the
    module docstring; ``None`` when a kernel is not factorized or a product underflows.

    :param scorer: a :class:`~pyro_mpt.conditionals.chunked.ChunkedParticleScorer`.
    :param int max_elements: the budget of one group of pairs and one particle chunk."""
    N, T = scorer.layout.num_sequences, scorer.layout.num_tokens
    D = ranks.shape[0]
    order = ranks.expand(D, N, T).argsort(-1).reshape(D * N, T)
    seq = torch.arange(N, device=ranks.device).repeat(D)
    s = max(c.stop - c.start for c in scorer.chunks)
    # per pair: the gathered table, prefix, weights, likelihoods (4 s T) and the T x T
    # product, its log and the running sums (4 T^2); half the budget, the chunk's own
    # model run has the rest
    group = max(1, max_elements // 2 // (4 * s * T + 4 * T * T))
    logger.debug(
        "pyro_mpt: nested orders in groups of %d pair(s), %d particle chunk(s)",
        group,
        len(scorer.chunks),
    )
    k = torch.arange(T, device=ranks.device)
    suffix = k.unsqueeze(-1) <= k  # j >= k: masked after prefix k
    out = []
    for start in range(0, D * N, group):
        n, pair_order = seq[start : start + group], order[start : start + group]
        num = den = None
        for chunk in scorer.chunks:
            table = _factorized_table(chunk.kernels())
            if table is None:
                return None
            log_w0 = scorer.log_w0[chunk.start : chunk.stop]
            terms = _chunk_terms(table[:, n], log_w0[:, n], pair_order)
            if terms is None:
                return None
            num, den = _merge(num, terms[0]), _merge(den, terms[1])
        log_cond = num - den.unsqueeze(-1)
        out.append(torch.where(suffix, log_cond, log_cond.new_zeros(())).sum(-1))
    return torch.cat(out).reshape(D, N, T)

r"""The conditionals of every prefix of a token order at once, for factorized token kernels.

With weighted particles :math:`(z_s, \log w^0_s)` and tokens independent given :math:`z`
(a table :math:`l_{s,t} = \log p(x_t \mid z_s)`), an order :math:`\pi` of the ``T`` tokens
(positions counted from 0) and its prefixes :math:`O_k = \{\pi_0, \dots, \pi_{k-1}\}`,
``k = 0..T-1``:

.. math::
    a_{s,k} = \log w^0_s + \sum_{i < k} l_{s,\pi_i}, \qquad
    \log p(x_{\pi_j} \mid x_{O_k}) = \log \sum_s \operatorname{softmax}_s(a_{\cdot,k})_s\,
    e^{\,l_{s,\pi_j} - c_j} + c_j, \quad c_j = \max_s l_{s,\pi_j},

so the ``T x T`` table of conditionals of one order is ONE product of a ``(T, S)`` and an
``(S, T)`` matrix (the particles' weights after each prefix, and the tokens' shifted
likelihoods), instead of ``T`` mask rows each mixing ``S`` particles over ``T`` tokens. The
suffix sums :math:`\sum_{j \ge k} \log p(x_{\pi_j} \mid x_{O_k})` are the rows of the nested
stratified estimator (:class:`~pyro_mpt.estimators.StratifiedEstimator` with
``nested=True``): its mask of size :math:`T - k` is the suffix after :math:`O_k`.

The product is exact in exact arithmetic; where a product entry would underflow (the weighted
particles all give token ``j`` less than ``tiny / eps`` of the best particle's likelihood),
:func:`factorized_suffix_scores` returns ``None`` and the caller scores rows instead.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import torch

__all__ = ["factorized_suffix_scores", "independent_sites_suffix_scores", "order_pair_cost"]


def order_pair_cost(S: int, T: int) -> int:
    """Tensor elements one (draw, sequence) order needs: the gathered table, its prefix
    sums and shifted exponentials (``3 S T``), the weights (``S T``) and the ``T x T``
    product and its log (``2 T^2``)."""
    return 4 * S * T + 2 * T * T


def _pair_suffix_scores(table, log_w0, order):
    r"""``(P, T)`` suffix sums of ``P`` (sequence, order) pairs; ``None`` on underflow.

    :param table: ``(S, P, T)`` :math:`l_{s,t}` of each pair's sequence.
    :param log_w0: ``(S, P)``.
    :param order: long ``(P, T)``, :math:`\pi`: the token at each position.
    """
    S, P, T = table.shape
    lp = table.gather(-1, order.unsqueeze(0).expand(S, P, T))  # (S, P, T) in order
    # a[:, :, k] = log w0 + the first k tokens' log-likelihoods (an exclusive prefix sum)
    prefix = torch.cat([lp.new_zeros(S, P, 1), lp[..., :-1].cumsum(-1)], -1)
    a = log_w0.unsqueeze(-1) + prefix
    weight = torch.softmax(a, 0).permute(1, 2, 0)  # (P, T_k, S)
    shift = lp.amax(0)  # (P, T_j)
    likelihood = (lp - shift).exp().permute(1, 0, 2)  # (P, S, T_j)
    mix = torch.bmm(weight, likelihood)  # (P, T_k, T_j)
    finfo = torch.finfo(mix.dtype)
    if not bool((mix > finfo.tiny / finfo.eps).all()):
        return None
    log_cond = mix.log() + shift.unsqueeze(1)
    k = torch.arange(T, device=table.device)
    suffix = (k.unsqueeze(-1) <= k).expand(P, T, T)  # j >= k: masked after prefix k
    return torch.where(suffix, log_cond, log_cond.new_zeros(())).sum(-1)


def factorized_suffix_scores(
    table: torch.Tensor, log_w0: torch.Tensor, ranks: torch.Tensor, max_elements: int
) -> torch.Tensor | None:
    r"""``(D, N, T)``: entry ``[d, n, k]`` is :math:`\sum_{j \ge k} \log p(x_{n,\pi_j} \mid
    x_{n,\pi_{<k}})` for the order :math:`\pi` of draw ``d`` and sequence ``n`` (positions
    counted from 0: the first ``k`` tokens observed, the other ``T - k`` scored), by the
    formula of the module docstring, in chunks of (draw, sequence) pairs whose
    :func:`order_pair_cost` stays under ``max_elements``. ``None`` if a product underflows.

    :param table: ``(S, N, T)`` :math:`\log p(x_{n,t} \mid z_s)`.
    :param log_w0: ``(S, N)`` particle log-weights.
    :param ranks: long ``(D, N, T)`` (or ``(D, 1, T)``: one order for all sequences),
        ``ranks[d, n, t]`` the position of token ``t`` in the order.
    """
    S, N, T = table.shape
    D = ranks.shape[0]
    order = ranks.expand(D, N, T).argsort(-1).reshape(D * N, T)
    seq = torch.arange(N, device=table.device).repeat(D)  # each pair's sequence
    chunk = max(1, max_elements // order_pair_cost(S, T))
    out = []
    for start in range(0, D * N, chunk):
        n = seq[start : start + chunk]
        scores = _pair_suffix_scores(table[:, n], log_w0[:, n], order[start : start + chunk])
        if scores is None:
            return None
        out.append(scores)
    return torch.cat(out).reshape(D, N, T)


def independent_sites_suffix_scores(sites: list, ranks: torch.Tensor) -> torch.Tensor:
    r"""``(D, N, T)`` suffix sums of orders over sites independent of each other (no
    particles): a site's tokens after position ``k`` of the order are the site's own tokens
    after its :math:`c_k` first ones, :math:`c_k` its tokens among the first ``k``, and they
    are conditioned on those :math:`c_k` only, so

    .. math:: \sum_{j \ge k} \log p(x_{\pi_j} \mid x_{\pi_{<k}})
        = \sum_{\text{sites } s} \sigma_s\big(c^{(s)}_k\big),

    :math:`\sigma_s(c)` the site's suffix sum after its first ``c`` tokens in the
    restricted order (0 for ``c`` = all of them).

    :param sites: ``(token slice, suffix)`` pairs; ``suffix(site_ranks)`` returns ``(D, N,
        T_s)`` for long ``(D, N|1, T_s)`` ranks of the site's tokens among themselves.
    :param ranks: long ``(D, N|1, T)``, the position of every token in its order.
    """
    if len(sites) == 1 and sites[0][0].start == 0 and sites[0][0].stop == ranks.shape[-1]:
        return sites[0][1](ranks)
    order = ranks.argsort(-1)  # the token at each position
    total = 0.0
    for sl, suffix in sites:
        inside = (order >= sl.start) & (order < sl.stop)
        seen = inside.cumsum(-1) - inside.long()  # site tokens among the first k
        scores = suffix(ranks[..., sl].argsort(-1).argsort(-1))  # (D, N, T_s)
        scores = torch.cat([scores, scores.new_zeros(*scores.shape[:-1], 1)], -1)
        total = total + scores.gather(-1, seen.expand(*scores.shape[:-1], seen.shape[-1]))
    return total

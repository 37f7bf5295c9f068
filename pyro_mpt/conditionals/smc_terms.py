r"""The nested stratified terms of an SMC sweep: each unrevealed token's conditional
:math:`\log \hat p(x_t \mid x_O) = \log \sum_s W_s\, p(x_t \mid z_s)` as a mixture over the
weighted particles, and the jackknife estimate of its bias
(:mod:`pyro_mpt.conditionals.smc`).

The mixture is a ratio of particle averages, so its log is low by :math:`O(1/P)` (Jensen's
gap of the log of a mean); a sweep's terms share its particles and their biases add up.
Measured on PPCA (N=20, T=6, two latents, noise 0.5, 128 particles, 30 sweeps of fixed
orders against the dense Gaussian's conditionals): the row-weighted nested stratified total
was :math:`-2.71 \pm 0.43` nats off before the correction, :math:`-0.32 \pm 0.36` after
(512 particles: :math:`-1.23 \pm 0.34` and :math:`-0.32 \pm 0.31`).

Reference: M. H. Quenouille, "Notes on bias in estimation", Biometrika 43, 1956.
"""

from __future__ import annotations

import torch

__all__ = ["NUM_GROUPS", "mixture_jackknife"]

#: Blocks of particles of the jackknife bias correction of the conditionals.
NUM_GROUPS = 8


def mixture_jackknife(
    log_w: torch.Tensor, table: torch.Tensor, num_groups: int = NUM_GROUPS
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(cond, bias)``, both ``(B, N, T)``: the mixture :math:`L_t = \log \sum_s W_s
    e^{l_{s,t}}` (:math:`W = \mathrm{softmax}_s \log w`) and the delete-a-block jackknife
    estimate of its bias,

    .. math:: L_{(-g),t} = \log \frac{\sum_{s \notin g} W_s e^{l_{s,t}}}{\sum_{s \notin g}
        W_s}, \qquad \hat b_t = (G - 1)\Big(\frac1G \sum_{g=1}^G L_{(-g),t} - L_t\Big),

    over :math:`G` contiguous blocks :math:`g` of the particles (dim 1). If
    :math:`\mathbb E L_t = \log p(x_t \mid x_O) + b/P + O(P^{-2})`, then
    :math:`\mathbb E \hat b_t = b/P + O(P^{-2})` (Quenouille 1956). Blocks, not interleaved
    groups: systematic resampling keeps a particle's offspring adjacent and its ancestors in
    order, so a block descends from a contiguous range of ancestors and the blocks are
    nearly independent, as the jackknife needs (on hard PPCA, 30 sweeps, interleaved
    groups gave the same correction within its noise). ``bias`` is 0 where it is not finite
    (a sequence whose particles all lost their weight) or with fewer than 2 particles.

    :param log_w: ``(B, P, N)`` the particles' log-weights (unnormalised).
    :param table: ``(B, P, N, T)`` the token log-likelihoods :math:`l_{s,t}`.
    :param int num_groups: :math:`G` (at most ``P``)."""
    B, P, N = log_w.shape
    G = min(num_groups, P)
    a = torch.log_softmax(log_w, 1).unsqueeze(-1) + table  # (B, P, N, T)
    top = a.amax(1, keepdim=True).nan_to_num(neginf=0.0)  # a shift against underflow
    block = torch.arange(P, device=a.device) * G // P
    sums = a.new_zeros(B, G, N, table.shape[-1]).index_add_(1, block, torch.exp(a - top))
    # float32 priors with float64 tokens: the weights join the table's dtype
    mass = a.new_zeros(B, G, N).index_add_(1, block, torch.softmax(log_w, 1).to(a.dtype))
    others = 1 - torch.eye(G, dtype=a.dtype, device=a.device)  # sums over the other blocks
    left_out = torch.log(torch.einsum("hg,bgnt->bhnt", others, sums))
    left_out = left_out - torch.log(torch.einsum("hg,bgn->bhn", others, mass)).unsqueeze(-1)
    cond = torch.log(sums.sum(1)) + top.squeeze(1)
    bias = (G - 1) * (left_out.mean(1) + top.squeeze(1) - cond)
    return cond, torch.nan_to_num(bias, nan=0.0, posinf=0.0, neginf=0.0)

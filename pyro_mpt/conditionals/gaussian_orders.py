r"""The conditionals of every prefix of a token order at once, for Gaussian token kernels.

For :math:`x \sim \mathcal N(\mu, \Sigma)`, an order :math:`\pi` of the ``T`` tokens
(positions counted from 0), :math:`r = (x - \mu)_\pi` and the Cholesky factor
:math:`L L^\top = \Sigma_{\pi\pi}` of the order-permuted covariance, the innovations
:math:`e = L^{-1} r` give every prefix conditional by cumulative sums over the columns of
:math:`L`: for :math:`j \ge k`,

.. math::
    \mathbb E[x_{\pi_j} \mid x_{\pi_{<k}}] = \mu_{\pi_j} + \sum_{i<k} L_{ji} e_i, \qquad
    \mathrm{Var}[x_{\pi_j} \mid x_{\pi_{<k}}] = \Sigma_{\pi_j \pi_j} - \sum_{i<k} L_{ji}^2,

since the first ``k`` columns of :math:`L` are the regression of every token on the first
``k`` of the order. So the ``T x T`` table of one order's conditionals costs one
factorisation and ``O(T^2)`` cumulative sums, and its suffix sums
:math:`\sum_{j \ge k} \log p(x_{\pi_j} \mid x_{\pi_{<k}})` are the rows of the nested
stratified estimator (:class:`~pyro_mpt.estimators.StratifiedEstimator` with
``masks="nested"``).

For a low-rank covariance :math:`\Sigma = W W^\top + \mathrm{diag}(D)` no ``T x T`` factor is
needed: the posterior precision of the ``K`` factors after the first ``k`` tokens is
:math:`A_k = I + \sum_{i<k} u_i u_i^\top` with :math:`u_i = W_{\pi_i} / \sqrt{D_{\pi_i}}`
(cumulative sums of rank-1 outer products), and by Sherman-Morrison the columns of the
Cholesky factor are :math:`L_{ji} = W_{\pi_j}^\top h_i` (:math:`j > i`) with

.. math::
    h_i = \frac{A_i^{-1} W_{\pi_i}}{\sqrt{v_i}}, \qquad
    v_i = D_{\pi_i} + W_{\pi_i}^\top A_i^{-1} W_{\pi_i} = L_{ii}^2, \qquad
    e_i = \frac{r_i - W_{\pi_i}^\top A_i^{-1} b_i}{\sqrt{v_i}},

:math:`b_i = \sum_{i' < i} u_{i'} r_{i'} / \sqrt{D_{\pi_{i'}}}`: one batched ``K x K``
solve per prefix, one ``(T, K) x (K, T)`` product per order, ``O(T^2 K)`` in all.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import math

import torch

from ..progress import logger

__all__ = [
    "dense_order_factor",
    "gaussian_suffix_scores",
    "lowrank_order_factor",
    "suffix_from_factor",
]

_LOG_2PI = math.log(2 * math.pi)

#: Elements of one ``T x T`` table per chunk at most (2 MiB in float64): the order path is
#: about twenty passes over such tables, memory-bound, and measured on one CPU core at
#: N=256, T=200 a step took 0.8 s with 2^18-element tables against 1.8 s with tables as
#: large as the memory budget allows.
_CACHE_TABLE = 2**18


def lowrank_order_factor(resid: torch.Tensor, W: torch.Tensor, D: torch.Tensor):
    r"""The strict lower part of the Cholesky factor of :math:`W W^\top + \mathrm{diag}(D)`
    along given orders, and the innovations, by the rank-1 updates of the module docstring.

    :param resid: ``(P, T)`` :math:`r = x - \mu`, already in order.
    :param W: ``(P, T, K)`` the factor's rows in order.
    :param D: ``(P, T)`` the diagonal in order (positive).
    :returns: ``(lower, e, diag, floor)``: ``lower`` ``(P, T, T)`` with ``lower[p, j, i] =
        L_ji`` for ``j > i`` (other entries finite but unused), ``e`` ``(P, T)``, ``diag``
        ``(P, T)`` :math:`\Sigma_{\pi_j\pi_j}` and ``floor`` ``(P, T)`` :math:`D_{\pi_j}` (a
        low-rank conditional variance never falls below it).
    """
    P, T, K = W.shape
    root_D = D.sqrt()
    u = W / root_D.unsqueeze(-1)  # (P, T, K)
    outer = u.unsqueeze(-1) * u.unsqueeze(-2)  # (P, T, K, K)
    # exclusive prefix sums: A[:, i] and b[:, i] before token i is revealed
    eye = torch.eye(K, dtype=W.dtype, device=W.device)
    A = eye + outer.cumsum(1) - outer
    ub = u * (resid / root_D).unsqueeze(-1)
    b = ub.cumsum(1) - ub
    # A_i^{-1} [W_i | b_i] by one batched solve: A = I + (PSD) has eigenvalues >= 1, so
    # pivoted LU is as safe as Cholesky, and solve_ex skips the host sync of its check
    sol = torch.linalg.solve_ex(A, torch.stack([W, b], -1))[0]  # (P, T, K, 2)
    AW, Ab = sol[..., 0], sol[..., 1]
    v = D + (W * AW).sum(-1)  # (P, T) the chain variances
    root_v = v.sqrt()
    e = (resid - (W * Ab).sum(-1)) / root_v
    h = AW / root_v.unsqueeze(-1)
    lower = W @ h.mT  # (P, T_j, T_i): L_ji = W_j . h_i
    diag = D + (W * W).sum(-1)
    return lower, e, diag, D


def dense_order_factor(resid: torch.Tensor, cov: torch.Tensor):
    r"""The Cholesky factor of the order-permuted covariance and the innovations.

    :param resid: ``(P, T)`` :math:`r = x - \mu`, in order.
    :param cov: ``(P, T, T)`` :math:`\Sigma_{\pi\pi}`.
    :returns: ``(lower, e, diag, floor)`` as :func:`lowrank_order_factor`; ``floor`` is
        ``eps`` times the diagonal (the cumulative sums may round below 0 where a token is
        nearly determined by the ones before it).
    """
    L = torch.linalg.cholesky(cov)
    e = torch.linalg.solve_triangular(L, resid.unsqueeze(-1), upper=False).squeeze(-1)
    diag = cov.diagonal(dim1=-2, dim2=-1)
    return L, e, diag, diag * torch.finfo(cov.dtype).eps


def suffix_from_factor(resid, lower, e, diag, floor) -> torch.Tensor:
    r"""``(P, T)``: entry ``k`` is :math:`\sum_{j \ge k} \log p(x_{\pi_j} \mid x_{\pi_{<k}})`
    by the cumulative sums of the module docstring.

    Column ``i`` of the ``(T_j, T_i)`` tables holds the conditionals given the first
    ``i + 1`` tokens, valid for ``j > i`` (the strict lower triangle); row ``k = 0``
    conditions on nothing, :math:`\mathcal N(r_j; 0, \Sigma_{jj})`.

    :param resid: ``(P, T)`` in order; the others as returned by :func:`lowrank_order_factor`.
    """
    given = _GivenPrefix.apply(resid, lower, e, diag, floor)  # (P, T_i)
    prior = -0.5 * (_LOG_2PI + diag.log() + resid * resid / diag)  # k = 0
    return torch.cat([prior.sum(-1, keepdim=True), given[:, :-1]], -1)


class _GivenPrefix(torch.autograd.Function):
    r"""``(P, T_i)``: :math:`\sum_{j > i} \log \mathcal N(r_j; m_{ji}, v_{ji})` with
    :math:`m_{ji} = \sum_{i' \le i} L_{ji'} e_{i'}` and :math:`v_{ji} = \max(\Sigma_{jj} -
    \sum_{i' \le i} L_{ji'}^2, f_j)`, without the constant :math:`\log 2\pi` terms added
    by :meth:`forward`. A hand-written backward: the ``T x T`` tables are the whole cost, and
    autograd would keep and revisit about twice as many of them (the chain rule through a
    cumulative sum is the reversed cumulative sum of the gradient)."""

    @staticmethod
    def forward(ctx, resid, lower, e, diag, floor):
        T = resid.shape[-1]
        j = torch.arange(T, device=resid.device)
        above = (j.unsqueeze(-1) <= j).expand(lower.shape)  # i >= j: not a conditional
        var = (lower * lower).cumsum(-1).neg_().add_(diag.unsqueeze(-1))
        floored = var <= floor.unsqueeze(-1)
        var = torch.where(floored, floor.unsqueeze(-1), var).masked_fill_(above, 1.0)
        err = (lower * e.unsqueeze(-2)).cumsum(-1).neg_().add_(resid.unsqueeze(-1))
        z = err.masked_fill_(above, 0.0).div_(var)  # err / var, 0 where unused
        # 0 where unused (log 1 and z = 0), so the column sums need no mask
        log_cond = (z * z).mul_(var).add_(var.log())
        given = -0.5 * log_cond.sum(-2)
        counts = torch.arange(T - 1, -1, -1, device=resid.device, dtype=resid.dtype)
        ctx.save_for_backward(lower, e, var, z, floored, above)
        return given - 0.5 * _LOG_2PI * counts  # T - 1 - i conditionals in column i

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the saved tables are not inputs
            raise RuntimeError(
                "the Gaussian order path (masks='nested') cannot differentiate twice: "
                "use masks='independent' for second derivatives"
            )
        lower, e, var, z, floored, above = ctx.saved_tensors
        g = grad.unsqueeze(-2)  # (P, 1, T_i)
        g_mean = z * g  # d/d mean of -0.5 (r - m)^2 / v
        g_var = (z * z).sub_(var.reciprocal()).mul_(0.5 * g).masked_fill_(above, 0.0)
        g_resid = -g_mean.sum(-1)
        g_floor = torch.where(floored, g_var, 0.0).sum(-1)
        g_diag_full = g_var.masked_fill_(floored, 0.0)  # d/d diag; -d/d cumsum of L^2
        g_diag = g_diag_full.sum(-1)
        # through a cumulative sum: the reversed cumulative sum, total - cumsum + self
        Gm = _reverse_cumsum(g_mean)
        Gv = _reverse_cumsum(g_diag_full)
        g_e = (Gm * lower).sum(-2)
        g_lower = Gm.mul_(e.unsqueeze(-2)).sub_(Gv.mul_(lower).mul_(2.0))
        return g_resid, g_lower, g_e, g_diag, g_floor


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """``y[..., i] = sum_{i' >= i} x[..., i']`` without flipping copies: total - cumsum +
    self, in one new table."""
    out = x.cumsum(-1)
    torch.sub(x.sum(-1, keepdim=True), out, out=out)
    return out.add_(x)


def order_pair_cost(T: int, K: int | None) -> int:
    """Tensor elements one (draw, sequence) order needs: about eight ``T x T`` tables (the
    factor, the two cumulative sums, the conditionals and their masks) plus, for a low-rank
    factor of ``K`` columns, the ``T`` prefix precisions and their factors."""
    return 8 * T * T + (0 if K is None else 4 * T * (K * K + K))


def gaussian_suffix_scores(kernel, ranks: torch.Tensor, max_elements: int) -> torch.Tensor:
    r"""``(D, N, T)``: entry ``[d, n, k]`` is :math:`\sum_{j \ge k} \log p(x_{n,\pi_j} \mid
    x_{n,\pi_{<k}})` for the order of draw ``d`` and sequence ``n`` of an exact Gaussian
    kernel without particles, in chunks of (draw, sequence) pairs whose
    ``order_pair_cost`` stays under ``max_elements``.

    :param kernel: a :class:`~pyro_mpt.conditionals.kernels.LowRankGaussianKernel` or
        :class:`~pyro_mpt.conditionals.kernels.DenseGaussianKernel` with one particle.
    :param ranks: long ``(D, N|1, T)``: the position of every token in its order.
    :raises ValueError: naming ``max_elements`` when not even one order fits.
    """
    resid = kernel.resid[0]  # (N, T)
    N, T = resid.shape
    D = ranks.shape[0]
    lowrank = hasattr(kernel, "W")
    K = kernel.W.shape[-1] if lowrank else None
    cost = order_pair_cost(T, K)
    if cost > max_elements:
        raise ValueError(
            f"max_elements={max_elements} is too small for the conditionals of one order of "
            f"T={T} tokens ({cost} elements): raise max_elements, or use masks='independent'"
        )
    order = ranks.expand(D, N, T).argsort(-1).reshape(D * N, T)
    seq = torch.arange(N, device=resid.device).repeat(D)
    chunk = max(1, max_elements // cost)
    if resid.device.type == "cpu":  # cache-sized tables (see _CACHE_TABLE)
        chunk = max(1, min(chunk, _CACHE_TABLE // (T * T)))
    logger.debug("pyro_mpt: Gaussian order path, %d order(s) per chunk of %d", chunk, D * N)
    out = []
    for start in range(0, D * N, chunk):
        n, pi = seq[start : start + chunk], order[start : start + chunk]
        r = resid[n].gather(-1, pi)
        if lowrank:
            factor = lowrank_order_factor(r, *_lowrank_rows(kernel, n, pi))
        else:
            factor = dense_order_factor(r, _dense_rows(kernel.cov, n, pi))
        out.append(suffix_from_factor(r, *factor))
    return torch.cat(out).reshape(D, N, T)


def _lowrank_rows(kernel, n, pi):
    """``W`` ``(P, T, K)`` and ``D`` ``(P, T)`` in the order ``pi`` of each pair."""
    W, D = kernel.W, kernel.D
    if W.dim() == 2:
        W_p = W[pi]
    else:  # (1, N, T, K): per sequence
        W_p = W[0, n].gather(1, pi.unsqueeze(-1).expand(*pi.shape, W.shape[-1]))
    D_p = D[pi] if D.dim() == 1 else D[0, n].gather(-1, pi)
    return W_p, D_p


def _dense_rows(cov, n, pi):
    """``(P, T, T)``: each pair's covariance with rows and columns in its order."""
    P, T = pi.shape
    if cov.dim() == 2:
        return cov[pi.unsqueeze(-1), pi.unsqueeze(-2)]
    c = cov[0, n]  # (P, T, T)
    rows = c.gather(1, pi.unsqueeze(-1).expand(P, T, T))
    return rows.gather(2, pi.unsqueeze(-2).expand(P, T, T))

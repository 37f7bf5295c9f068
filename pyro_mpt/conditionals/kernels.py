r"""Token kernels: for one observed site and a batch of masks, the log-density of the
conditioning tokens and the conditional log-densities of the others, per particle.

Given a particle :math:`z_s` (or none), a kernel returns, for mask rows ``r``:

- ``log_marginal[r, s, n]`` :math:`= \log p(x_{n,O} \mid z_s)` (only when asked), and
- ``log_cond[r, s, n, t]`` :math:`= \log p(x_{n,t} \mid x_{n,O}, z_s)`.

Kernels work on tensors laid out as ``(S, N, ...)``: ``S`` flattened particles (1 without
latents), ``N`` flattened sequences.
"""

from __future__ import annotations

import math

import torch

from .gaussian_orders import gaussian_suffix_scores

__all__ = ["DenseGaussianKernel", "FactorizedKernel", "LowRankGaussianKernel"]

_LOG_2PI = math.log(2 * math.pi)


class FactorizedKernel:
    r"""Tokens independent given the particle: a table ``l[s, n, t]`` of
    :math:`\log p(x_{n,t} \mid z_s)`. Then :math:`\log p(x_O \mid z_s) = \sum_{t\in O} l` and
    :math:`\log p(x_j \mid x_O, z_s) = l[s, n, j]` (no dependence on the mask)."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # (S, N, T)

    def row_cost(self, shared: bool = False) -> int:
        S, N, T = self.table.shape
        return N + T if shared and S == 1 else S * N * T

    def __call__(
        self, observed: torch.Tensor, scored: torch.Tensor, need_marginal: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        marginal = None
        if need_marginal:
            marginal = torch.einsum("rnt,snt->rsn", observed.to(self.table.dtype), self.table)
        return marginal, self.table.unsqueeze(0)

    def row_scores(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """``(R, N)`` sums of the scored tokens' conditionals, without particles."""
        table = self.table[0]  # (N, T)
        s = scored.to(table.dtype)
        if s.shape[1] == 1:  # masks shared by all sequences: one matrix product
            return s[:, 0] @ table.T
        return torch.einsum("rnt,nt->rn", s, table)

    def suffix_scores(self, ranks: torch.Tensor, max_elements: int) -> torch.Tensor:
        r"""``(D, N, T)``: :math:`\sum_{j \ge k} l_{\pi_j}` for the orders ``ranks``
        (``(D, N|1, T)``) without particles (the tokens are independent): reversed
        cumulative sums along each order."""
        table = self.table[0]  # (N, T)
        D, T = ranks.shape[0], ranks.shape[-1]
        order = ranks.expand(D, table.shape[0], T).argsort(-1)
        in_order = table.expand(D, -1, -1).gather(-1, order)
        return in_order.flip(-1).cumsum(-1).flip(-1)


def _normal_log_prob(x, mean, var):
    return -0.5 * (_LOG_2PI + var.log() + (x - mean) ** 2 / var)


class LowRankGaussianKernel:
    r"""Exact conditionals of :math:`x \sim \mathcal N(\mu, W W^\top + D)` by Woodbury: with
    :math:`A = I + W_O^\top D_O^{-1} W_O` (``K x K``) and
    :math:`b = W_O^\top D_O^{-1}(x_O - \mu_O)`,

    .. math::
        \mathbb E[x_j \mid x_O] = \mu_j + W_j^\top A^{-1} b, \qquad
        \mathrm{Var}[x_j \mid x_O] = D_j + W_j^\top A^{-1} W_j,

    and :math:`\log p(x_O) = -\tfrac12\big(|O|\log 2\pi + \sum_O \log D + \log|A|
    + \sum_O r^2/D - b^\top A^{-1} b\big)`. Cost :math:`O(TK^2 + K^3)` per mask; no
    ``T x T`` solve.

    :param x: ``(N, T)`` or ``(S, N, T)`` observations.
    :param loc: ``(S, N, T)``.
    :param W: ``(T, K)`` (shared) or ``(S, N, T, K)``.
    :param D: ``(T,)`` (shared) or ``(S, N, T)``.
    """

    def __init__(self, x: torch.Tensor, loc: torch.Tensor, W: torch.Tensor, D: torch.Tensor):
        self.x, self.loc, self.W, self.D = x, loc, W, D
        self.shared = W.dim() == 2 and D.dim() == 1
        self.resid = x - loc  # (S, N, T)
        K = W.shape[-1]
        if self.shared:
            outer = (W.unsqueeze(-1) * W.unsqueeze(-2)).reshape(W.shape[0], K * K)  # (T, K^2)
            self.outer = outer
            self.outer_over_D = outer / D.unsqueeze(-1)

    def row_cost(self, shared: bool = False) -> int:
        S, N, T = self.resid.shape
        K = self.W.shape[-1]
        if self.shared and S == 1:
            if shared:
                return 3 * N * K + T * (K * K + K + 3)
            return N * (8 * T + 3 * K * K)  # _per_sequence_row_scores
        return S * N * (T * (K + 4) + K * K)

    def row_scores(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        r"""``(R, N)``: :math:`\sum_{j \in M} \log p(x_j \mid x_O)` per mask row, without
        particles.

        When a mask row is shared by all sequences (``observed`` of shape ``(R, 1, T)``) the
        variances depend on the mask alone and the data enter through matrix products:
        with :math:`u_j = 1[j \in M]/v_j`, :math:`c = A^{-1} b` and
        :math:`G = \sum_j u_j W_j W_j^\top`,

        .. math:: \sum_{j\in M} \frac{(r_j - W_j^\top c)^2}{v_j}
            = \sum_j u_j r_j^2 - 2\,c^\top \sum_j u_j r_j W_j + c^\top G c,

        so no ``(R, N, T)`` tensor is formed: ``O(R T K^2 + N T R K)`` work in products.
        """
        if not (self.shared and self.resid.shape[0] == 1):
            R, N, T = observed.shape[0], self.resid.shape[1], observed.shape[2]
            observed, scored = observed.expand(R, N, T), scored.expand(R, N, T)
            _, cond = self(observed, scored, False)
            return torch.where(scored.unsqueeze(1), cond, 0.0).sum(-1)[:, 0]
        if observed.shape[1] != 1:
            return self._per_sequence_row_scores(observed, scored)
        W, D = self.W, self.D
        r = self.resid[0]  # (N, T)
        o = observed[:, 0].to(r.dtype)  # (R, T)
        s = scored[:, 0].to(r.dtype)
        R, T = o.shape
        K = W.shape[-1]
        eye = torch.eye(K, dtype=r.dtype, device=r.device)
        A = eye + (o @ self.outer_over_D).reshape(R, K, K)
        L = torch.linalg.cholesky(A)
        Ainv = torch.cholesky_inverse(L)  # (R, K, K)
        var = D + Ainv.reshape(R, K * K) @ self.outer.T  # (R, T): the mask's variances
        u = s / var
        log_norm = -0.5 * (s * (_LOG_2PI + var.log())).sum(-1)  # (R,)
        # c[n, r] = A_r^{-1} W^T diag(o_r / D) r_n and g[n, r] = W^T diag(u_r) r_n are
        # linear in r_n, with A_r^{-1} folded into the right factor.
        WA = torch.einsum("tl,rkl->trk", W, Ainv)  # (T, R, K): A_r^{-1} W_t
        G = (u @ self.outer).reshape(R, K, K)  # symmetric
        # c = r Zc and h = G c - 2 g = r Zh, with Zh = Zc G - 2 Zg, come out of one
        # (N, T) x (T, 2 R K) product, laid out (N, R, 2K) so nothing is transposed after
        Zc = (o / D).T.unsqueeze(-1) * WA  # (T, R, K)
        Zh = torch.einsum("trk,rkl->trl", Zc, G) - 2 * u.T.unsqueeze(-1) * W.unsqueeze(1)
        ch = (r @ torch.cat([Zc, Zh], -1).reshape(T, R * 2 * K)).reshape(-1, R, 2 * K)
        quad = r**2 @ u.T + (ch[..., :K] * ch[..., K:]).sum(-1)  # (N, R)
        return log_norm.unsqueeze(-1) - 0.5 * quad.T  # (R, N)

    def suffix_scores(self, ranks: torch.Tensor, max_elements: int) -> torch.Tensor:
        r"""``(D, N, T)`` suffix sums of the orders ``ranks`` (``(D, N|1, T)``) without
        particles: every prefix conditional at once
        (:func:`~pyro_mpt.conditionals.gaussian_orders.gaussian_suffix_scores`)."""
        return gaussian_suffix_scores(self, ranks, max_elements)

    def _per_sequence_row_scores(self, observed, scored):
        r"""``(R, N)`` for masks drawn per sequence (``(R, N, T)``), without particles.

        Each (row, sequence) pair has its own :math:`A = I + W^\top \mathrm{diag}(o/D) W`
        and :math:`b = W^\top \mathrm{diag}(o/D)\, r`: both are matrix products over the
        tokens, ``(RN, T) x (T, K^2)`` and ``(RN, T) x (T, K)``. Then
        :math:`c = A^{-1} b` and :math:`A^{-1}` by one batched ``K x K`` solve, the means
        :math:`W c` and variances :math:`D + \mathrm{vec}(A^{-1})^\top \mathrm{vec}(W_t
        W_t^\top)` by two more products, and one elementwise pass over the ``(R, N, T)``
        conditionals. No ``(R, N, T, K)`` tensor is formed and nothing waits on the host."""
        W, D = self.W, self.D
        r = self.resid[0]  # (N, T)
        R, N, T = observed.shape
        K = W.shape[-1]
        o = observed.to(r.dtype)
        eye = torch.eye(K, dtype=r.dtype, device=r.device)
        A = eye + (o.reshape(R * N, T) @ self.outer_over_D).reshape(R * N, K, K)
        b = (o * (r / D)).reshape(R * N, T) @ W  # (RN, K)
        # A^{-1} and A^{-1} b from one batched solve against [I | b]. A = I + (PSD) has
        # eigenvalues >= 1, so pivoted LU is as safe as Cholesky here; solve_ex skips the
        # error check's host sync, and one call instead of three saves launches.
        rhs = torch.cat([eye.expand(R * N, K, K), b.unsqueeze(-1)], -1)
        sol = torch.linalg.solve_ex(A, rhs)[0]  # (RN, K, K + 1)
        Ainv, c = sol[..., :K].reshape(R * N, K * K), sol[..., K]
        var = torch.addmm(D, Ainv, self.outer.T).reshape(R, N, T)
        # r - W c for every row: one batched product added to r (no separate subtraction)
        err = torch.baddbmm(r.expand(R, N, T), c.view(R, N, K), W.T.expand(R, K, T), alpha=-1)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (W, D, r)):
            log_cond = _LOG_2PI + var.log() + err**2 / var
        else:
            # no autograd graph to keep: update in place, two (R, N, T) tensors in all
            log_cond = err.square_().div_(var).add_(var.log_()).add_(_LOG_2PI)
        return -0.5 * torch.where(scored, log_cond, 0.0).sum(-1)

    def __call__(
        self, observed: torch.Tensor, scored: torch.Tensor, need_marginal: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        W, D, r = self.W, self.D, self.resid
        o = observed.to(r.dtype)  # (R, N, T)
        R, N, T = o.shape
        K = W.shape[-1]
        eye = torch.eye(K, dtype=r.dtype, device=r.device)
        if self.shared:
            A = eye + (o.reshape(R * N, T) @ self.outer_over_D).reshape(R, N, K, K)
            A = A.unsqueeze(1)  # (R, 1, N, K, K): the same for every particle
            b = (o.unsqueeze(1) * (r / D).unsqueeze(0)) @ W  # (R, S, N, K)
        else:
            Wd = W / D.unsqueeze(-1)  # (S, N, T, K)
            A = eye + torch.einsum("rnt,sntk,sntl->rsnkl", o, Wd, W)
            b = torch.einsum("rnt,snt,sntk->rsnk", o, r, Wd)
        L = torch.linalg.cholesky(A)
        c = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)  # (R, S, N, K)
        if self.shared:
            mean = self.loc + c @ W.T
            Ainv = torch.cholesky_inverse(L)  # (R, 1, N, K, K)
            quad = (Ainv.reshape(R, N, K * K) @ self.outer.T).unsqueeze(1)  # (R, 1, N, T)
            var = D + quad
        else:
            mean = self.loc + torch.einsum("rsnk,sntk->rsnt", c, W)
            Ainv = torch.cholesky_inverse(L)
            var = D + torch.einsum("sntk,rsnkl,sntl->rsnt", W, Ainv, W)
        x = self.x
        log_cond = _normal_log_prob(x, mean, var)
        marginal = None
        if need_marginal:
            logdet_A = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (R, S|1, N)
            if self.shared:
                o_s = o.unsqueeze(1)
                logdet_D = (o @ D.log()).unsqueeze(1)
                maha = o_s * (r**2 / D).unsqueeze(0)
            else:
                o_s = o.unsqueeze(1)
                logdet_D = (o_s * D.log()).sum(-1)
                maha = o_s * (r**2 / D)
            maha = maha.sum(-1) - (b * c).sum(-1)
            n_obs = o.sum(-1).unsqueeze(1)
            marginal = -0.5 * (n_obs * _LOG_2PI + logdet_D + logdet_A + maha)
        return marginal, log_cond


class DenseGaussianKernel:
    r"""Exact conditionals of :math:`x \sim \mathcal N(\mu, \Sigma)` with a dense covariance:

    .. math::
        \mathbb E[x_j \mid x_O] = \mu_j + \Sigma_{jO}\Sigma_{OO}^{-1}(x_O - \mu_O), \qquad
        \mathrm{Var}[x_j \mid x_O] = \Sigma_{jj} - \Sigma_{jO}\Sigma_{OO}^{-1}\Sigma_{Oj}.

    Masking is done by the Cholesky factor of
    :math:`\tilde\Sigma = \Sigma \odot o o^\top + \mathrm{diag}(1 - o)` (block-diagonal in
    :math:`O` and the rest), so one batched ``T x T`` factorisation serves every mask. Tokens
    neither observed nor scored are marginalised (dropped), as the chain estimator needs.

    :param x: ``(N, T)`` or ``(S, N, T)``; ``loc``: ``(S, N, T)``; ``cov``: ``(T, T)`` or
        ``(S, N, T, T)``.
    """

    def __init__(self, x: torch.Tensor, loc: torch.Tensor, cov: torch.Tensor):
        self.x, self.loc, self.cov = x, loc, cov
        self.resid = x - loc

    def row_cost(self, shared: bool = False) -> int:
        S, N, T = self.resid.shape
        return S * N * T * T * 3

    def suffix_scores(self, ranks: torch.Tensor, max_elements: int) -> torch.Tensor:
        r"""``(D, N, T)`` suffix sums of the orders ``ranks`` (``(D, N|1, T)``) without
        particles: every prefix conditional at once
        (:func:`~pyro_mpt.conditionals.gaussian_orders.gaussian_suffix_scores`)."""
        return gaussian_suffix_scores(self, ranks, max_elements)

    def __call__(
        self, observed: torch.Tensor, scored: torch.Tensor, need_marginal: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        r, cov = self.resid, self.cov
        o = observed.to(r.dtype)  # (R, N, T)
        if cov.dim() == 2:
            o_s = o  # (R, N, T): covariance shared over particles
        else:
            o_s = o.unsqueeze(1)  # (R, 1, N, T)
        oo = o_s.unsqueeze(-1) * o_s.unsqueeze(-2)
        masked = cov * oo + torch.diag_embed(1 - o_s)
        L = torch.linalg.cholesky(masked)
        if cov.dim() == 2:
            L = L.unsqueeze(1)  # (R, 1, N, T, T)
            o_s = o.unsqueeze(1)
        r_o = o_s * r  # (R, S, N, T)
        alpha = torch.cholesky_solve(r_o.unsqueeze(-1), L).squeeze(-1)  # zero outside O
        mean = self.loc + (alpha.unsqueeze(-2) @ cov).squeeze(-2)
        cov_rows_o = cov * o_s.unsqueeze(-1)  # rows of O only
        Z = torch.linalg.solve_triangular(L, cov_rows_o, upper=False)
        var = cov.diagonal(dim1=-2, dim2=-1) - (Z**2).sum(-2)
        # An observed token's conditional is a point mass (variance 0): give it a harmless
        # stand-in so that neither the value nor the gradient of log 0 appears; callers only
        # read the conditionals of unobserved tokens.
        seen = o_s > 0
        var = torch.where(seen, 1.0, var)
        mean = torch.where(seen, self.x, mean)
        log_cond = _normal_log_prob(self.x, mean, var)
        marginal = None
        if need_marginal:
            logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            n_obs = o.sum(-1).unsqueeze(1)
            marginal = -0.5 * (n_obs * _LOG_2PI + logdet + (r_o * alpha).sum(-1))
        return marginal, log_cond

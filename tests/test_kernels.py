r"""Tests of :mod:`pyro_mpt.conditionals.kernels` against dense brute force.

For every mask row the Gaussian kernels must return the conditionals of textbook Gaussian
conditioning on the observed tokens :math:`O`, computed here one (row, sequence) at a time:

.. math::
    x_j \mid x_O \sim \mathcal N\big(\mu_j + \Sigma_{jO}\Sigma_{OO}^{-1}(x_O - \mu_O),\;
    \Sigma_{jj} - \Sigma_{jO}\Sigma_{OO}^{-1}\Sigma_{Oj}\big),
    \qquad \log p(x_O) = \log \mathcal N(x_O; \mu_O, \Sigma_{OO}),

and the factorized kernel must return its table and the sum of the observed entries.
Everything in float64, to 1e-10.
"""

import pytest
import torch

from pyro_mpt.conditionals.kernels import (
    DenseGaussianKernel,
    FactorizedKernel,
    LowRankGaussianKernel,
)
from tests.conftest import assert_close

F64 = dict(dtype=torch.float64)


def _masks(gen, R, N, T):
    """Random ``(R, N, T)`` observed / scored rows: row 0 observes nothing, row 1 leaves
    tokens 0 and 1 neither observed nor scored, and each row scores at least one token."""
    ranks = torch.rand(R, N, T, generator=gen).argsort(-1)
    size = torch.randint(1, T + 1, (R, N, 1), generator=gen)
    size[0] = T
    scored = ranks < size
    observed = ~scored
    observed[1, :, :2] = False
    scored[1, :, :2] = False
    return observed, scored


def _brute_force(x, mu, cov, observed):
    """``(marginal (R, N), cond (R, N, T))``: Gaussian conditioning by dense solves, one
    (row, sequence) at a time; ``cond`` at observed tokens is left 0."""
    R, N, T = observed.shape
    marginal = torch.zeros(R, N, **F64)
    cond = torch.zeros(R, N, T, **F64)
    for r in range(R):
        for n in range(N):
            o = observed[r, n]
            O, M = o.nonzero().flatten(), (~o).nonzero().flatten()
            m = mu[n] if mu.dim() == 2 else mu
            S_OO = cov[O][:, O]
            S_MO = cov[M][:, O]
            resid = x[n, O] - m[O]
            if len(O):
                marginal[r, n] = torch.distributions.MultivariateNormal(m[O], S_OO).log_prob(
                    x[n, O]
                )
                mean = m[M] + S_MO @ torch.linalg.solve(S_OO, resid)
                var = cov[M, M] - (S_MO * torch.linalg.solve(S_OO, S_MO.T).T).sum(-1)
            else:
                mean, var = m[M], cov[M, M]
            cond[r, n, M] = torch.distributions.Normal(mean, var.sqrt()).log_prob(x[n, M])
    return marginal, cond


def _gaussian_problem(seed, N=3, T=6, K=2):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(T, K, generator=gen, **F64)
    D = torch.rand(T, generator=gen, **F64) + 0.2
    loc = torch.randn(N, T, generator=gen, **F64)
    x = torch.randn(N, T, generator=gen, **F64)
    observed, scored = _masks(gen, 5, N, T)
    return W, D, loc, x, observed, scored


@pytest.mark.parametrize("kernel_kind", ["dense", "lowrank"])
def test_gaussian_kernels_match_dense_brute_force(kernel_kind):
    """Marginal of the observed tokens and conditionals of the unobserved ones, per row and
    sequence, equal dense Gaussian conditioning to 1e-10 (one particle, S = 1)."""
    W, D, loc, x, observed, scored = _gaussian_problem(0)
    cov = W @ W.T + torch.diag(D)
    if kernel_kind == "dense":
        kernel = DenseGaussianKernel(x, loc.unsqueeze(0), cov)
    else:
        kernel = LowRankGaussianKernel(x, loc.unsqueeze(0), W, D)
    marginal, cond = kernel(observed, scored, True)
    want_marginal, want_cond = _brute_force(x, loc, cov, observed)
    assert marginal.shape == (5, 1, 3) and cond.shape[-3:] == (1, 3, 6)
    assert_close(marginal[:, 0], want_marginal, atol=1e-10)
    unobserved = ~observed
    assert_close(cond.expand(5, 1, 3, 6)[:, 0][unobserved], want_cond[unobserved], atol=1e-10)


def test_lowrank_kernel_per_particle_parameters_match_brute_force():
    """W, D varying by particle (``(S, N, T, K)``, ``(S, N, T)``): each particle's slice is
    conditioned on its own covariance."""
    S, N, T, K = 2, 3, 5, 2
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(S, N, T, K, generator=gen, **F64)
    D = torch.rand(S, N, T, generator=gen, **F64) + 0.3
    loc = torch.randn(S, N, T, generator=gen, **F64)
    x = torch.randn(N, T, generator=gen, **F64)
    observed, scored = _masks(gen, 4, N, T)
    marginal, cond = LowRankGaussianKernel(x, loc, W, D)(observed, scored, True)
    for s in range(S):
        for n in range(N):
            cov = W[s, n] @ W[s, n].T + torch.diag(D[s, n])
            m, c = _brute_force(x[n : n + 1], loc[s, n], cov, observed[:, n : n + 1])
            assert_close(marginal[:, s, n], m[:, 0], atol=1e-10)
            o = observed[:, n]
            assert_close(cond[:, s, n][~o], c[:, 0][~o], atol=1e-10)


def test_factorized_kernel_sums_observed_entries():
    r"""``log p(x_O | z_s) = \sum_{t \in O} l[s, n, t]`` (hand sum), the conditionals are the
    table itself, and ``row_scores`` sums the scored entries (per-sequence and shared
    masks)."""
    S, N, T, R = 3, 4, 5, 6
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(S, N, T, generator=gen, **F64)
    observed, scored = _masks(gen, R, N, T)
    kernel = FactorizedKernel(table)
    marginal, cond = kernel(observed, scored, True)
    hand = torch.zeros(R, S, N, **F64)
    for r in range(R):
        for s in range(S):
            for n in range(N):
                hand[r, s, n] = sum(float(table[s, n, t]) for t in range(T) if observed[r, n, t])
    assert_close(marginal, hand, atol=1e-12)
    assert_close(cond, table.unsqueeze(0), atol=0.0)
    assert kernel(observed, scored, False)[0] is None
    assert kernel.row_cost() == S * N * T

    one = FactorizedKernel(table[:1])
    want = (table[0] * scored).sum(-1)  # (R, N)
    assert_close(one.row_scores(observed, scored), want, atol=1e-12)
    shared = scored[:, :1]  # (R, 1, T): one mask for all sequences
    assert_close(one.row_scores(observed[:, :1], shared), (table[0] * shared).sum(-1), atol=1e-12)
    assert one.row_cost(shared=True) == N + T


@pytest.mark.parametrize("per_sequence", [True, False], ids=["per-sequence", "shared"])
def test_low_rank_row_scores_match_dense_conditionals(per_sequence):
    """The low-rank kernel's summed conditionals (Woodbury, by matrix products) equal the
    dense kernel's on the full covariance W W^T + diag(D), value and gradient, within 1e-10
    in float64, with autograd and without; rows include an empty conditioning set and
    tokens neither observed nor scored."""
    gen = torch.Generator().manual_seed(3)
    N, T, K, R = 6, 11, 3, 10
    f64 = dict(dtype=torch.float64)
    W = torch.randn(T, K, generator=gen, **f64).requires_grad_()
    D = (torch.rand(T, generator=gen, **f64) + 0.2).requires_grad_()
    loc = torch.randn(T, generator=gen, **f64).requires_grad_()
    x = torch.randn(N, T, generator=gen, **f64)
    n_masks = N if per_sequence else 1
    ranks = torch.rand(R, n_masks, T, generator=gen).argsort(-1)
    size = torch.randint(1, T + 1, (R, n_masks, 1), generator=gen)
    size[0] = T  # nothing observed
    scored = ranks < size
    observed = ~scored
    observed[1, :, :2] = False  # marginalised tokens
    scored[1, :, :2] = False

    def low_rank():
        kernel = LowRankGaussianKernel(x, loc.expand(1, N, T), W, D)
        return kernel.row_scores(observed, scored)

    def dense():
        cov = W @ W.T + torch.diag(D)
        kernel = DenseGaussianKernel(x, loc.expand(1, N, T), cov)
        o, s = observed.expand(R, N, T), scored.expand(R, N, T)
        _, cond = kernel(o, s, False)
        return torch.where(s.unsqueeze(1), cond, 0.0).sum(-1)[:, 0]

    a, b = low_rank(), dense()
    assert a.shape == (R, N)
    assert_close(a, b, atol=1e-10)
    with torch.no_grad():  # the in-place route taken without autograd
        assert_close(low_rank(), b.detach(), atol=1e-10)
    for ga, gb in zip(
        torch.autograd.grad(a.sum(), [W, D, loc]), torch.autograd.grad(b.sum(), [W, D, loc])
    ):
        assert_close(ga, gb, atol=1e-9)

r"""Nested stratified rows of exact Gaussian kernels from one factor per order
(:mod:`pyro_mpt.conditionals.gaussian_orders`): against brute force (dense conditioning by
``torch.linalg.solve``, token by token, no pyro_mpt), and against the row path on the SAME
scorer with the same random orders (values to 1e-10 in float64, gradients to 1e-9) for
low-rank, dense, per-sequence and multi-site Gaussian models."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals.gaussian_orders import _GivenPrefix, gaussian_suffix_scores
from pyro_mpt.engine import MPTOptions, prepare, score_masks
from pyro_mpt.estimators import StratifiedEstimator
from pyro_mpt.models import multivariate_normal, ppca_collapsed, sample_ppca
from tests.conftest import assert_close

VALUE_ATOL, GRAD_ATOL = 1e-10, 1e-9
NESTED = StratifiedEstimator(masks="nested")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _brute(resid, cov, ranks):
    r"""Entry ``[d, n, k]``: :math:`\sum_{j \ge k} \log p(x_{\pi_j} \mid x_{\pi_{<k}})` by
    solving the observed block for every prefix and token."""
    D, N, T = ranks.shape
    out = torch.zeros(D, N, T, dtype=resid.dtype)
    for d in range(D):
        for n in range(N):
            order = ranks[d, n].argsort()
            for k in range(T):
                seen = order[:k]
                for j in order[k:]:
                    mean, var = torch.zeros(()), cov[j, j]
                    if k:
                        w = torch.linalg.solve(cov[seen][:, seen], cov[seen, j])
                        mean, var = w @ resid[n, seen], var - w @ cov[seen, j]
                    err = resid[n, j] - mean
                    out[d, n, k] += -0.5 * (math.log(2 * math.pi) + var.log() + err**2 / var)
    return out


class _Kernel:
    """The attributes ``gaussian_suffix_scores`` reads, without a model."""

    def __init__(self, resid, **params):
        self.resid = resid.unsqueeze(0)
        self.__dict__.update(params)


@pytest.mark.parametrize("max_elements", [10**9, 600])  # one chunk; one pair per chunk
@pytest.mark.parametrize("kind", ["lowrank", "dense"])
def test_suffix_scores_against_brute_force(kind, max_elements):
    g = _gen(0)
    N, T, K, D = 3, 7, 2, 2
    W = torch.randn(T, K, generator=g)
    diag = torch.rand(T, generator=g) + 0.2
    cov = W @ W.T + torch.diag(diag)
    resid = torch.randn(N, T, generator=g)
    params = {"W": W, "D": diag} if kind == "lowrank" else {"cov": cov}
    kernel = _Kernel(resid, **params)
    ranks = torch.rand(D, N, T, generator=g).argsort(-1)
    out = gaussian_suffix_scores(kernel, ranks, max_elements)
    assert_close(out, _brute(resid, cov, ranks), atol=VALUE_ATOL)
    # row 0 conditions on nothing: the sum of the tokens' marginal log-densities
    marginal = dist.Normal(0.0, cov.diagonal().sqrt()).log_prob(resid).sum(-1)
    assert_close(out[..., 0], marginal.expand(D, N), atol=VALUE_ATOL)
    shared = gaussian_suffix_scores(kernel, ranks[:, :1], max_elements)  # (D, 1, T) orders
    assert_close(shared, _brute(resid, cov, ranks[:, :1].expand(D, N, T)), atol=VALUE_ATOL)


def test_hand_written_backward_passes_gradcheck():
    g = _gen(1)
    P, T = 2, 5
    lower = torch.randn(P, T, T, generator=g) * 0.3
    args = [
        torch.randn(P, T, generator=g),
        lower,
        torch.randn(P, T, generator=g),
        3.0 + torch.rand(P, T, generator=g),
        0.01 + 0.1 * torch.rand(P, T, generator=g),
    ]
    args[3][0, 4] = 0.02  # a variance held at its floor
    args = [a.requires_grad_(True) for a in args]
    assert torch.autograd.gradcheck(_GivenPrefix.apply, args)


def test_too_small_a_budget_names_the_option():
    kernel = _Kernel(torch.zeros(2, 30), W=torch.ones(30, 2), D=torch.ones(30))
    ranks = torch.arange(30).expand(1, 2, 30)
    with pytest.raises(ValueError, match=r"max_elements=100 is too small.*T=30"):
        gaussian_suffix_scores(kernel, ranks, 100)


def _lowrank():
    X, truth = sample_ppca(4, 6, 2, 0.5, generator=_gen(2))
    W = truth["W"].clone().requires_grad_(True)
    return ppca_collapsed, (X, 2, W, truth["loc"], truth["noise_scale"]), W


def _dense():
    g = _gen(3)
    T = 6
    tril = (torch.randn(T, T, generator=g) * 0.4 + 1.5 * torch.eye(T)).tril()
    tril.requires_grad_(True)
    X = torch.randn(5, T, generator=g)

    def model(X):
        multivariate_normal(X, torch.zeros(T), tril @ tril.T)

    return model, (X,), tril


def _per_sequence():
    """A cov_factor that differs by sequence: the kernel keeps ``(1, N, T, K)``."""
    g = _gen(4)
    N, T, K = 4, 5, 2
    W = torch.randn(N, T, K, generator=g).requires_grad_(True)
    X = torch.randn(N, T, generator=g)

    def model(X):
        with pyro.plate("sequences", N):
            pyro.sample(
                "x", dist.LowRankMultivariateNormal(torch.zeros(T), W, torch.ones(T)), obs=X
            )

    return model, (X,), W


def _two_sites():
    """A low-rank site and an independent ``Normal`` site: the order path adds the sites'
    own suffixes at their counts of revealed tokens."""
    g = _gen(5)
    N, T1, T2 = 4, 4, 3
    W = torch.randn(T1, 2, generator=g).requires_grad_(True)
    loc = torch.randn(T2, generator=g).requires_grad_(True)
    X1, X2 = torch.randn(N, T1, generator=g), torch.randn(N, T2, generator=g)

    def model(X1, X2):
        with pyro.plate("sequences", N):
            lowrank = dist.LowRankMultivariateNormal(torch.zeros(T1), W, 0.5 * torch.ones(T1))
            pyro.sample("a", lowrank, obs=X1)
            pyro.sample("b", dist.Normal(loc, 0.7).to_event(1), obs=X2)

    return model, (X1, X2), W


class _Rows:
    """The same scorer, scored by mask rows."""

    def __init__(self, scorer):
        self.scorer = scorer

    def row_cost(self, shared=False):
        return self.scorer.row_cost(shared)

    def row_scores(self, observed, scored):
        return self.scorer.row_scores(observed, scored)


CASES = {"lowrank": _lowrank, "dense": _dense, "per sequence": _per_sequence}
CASES["two sites"] = _two_sites


@pytest.mark.parametrize("share_masks", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_order_path_equals_the_row_path_on_the_same_scorer(case, share_masks):
    model, args, param = CASES[case]()
    layout, scorer, _ = prepare(model, args, {}, MPTOptions(conditionals="gaussian"))
    assert scorer.scores_orders
    kw = dict(num_sequences=layout.num_sequences, num_tokens=layout.num_tokens)
    kw.update(dtype=torch.float64, device="cpu", share_masks=share_masks, by_size=True)
    calls = []
    original = scorer.suffix_scores
    scorer.suffix_scores = lambda *a: calls.append(1) or original(*a)
    fast, fast_bins = score_masks(scorer, NESTED, 3, generator=_gen(6), **kw)
    assert calls  # the order path ran
    rows, row_bins = score_masks(_Rows(scorer), NESTED, 3, generator=_gen(6), **kw)
    assert_close(fast.detach(), rows.detach(), atol=VALUE_ATOL)
    assert_close(fast_bins.detach(), row_bins.detach(), atol=VALUE_ATOL)
    (g_fast,) = torch.autograd.grad(fast.sum(), param, retain_graph=True)
    (g_rows,) = torch.autograd.grad(rows.sum(), param)
    assert g_fast.abs().max() > 0
    assert_close(g_fast, g_rows, atol=GRAD_ATOL)


def test_nested_masked_elbo_is_unbiased_for_the_exact_lml():
    """Nested masks on collapsed PPCA, 400 seeded draws: the mean is within 4 standard
    errors of the exact log-likelihood (LowRankMultivariateNormal.log_prob)."""
    X, truth = sample_ppca(3, 8, 2, 0.5, generator=_gen(7))
    args = (X, 2, truth["W"], truth["loc"], truth["noise_scale"])
    exact = dist.LowRankMultivariateNormal(
        truth["loc"], truth["W"], truth["noise_scale"] ** 2 * torch.ones(8)
    ).log_prob(X)
    pyro.set_rng_seed(8)
    est = MaskedELBO(masks="nested", num_masks=400).estimate(ppca_collapsed, None, *args)
    assert abs(float(est.total) - float(exact.sum())) < 4 * est.stderr
    assert est.stderr > 0


def test_second_derivatives_are_refused_not_wrong():
    """The backward reads saved tables that are not inputs, so a second derivative through
    it would be silently wrong: it raises instead."""
    g = _gen(9)
    W = torch.randn(5, 2, generator=g).requires_grad_(True)
    kernel = _Kernel(torch.randn(2, 5, generator=g), W=W, D=torch.ones(5))
    out = gaussian_suffix_scores(kernel, torch.arange(5).expand(1, 2, 5), 10**6)
    with pytest.raises(RuntimeError, match="cannot differentiate twice.*independent"):
        torch.autograd.grad(out.sum(), W, create_graph=True)

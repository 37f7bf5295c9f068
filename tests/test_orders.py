r"""Nested stratified rows from one matrix product per order
(:mod:`pyro_mpt.conditionals.orders`): against brute force, and against the row path on the
SAME scorer with the same random orders (values to 1e-10, gradients to 1e-9) for importance,
quadrature, joint enumeration and particle-free factorized tokens; an underflowing product
falls back to rows."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt.conditionals.kernels import FactorizedKernel
from pyro_mpt.conditionals.orders import factorized_suffix_scores
from pyro_mpt.conditionals.particles import ParticleScorer
from pyro_mpt.engine import MPTOptions, prepare, score_masks
from pyro_mpt.estimators import StratifiedEstimator
from pyro_mpt.models import gaussian_mixture, ppca_collapsed, ppca_latent, sample_ppca
from tests.conftest import assert_close

VALUE_ATOL, GRAD_ATOL = 1e-10, 1e-9
NESTED = StratifiedEstimator(masks="nested")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _brute(table, log_w0, ranks):
    """Entry ``[d, n, k]``: the suffix sum by explicit logsumexps, token by token."""
    S, N, T = table.shape
    D = ranks.shape[0]
    out = torch.zeros(D, N, T, dtype=table.dtype)
    for d in range(D):
        for n in range(N):
            order = ranks[d, n].argsort()
            for k in range(T):
                a = log_w0[:, n] + table[:, n, order[:k]].sum(-1)
                for j in order[k:]:
                    out[d, n, k] += torch.logsumexp(a + table[:, n, j], 0) - torch.logsumexp(a, 0)
    return out


@pytest.mark.parametrize("max_elements", [10**9, 1])  # one chunk; one pair per chunk
def test_suffix_scores_against_brute_force(max_elements):
    S, N, T, D = 7, 3, 6, 2
    g = _gen(0)
    table = torch.randn(S, N, T, generator=g) - 1
    log_w0 = torch.randn(S, N, generator=g)
    ranks = torch.rand(D, N, T, generator=g).argsort(-1)
    out = factorized_suffix_scores(table, log_w0, ranks, max_elements)
    assert out.shape == (D, N, T)
    assert_close(out, _brute(table, log_w0, ranks), atol=VALUE_ATOL)
    # one order shared by the sequences: (D, 1, T)
    shared = factorized_suffix_scores(table, log_w0, ranks[:, :1], max_elements)
    assert_close(shared, _brute(table, log_w0, ranks[:, :1].expand(D, N, T)), atol=VALUE_ATOL)


def test_underflow_returns_none_and_the_engine_scores_rows():
    r"""Observing token 0 puts all weight on particle 0, which gives token 1 a likelihood
    :math:`e^{-2000}` of particle 1's: the product underflows, the row path does not."""
    table = torch.tensor([[[0.0, -2000.0]], [[-2000.0, 0.0]]])  # (S=2, N=1, T=2)
    log_w0 = torch.log(torch.tensor([[0.5], [0.5]]))
    ranks = torch.tensor([[[0, 1]]])
    assert factorized_suffix_scores(table, log_w0, ranks, 10**6) is None

    layout = type("L", (), {"num_sequences": 1, "num_tokens": 2})()
    scorer = ParticleScorer([(slice(0, 2), FactorizedKernel(table))], layout, log_w0)
    kw = dict(num_sequences=1, num_tokens=2, dtype=torch.float64, device="cpu")
    draws, _ = score_masks(scorer, NESTED, 4, generator=_gen(1), **kw)
    assert torch.isfinite(draws).all() and (draws < -500).all()


def _importance():
    X, truth = sample_ppca(5, 6, 2, 0.5, generator=_gen(2))
    W = truth["W"].clone().requires_grad_(True)

    def model(X):
        ppca_latent(X, 2, W, truth["loc"], truth["noise_scale"])

    return model, (X,), {"conditionals": "importance", "num_samples": 64}, W


def _quadrature():
    X, truth = sample_ppca(4, 5, 1, 0.5, generator=_gen(3))
    W = truth["W"].clone().requires_grad_(True)

    def model(X):
        ppca_latent(X, 1, W, truth["loc"], truth["noise_scale"])

    return model, (X,), {"conditionals": "quadrature", "quadrature_points": 12}, W


def _mixture():
    g = _gen(4)
    locs = (1.5 * torch.randn(3, 5, generator=g)).requires_grad_(True)
    X = 1.5 * torch.randn(6, 5, generator=g)
    weights = torch.softmax(torch.randn(3, generator=g), 0)
    opts = {"conditionals": "enumerate"}
    return gaussian_mixture, (X, 3, weights, locs, torch.tensor(0.8)), opts, locs


def _independent():
    g = _gen(5)
    loc = torch.randn(6, generator=g).requires_grad_(True)
    X = torch.randn(4, 6, generator=g)

    def model(X):
        with pyro.plate("sequences", X.shape[0]):
            pyro.sample("x", dist.Normal(loc, 0.7).to_event(1), obs=X)

    return model, (X,), {"conditionals": "gaussian"}, loc


class _Rows:
    """The same scorer, scored by mask rows."""

    def __init__(self, scorer):
        self.scorer = scorer

    def row_cost(self, shared=False):
        return self.scorer.row_cost(shared)

    def row_scores(self, observed, scored):
        return self.scorer.row_scores(observed, scored)


CASES = {"importance": _importance, "quadrature": _quadrature, "mixture": _mixture}
CASES["no latents"] = _independent


@pytest.mark.parametrize("share_masks", [False, True])
@pytest.mark.parametrize("by_size", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_order_path_equals_the_row_path_on_the_same_scorer(case, by_size, share_masks):
    model, args, opts, param = CASES[case]()
    layout, scorer, _ = prepare(model, args, {}, MPTOptions(**opts))
    assert isinstance(scorer, ParticleScorer) and scorer.scores_orders
    N, T, K = layout.num_sequences, layout.num_tokens, 3
    kw = dict(num_sequences=N, num_tokens=T, dtype=torch.float64, device="cpu")
    kw.update(by_size=by_size, share_masks=share_masks)
    calls = []
    original = scorer.suffix_scores
    scorer.suffix_scores = lambda *a: calls.append(1) or original(*a)
    fast, fast_bins = score_masks(scorer, NESTED, K, generator=_gen(6), max_elements=500, **kw)
    assert calls  # the order path ran
    rows, row_bins = score_masks(_Rows(scorer), NESTED, K, generator=_gen(6), **kw)
    assert_close(fast.detach(), rows.detach(), atol=VALUE_ATOL)
    if by_size:
        assert_close(fast_bins.detach(), row_bins.detach(), atol=VALUE_ATOL)
    (g_fast,) = torch.autograd.grad(fast.sum(), param, retain_graph=True)
    (g_rows,) = torch.autograd.grad(rows.sum(), param)
    assert g_fast.abs().max() > 0
    assert_close(g_fast, g_rows, atol=GRAD_ATOL)


def test_gaussian_kernels_and_independent_masks_keep_rows():
    X, truth = sample_ppca(4, 5, 2, 0.5, generator=_gen(7))
    args = (X, 2, truth["W"], truth["loc"], truth["noise_scale"])
    _, scorer, _ = prepare(ppca_collapsed, args, {}, MPTOptions())
    # Gaussian kernels now score orders themselves (pyro_mpt.conditionals.gaussian_orders;
    # their values are tested in tests/test_gaussian_orders.py); independent masks still
    # give no orders, so they keep the rows.
    assert scorer.scores_orders
    ranks = torch.arange(5).expand(1, 4, 5)
    assert scorer.suffix_scores(ranks, 10**6).shape == (1, 4, 5)
    assert StratifiedEstimator().orders(4, 5, 2, device="cpu") is None


@pytest.mark.filterwarnings("ignore:importance conditionals degenerate:UserWarning")
def test_nested_curve_of_an_importance_model_equals_its_row_path():
    """``mpt_curve(masks="nested")`` bins the order path's rows by size exactly as the row
    path bins the same masks (same particles and orders: same global seed)."""
    from pyro_mpt import MPTCurve, mpt_curve

    model, args, opts, _ = _importance()
    pyro.set_rng_seed(11)
    curve = mpt_curve(model, *args, num_masks=3, masks="nested", **opts)
    pyro.set_rng_seed(11)
    with torch.no_grad():
        layout, scorer, _ = prepare(model, args, {}, MPTOptions(**opts))
        kw = dict(num_sequences=layout.num_sequences, num_tokens=layout.num_tokens)
        draws, bins = score_masks(
            _Rows(scorer), NESTED, 3, dtype=torch.float64, device="cpu", by_size=True, **kw
        )
    rows = MPTCurve.from_bins(bins, draws, conditionals="importance", exhaustive=False)
    assert_close(curve.scores, rows.scores, atol=VALUE_ATOL)
    # the curve's area is corrected for the particles' bias as a whole; the bins' is not
    assert_close(curve.area + curve.particle_bias, rows.area, atol=VALUE_ATOL)

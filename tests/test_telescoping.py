r"""The chain estimate by telescoping (:func:`pyro_mpt.engine.telescoped_chain`) against the
row path on the SAME scorer object: for every backend whose conditionals are ratios of its own
evidences, :math:`\sum_k \log p(x_{\pi_k} \mid x_{\pi_{<k}}) = \log p(x_{1..T}) -
\log p(x_\emptyset)` for every order, values to 1e-10 and gradients to 1e-9."""

import pytest
import torch

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals.elimination import EliminationScorer
from pyro_mpt.conditionals.particles import ParticleScorer
from pyro_mpt.engine import MPTOptions, prepare, score, score_masks
from pyro_mpt.estimators import ChainEstimator
from pyro_mpt.models import (
    gaussian_mixture,
    hmm,
    hmm_log_marginal,
    multivariate_normal,
    ppca_collapsed,
    ppca_latent,
    sample_ppca,
)
from tests.conftest import assert_close, sample_hmm_data

VALUE_ATOL, GRAD_ATOL = 1e-10, 1e-9


class _Rows:
    """The same scorer, scored row by row (``telescopes`` False)."""

    telescopes = False

    def __init__(self, scorer):
        self.scorer = scorer

    def row_cost(self, shared=False):
        return self.scorer.row_cost(shared)

    def row_scores(self, observed, scored):
        return self.scorer.row_scores(observed, scored)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ppca(seed, N=5, T=6, K=2):
    X, truth = sample_ppca(N, T, K, 0.5, generator=_gen(seed))
    W = truth["W"].clone().requires_grad_(True)
    return X, K, W, truth


def _gaussian_lowrank():
    X, K, W, truth = _ppca(0)
    return ppca_collapsed, (X, K, W, truth["loc"], truth["noise_scale"]), {}, [W]


def _gaussian_dense():
    g = _gen(1)
    T = 6
    A = torch.randn(T, T, generator=g).requires_grad_(True)
    loc = torch.randn(T, generator=g)
    X = loc + torch.randn(5, T, generator=g)

    def model(X):
        multivariate_normal(X, loc, A @ A.T / T + 0.5 * torch.eye(T))

    return model, (X,), {}, [A]


def _hmm():
    X, init, trans, emit = sample_hmm_data(4, 6, 3, 4, seed=2)
    logits = trans.log().clone().requires_grad_(True)

    def model(X):
        hmm(X, init, logits.softmax(-1), emit)

    return model, (X,), {}, [logits]


def _mixture():
    g = _gen(3)
    weights = torch.softmax(torch.randn(3, generator=g), 0)
    locs = (1.5 * torch.randn(3, 5, generator=g)).requires_grad_(True)
    X = 1.5 * torch.randn(6, 5, generator=g)
    return gaussian_mixture, (X, 3, weights, locs, torch.tensor(0.8)), {}, [locs]


def _importance():
    X, K, W, truth = _ppca(4)

    def model(X):
        ppca_latent(X, K, W, truth["loc"], truth["noise_scale"])

    return model, (X,), {"num_samples": 64}, [W]


def _quadrature():
    X, K, W, truth = _ppca(5, T=5, K=1)

    def model(X):
        ppca_latent(X, K, W, truth["loc"], truth["noise_scale"])

    return model, (X,), {"quadrature_points": 12}, [W]


CASES = {
    "gaussian-lowrank": ("gaussian", _gaussian_lowrank, ParticleScorer),
    "gaussian-dense": ("gaussian", _gaussian_dense, ParticleScorer),
    "enumerate-hmm": ("enumerate", _hmm, EliminationScorer),
    "enumerate-mixture": ("enumerate", _mixture, ParticleScorer),
    "importance": ("importance", _importance, ParticleScorer),
    "quadrature": ("quadrature", _quadrature, ParticleScorer),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_telescoped_chain_equals_the_row_path_on_the_same_scorer(case, monkeypatch):
    conditionals, build, scorer_type = CASES[case]
    model, args, opts, params = build()
    layout, scorer, backend = prepare(
        model, args, {}, MPTOptions(conditionals=conditionals, **opts)
    )
    assert backend.name == conditionals and type(scorer) is scorer_type and scorer.telescopes
    K = 3
    rows, _ = score(layout, _Rows(scorer), ChainEstimator(), K, max_elements=None)
    with monkeypatch.context() as m:  # the telescoped path scores no row
        m.setattr(scorer, "row_scores", lambda *a: pytest.fail("a row was scored"))
        m.setattr(scorer, "__call__", lambda *a: pytest.fail("a row was scored"))
        fast, bins = score(layout, scorer, ChainEstimator(), K, max_elements=None)
    assert bins is None and fast.shape == rows.shape == (K, layout.num_sequences)
    # every draw of the row path (its own random order) equals the telescoped value
    assert_close(fast.detach(), rows.detach(), atol=VALUE_ATOL)
    g_fast = torch.autograd.grad(fast.sum(), params, retain_graph=True)  # shared tables
    g_rows = torch.autograd.grad(rows.sum(), params)
    for a, b in zip(g_fast, g_rows):
        assert a.abs().max() > 0
        assert_close(a, b, atol=GRAD_ATOL)


def test_quadrature_chain_keeps_the_grid_weights_normaliser():
    r"""With a grid :math:`\sum_s w^0_s \ne 1`: the empty evidence is not 0, and the chain is
    :math:`\log p(x_{1..T}) - \operatorname{LSE}_s \log w^0_s` (checked by the row path)."""
    model, args, opts, _ = _quadrature()
    layout, scorer, _ = prepare(model, args, {}, MPTOptions(conditionals="quadrature", **opts))
    N, T = layout.num_sequences, layout.num_tokens
    empty = torch.zeros(1, N, T, dtype=torch.bool)
    normaliser = scorer.log_evidence(empty)[0]
    assert_close(normaliser, torch.logsumexp(scorer.log_w0, 0), atol=1e-12)
    # not 0 (about 3e-7 here): far above VALUE_ATOL, so dropping it would fail the row check
    assert normaliser.abs().min() > 100 * VALUE_ATOL
    fast, _ = score(layout, scorer, ChainEstimator(), 1, max_elements=None)
    assert_close(fast[0], scorer.log_evidence(~empty)[0] - normaliser, atol=1e-12)


def test_hmm_chain_is_the_forward_algorithm_without_rows():
    model, args, _, params = _hmm()
    est = MaskedELBO(estimator="chain", num_masks=2).estimate(model, None, *args)
    X, init, trans, emit = sample_hmm_data(4, 6, 3, 4, seed=2)
    exact = hmm_log_marginal(X, init, params[0].softmax(-1), emit)
    assert est.conditionals == "enumerate"
    assert_close(est.total, exact, atol=1e-10)


def test_by_size_keeps_the_row_path():
    """The curve needs the rows binned by size, so ``by_size`` scores rows even when the
    scorer telescopes; the bins still sum to the telescoped draws."""
    model, args, _, _ = _gaussian_lowrank()
    layout, scorer, _ = prepare(model, args, {}, MPTOptions())
    kw = dict(num_sequences=layout.num_sequences, num_tokens=layout.num_tokens)
    kw.update(dtype=torch.float64, device="cpu")
    fast, _ = score_masks(scorer, ChainEstimator(), 2, **kw)
    rows, bins = score_masks(scorer, ChainEstimator(), 2, by_size=True, **kw)
    assert bins is not None
    assert_close(bins.sum(-1).detach(), fast.detach(), atol=VALUE_ATOL)
    assert_close(rows.detach(), fast.detach(), atol=VALUE_ATOL)

"""Importance and quadrature conditionals in particle chunks under ``max_elements``
(pyro_mpt.conditionals.chunked, issue 11): the chunked scorer equals the unchunked one
(values and gradients, to 1e-12), quadrature with a tiny budget still matches the closed
form, and a budget that cannot hold one particle is refused before anything runs."""

import logging
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals.chunked import CHUNK_FACTOR, ChunkedParticleScorer
from pyro_mpt.conditionals.kernels import FactorizedKernel
from pyro_mpt.conditionals.particles import ParticleScorer
from pyro_mpt.engine import MPTOptions, prepare
from pyro_mpt.models import ppca_latent, ppca_log_marginal, sample_ppca
from pyro_mpt.reference import log_marginal_likelihood
from pyro_mpt.reference.streaming import REFERENCE_CHUNK_FACTOR
from tests.conftest import assert_close

N, T = 12, 6
#: one particle of ppca_latent over N sequences: its largest site is (N, T)
ONE_PARTICLE = CHUNK_FACTOR * N * T


def _ppca(K=1):
    X, truth = sample_ppca(N, T, K, 0.5, generator=torch.Generator().manual_seed(3))
    W = truth["W"].clone().requires_grad_()
    return X, W, (X, K, W, truth["loc"], truth["noise_scale"])


def _scorer(conditionals, args, budget, **opts):
    options = MPTOptions(conditionals=conditionals, max_elements=budget, **opts)
    return prepare(ppca_latent, args, {}, options)[1]


def _masks(R=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    observed = torch.rand(R, N, T, generator=g) < 0.5
    scored = ~observed & (torch.rand(R, N, T, generator=g) < 0.7)
    return observed, scored


def _outputs(scorer, W):
    observed, scored = _masks()
    cond = scorer(observed, scored)
    rows = scorer.row_scores(observed, scored)
    evidence = scorer.log_evidence(observed)
    (grad,) = torch.autograd.grad(cond.sum() + evidence.sum(), W)
    return cond, rows, evidence, grad


def test_importance_chunks_equal_the_same_draws_unchunked():
    """Importance draws in chunks of 3 (budget for 3 particles): every call replays the
    same draws, so the chunked scorer equals one ParticleScorer over all the chunks'
    tables concatenated (the same particles at once), values and gradients to 1e-12."""
    X, W, args = _ppca()
    chunked = _scorer("importance", args, 3 * ONE_PARTICLE, num_samples=16)
    assert isinstance(chunked, ChunkedParticleScorer)
    assert chunked.num_particles == 16 and len(chunked.chunks) == 6  # 3+3+3+3+3+1
    tables = [k.table for c in chunked.chunks for _, k in c.kernels()]
    whole = ParticleScorer(
        [(slice(0, T), FactorizedKernel(torch.cat(tables)))], chunked.layout, chunked.log_w0
    )
    for got, want in zip(_outputs(chunked, W), _outputs(whole, W)):
        assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_quadrature_chunks_equal_unchunked_values_and_gradients():
    """The grid is deterministic: a budget of 4 grid points per chunk gives the same
    conditionals, row sums, evidences and gradients as the whole grid at once."""
    X, W, args = _ppca()
    small = _scorer("quadrature", args, 4 * ONE_PARTICLE, quadrature_points=30)
    big = _scorer("quadrature", args, 2**30, quadrature_points=30)
    assert isinstance(small, ChunkedParticleScorer) and len(small.chunks) == 8
    assert isinstance(big, ParticleScorer)
    for got, want in zip(_outputs(small, W), _outputs(big, W)):
        assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_quadrature_estimates_equal_across_budgets():
    """End to end, stratified estimator with its particle terms: the same seed gives the
    same draws whatever the budget (masks do not depend on it for this estimator)."""
    X, W, args = _ppca()
    out = []
    for budget in (2 * ONE_PARTICLE, 2**30):
        pyro.set_rng_seed(5)
        elbo = MaskedELBO(conditionals="quadrature", max_elements=budget, quadrature_points=25)
        out.append(elbo.estimate(ppca_latent, None, *args).draws.detach())
    assert_close(out[0], out[1], atol=1e-12, rtol=1e-12)


def test_chunked_quadrature_chain_matches_the_closed_form():
    """The chain estimate telescopes to the grid's evidence, which for a 1-D Gaussian latent
    on 400 midpoints over [-8, 8] equals the closed-form PPCA marginal to 1e-8 relative,
    computed in chunks of 7 grid points."""
    X, W, args = _ppca()
    elbo = MaskedELBO(
        estimator="chain",
        conditionals="quadrature",
        quadrature_points=400,
        quadrature_bounds=(-8.0, 8.0),
        max_elements=7 * ONE_PARTICLE,
    )
    with torch.no_grad():
        total = elbo.estimate(ppca_latent, None, *args).total
        exact = ppca_log_marginal(X, W, args[3], args[4])
    assert_close(total, exact, atol=0.0, rtol=1e-8)


def _mixture(X):
    """A two-component shift per sequence (enumerated) plus a Gaussian latent: the
    enumerated support rides in every chunk with its particles."""
    Nx, Tx = X.shape
    W = torch.linspace(-1.0, 1.0, Tx)
    with pyro.plate("data", Nx):
        c = pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = z.unsqueeze(-1) * W + 2.0 * c.unsqueeze(-1)
        pyro.sample("x", dist.Normal(loc, 0.7).to_event(1), obs=X)


def test_enumerated_sites_ride_along_in_chunks():
    """Quadrature over z with c enumerated: chunks of 3 grid points (each with both values
    of c) give the same per-token conditionals as the whole grid."""
    X = torch.randn(N, T, generator=torch.Generator().manual_seed(4))
    layout_budget = CHUNK_FACTOR * 2 * N * T  # the enumerated support doubles a particle
    out = []
    for budget in (3 * layout_budget, 2**30):
        options = MPTOptions(conditionals="quadrature", max_elements=budget, quadrature_points=13)
        scorer = prepare(_mixture, (X,), {}, options)[1]
        observed, scored = _masks()
        out.append((scorer(observed, scored), scorer.log_evidence(observed)))
    assert isinstance(scorer, ParticleScorer)
    for got, want in zip(*out):
        assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("conditionals", ["importance", "quadrature"])
def test_budget_below_one_particle_is_refused_before_running(conditionals):
    X, W, args = _ppca()
    elbo = MaskedELBO(conditionals=conditionals, max_elements=ONE_PARTICLE - 1)
    match = rf"max_elements={ONE_PARTICLE - 1} is too small .* max_elements >= {ONE_PARTICLE}"
    with pytest.raises(ValueError, match=match):
        elbo.estimate(ppca_latent, None, *args)


def test_chunk_size_is_logged(caplog):
    X, W, args = _ppca()
    with caplog.at_level(logging.DEBUG, logger="pyro_mpt"):
        _scorer("importance", args, 5 * ONE_PARTICLE, num_samples=16)
    assert "16 particle(s) in chunks of 5" in caplog.text


@pytest.mark.parametrize("method", ["importance", "quadrature"])
def test_reference_refuses_a_budget_below_one_particle(method):
    """The references stream particles; one particle (REFERENCE_CHUNK_FACTOR times its
    largest tensor of N T elements) above ``max_elements`` cannot be chunked further and
    is refused before drawing; at that budget exactly it runs, one particle per chunk."""
    X, W, args = _ppca()
    need = REFERENCE_CHUNK_FACTOR * N * T
    with pytest.raises(ValueError, match=rf"max_elements={need - 1} is too small.*>= {need}"):
        log_marginal_likelihood(
            ppca_latent, *args, method=method, num_samples=8, max_elements=need - 1
        )
    ests = []
    with warnings.catch_warnings():  # 8 draws are flagged: not the point here
        warnings.simplefilter("ignore")
        for budget in (need, 2**30):
            pyro.set_rng_seed(0)
            ests.append(
                log_marginal_likelihood(
                    ppca_latent, *args, method=method, num_samples=8, max_elements=budget
                )
            )
    if method == "importance":
        assert any("8 chunk(s) of up to 1;" in m for m in ests[0].messages)
    else:  # the grid is deterministic: one point per chunk gives the same sums
        assert_close(ests[0].per_sequence, ests[1].per_sequence, atol=1e-12, rtol=1e-12)


def test_chunked_quadrature_with_enumeration_matches_the_closed_form():
    r"""The mixture's marginal is :math:`\sum_c p(c)\,\mathcal N(x; 2c, w w^\top + 0.49 I)`
    (a dense Gaussian per component, computed here without pyro_mpt); the chain estimate
    with quadrature over z (400 points on [-8, 8], chunks of 9) and c enumerated matches it
    to 1e-8 relative. (A grid with enumerated sites used to fail on its Jacobian.)"""
    X = torch.randn(N, T, generator=torch.Generator().manual_seed(4))
    w = torch.linspace(-1.0, 1.0, T)
    cov = torch.outer(w, w) + 0.49 * torch.eye(T)
    comps = [dist.MultivariateNormal(torch.full((T,), 2.0 * c), cov).log_prob(X) for c in (0, 1)]
    exact = torch.logaddexp(comps[0] + torch.tensor(0.7).log(), comps[1] + torch.tensor(0.3).log())
    elbo = MaskedELBO(
        estimator="chain",
        conditionals="quadrature",
        quadrature_points=400,
        quadrature_bounds=(-8.0, 8.0),
        max_elements=9 * CHUNK_FACTOR * 2 * N * T,
    )
    total = elbo.estimate(_mixture, None, X).total
    assert_close(total, exact.sum(), atol=0.0, rtol=1e-8)


def test_conditional_ess_of_chunked_particles():
    """The degeneracy diagnostic sees every particle of every chunk: the same ESS as the
    whole grid at once."""
    from pyro_mpt.particle_error import conditional_ess

    X, W, args = _ppca()
    small = _scorer("quadrature", args, 4 * ONE_PARTICLE, quadrature_points=30)
    big = _scorer("quadrature", args, 2**30, quadrature_points=30)
    assert_close(conditional_ess(small, small.layout), conditional_ess(big, big.layout), atol=1e-9)


def test_nested_orders_in_chunks_equal_unchunked():
    """Nested masks score whole orders; with the grid in chunks of 4 points the suffix
    sums (and their gradients) equal those of the whole grid, and so does the estimate."""
    X, W, args = _ppca()
    small = _scorer("quadrature", args, 4 * ONE_PARTICLE, quadrature_points=30)
    big = _scorer("quadrature", args, 2**30, quadrature_points=30)
    assert small.scores_orders
    g = torch.Generator().manual_seed(2)
    ranks = torch.rand(3, N, T, generator=g).argsort(-1).argsort(-1)
    got = small.suffix_scores(ranks, max_elements=4 * T * T)  # a few pairs per group
    want = big.suffix_scores(ranks, max_elements=2**30)
    assert_close(got, want, atol=1e-12, rtol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), W)
    (g_want,) = torch.autograd.grad(want.sum(), W)
    assert_close(g_got, g_want, atol=1e-11, rtol=1e-12)
    out = []
    for budget in (4 * ONE_PARTICLE, 2**30):
        pyro.set_rng_seed(6)
        elbo = MaskedELBO(conditionals="quadrature", masks="nested", max_elements=budget)
        out.append(elbo.estimate(ppca_latent, None, *args).draws.detach())
    assert_close(out[0], out[1], atol=1e-12, rtol=1e-12)


def test_training_loss_and_gradient_equal_across_budgets():
    """MaskedELBO's differentiable loss (what SVI steps on) with the grid in chunks of 3
    points: the same loss and gradient in W as the whole grid, to 1e-12 relative."""
    X, W, args = _ppca()
    out = []
    for budget in (3 * ONE_PARTICLE, 2**30):
        pyro.set_rng_seed(7)
        elbo = MaskedELBO(conditionals="quadrature", max_elements=budget, quadrature_points=15)
        loss = elbo.differentiable_loss(ppca_latent, lambda *a, **k: None, *args)
        (grad,) = torch.autograd.grad(loss, W)
        out.append((loss.detach(), grad))
    for got, want in zip(*out):
        assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_enumerated_hmm_evidence_in_chunks_of_items(monkeypatch):
    """Variable elimination (conditionals='enumerate') on an HMM runs its evidence items a
    chunk at a time: with room for one item per chunk the chain estimate still equals the
    forward algorithm (hmm_log_marginal) to 1e-10, and a budget below one item is refused
    before any elimination. (An HMM is scored by its forward-backward by default, which
    chunks sequences too: tests/test_hmm_forward_backward.py; the elimination is forced.)"""
    from pyro_mpt.conditionals.elimination import EVIDENCE_FACTOR, EliminationScorer

    monkeypatch.setattr(EliminationScorer, "_forward_backward", None)
    from pyro_mpt.models import hmm, hmm_log_marginal, sample_hmm
    from tests.conftest import random_hmm_params

    init, trans, emit = random_hmm_params(3, 4, seed=2)
    X = sample_hmm(N, T, init, trans, emit, generator=torch.Generator().manual_seed(8))
    args = (X, init, trans, emit)
    scorer = prepare(hmm, args, {}, MPTOptions(conditionals="enumerate"))[1]
    one_item = EVIDENCE_FACTOR * scorer.item_cost
    elbo = MaskedELBO(estimator="chain", conditionals="enumerate", max_elements=one_item)
    total = elbo.estimate(hmm, None, *args).total
    assert_close(total, hmm_log_marginal(*args), atol=0.0, rtol=1e-10)
    elbo = MaskedELBO(estimator="chain", conditionals="enumerate", max_elements=one_item - 1)
    with pytest.raises(ValueError, match=rf"max_elements={one_item - 1} is too small"):
        elbo.estimate(hmm, None, *args)


def test_particle_error_reweights_chunked_particles():
    """The particle error reweights the particles (groups alone, groups left out) through
    ``log_w0``; on chunked particles it gives the same variance and jackknife bias as on
    the same particles at once, to 1e-9."""
    from pyro_mpt.estimators import get_estimator
    from pyro_mpt.particle_error import particle_error

    X, W, args = _ppca()
    chunked = _scorer("importance", args, 3 * ONE_PARTICLE, num_samples=16)
    tables = [k.table for c in chunked.chunks for _, k in c.kernels()]
    whole = ParticleScorer(
        [(slice(0, T), FactorizedKernel(torch.cat(tables)))], chunked.layout, chunked.log_w0
    )
    out = []
    for scorer in (chunked, whole):
        pyro.set_rng_seed(9)
        out.append(particle_error(scorer, get_estimator("stratified"), scorer.layout))
    assert_close(out[0].variance, out[1].variance, atol=1e-9, rtol=1e-9)
    assert_close(out[0].bias, out[1].bias, atol=1e-9, rtol=1e-9)

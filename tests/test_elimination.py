r"""Tests of :class:`pyro_mpt.conditionals.elimination.EliminationScorer`: exact
:math:`\log p(x_j \mid x_O) = \log p(x_{O+j}) - \log p(x_O)` by variable elimination with
partial evidence (the theory page of the docs, section 2b), checked against the forward algorithm, brute-force path
enumeration and the joint-enumeration backend."""

import itertools

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI
from pyro.ops.indexing import Vindex
from pyro.optim import Adam

from pyro_mpt import MaskedELBO, mpt_curve
from pyro_mpt.conditionals import EnumerateConditionals, ParticleScorer
from pyro_mpt.conditionals.elimination import EliminationScorer
from pyro_mpt.conditionals.particles import particle_trace
from pyro_mpt.estimators import ExhaustiveEstimator
from pyro_mpt.models import (
    gaussian_mixture,
    gaussian_mixture_log_marginal,
    hmm,
    hmm_log_marginal,
)
from pyro_mpt.tokens import read_layout
from tests.conftest import assert_close, random_hmm_params, sample_hmm_data

C, V = 3, 4


def _hmm_params(seed=0):
    return random_hmm_params(C, V, seed)


def _hmm_data(N, T, seed=0):
    return sample_hmm_data(N, T, C, V, seed)


def _scorer(model, X, token_plate=None):
    layout = read_layout(poutine.trace(model).get_trace(X), token_plate=token_plate)
    tr = particle_trace(model, (X,), {}, layout)
    return layout, EliminationScorer(model, (X,), {}, layout, tr)


def _exhaustive_masks(N, T):
    (batch,) = ExhaustiveEstimator().batches(
        N, T, 1, device=None, dtype=torch.float64, max_rows=2**T
    )
    return batch


# ----------------------------------------------------------------------------------------
# HMM (pyro.markov recycles enumeration dims)
# ----------------------------------------------------------------------------------------


def test_hmm_dispatches_to_elimination():
    X, init, trans, emit = _hmm_data(2, 4)
    model = lambda X: hmm(X, init, trans, emit)  # noqa: E731
    layout = read_layout(poutine.trace(model).get_trace(X))
    scorer = EnumerateConditionals().scorer(model, (X,), {}, layout, None)
    assert isinstance(scorer, EliminationScorer)
    # and it answers: the evidence of every token observed is the forward algorithm's
    every = torch.ones(1, *X.shape, dtype=torch.bool)
    forward = torch.stack([hmm_log_marginal(x[None], init, trans, emit) for x in X])
    assert_close(scorer.log_evidence(every)[0], forward, atol=1e-10)


def test_hmm_exhaustive_area_is_forward_lml():
    X, init, trans, emit = _hmm_data(3, 8)
    curve = mpt_curve(lambda X: hmm(X, init, trans, emit), X, exhaustive=True)
    assert curve.conditionals == "enumerate"
    assert_close(curve.area, hmm_log_marginal(X, init, trans, emit), atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hmm_chain_is_forward_lml(seed):
    X, init, trans, emit = _hmm_data(3, 8, seed=seed)
    pyro.set_rng_seed(seed)  # a different random order per seed
    est = MaskedELBO(estimator="chain").estimate(lambda X: hmm(X, init, trans, emit), None, X)
    assert_close(est.total, hmm_log_marginal(X, init, trans, emit), atol=1e-8)


def _brute_log_evidence(x, evidence, init, trans, emit):
    r""":math:`\log \sum_z p(z) \prod_{t \in E} p(x_t \mid z_t)` over all :math:`C^T` paths."""
    T = x.shape[0]
    paths = torch.tensor(list(itertools.product(range(C), repeat=T)))  # (C^T, T)
    lp = init.log()[paths[:, 0]]
    for t in range(1, T):
        lp = lp + trans.log()[paths[:, t - 1], paths[:, t]]
    for t in range(T):
        if evidence[t]:
            lp = lp + emit.log()[paths[:, t], x[t]]
    return torch.logsumexp(lp, 0)


def test_hmm_single_conditionals_brute_force():
    N, T, R = 3, 5, 6
    X, init, trans, emit = _hmm_data(N, T, seed=4)
    _, scorer = _scorer(lambda X: hmm(X, init, trans, emit), X)
    g = torch.Generator().manual_seed(5)
    # Random three-way split per row and sequence: observed, scored (>= 1) or marginalised.
    state = torch.randint(0, 3, (R, N, T), generator=g)
    state[..., 0] = 1  # ensure one scored token per row
    state = torch.gather(state, -1, torch.rand(R, N, T, generator=g).argsort(-1))
    observed, scored = state == 0, state == 1
    out = scorer(observed, scored)
    assert out.shape == (R, N, T)
    expected = torch.zeros(R, N, T)
    for r, n, t in itertools.product(range(R), range(N), range(T)):
        if scored[r, n, t]:
            with_j = observed[r, n].clone()
            with_j[t] = True
            expected[r, n, t] = _brute_log_evidence(
                X[n], with_j, init, trans, emit
            ) - _brute_log_evidence(X[n], observed[r, n], init, trans, emit)
    assert_close(out, expected, atol=1e-10)
    # masks shared by all sequences may come as (R, 1, T)
    shared = scorer(observed[:, :1], scored[:, :1])
    assert_close(
        shared, scorer(observed[:, :1].expand(R, N, T), scored[:, :1].expand(R, N, T)), atol=0
    )


def test_hmm_small_memory_budget_chunks_items():
    N, T = 2, 5
    X, init, trans, emit = _hmm_data(N, T, seed=6)
    model = lambda X: hmm(X, init, trans, emit)  # noqa: E731
    layout, scorer = _scorer(model, X)
    small = EliminationScorer(model, (X,), {}, layout, None, max_elements=7 * scorer.item_cost)
    batch = _exhaustive_masks(N, T)  # 31 rows, up to 186 items: chunks of 7
    assert_close(
        small(batch.observed, batch.scored), scorer(batch.observed, batch.scored), atol=1e-12
    )


def test_hmm_chain_gradients_match_forward_algorithm():
    N, T = 3, 6
    X, init, trans, emit = _hmm_data(N, T, seed=7)
    logits = [p.log().clone().requires_grad_() for p in (init, trans, emit)]

    def params():
        return [torch.softmax(l, -1) for l in logits]

    est = MaskedELBO(estimator="chain").estimate(lambda X: hmm(X, *params()), None, X)
    grads = torch.autograd.grad(est.total, logits)
    lml = hmm_log_marginal(X, *params())
    expected = torch.autograd.grad(lml, logits)
    assert_close(est.total, lml, atol=1e-8)
    for g_est, g_ref in zip(grads, expected):
        assert_close(g_est, g_ref, atol=1e-8)


def _learnable_hmm(X):
    init = pyro.param(
        "init", lambda: torch.full((C,), 1.0 / C), constraint=dist.constraints.simplex
    )
    trans = pyro.param(
        "trans",
        lambda: torch.softmax(torch.randn(C, C), -1),
        constraint=dist.constraints.simplex,
    )
    emit = pyro.param(
        "emit",
        lambda: torch.softmax(torch.randn(C, V), -1),
        constraint=dist.constraints.simplex,
    )
    return hmm(X, init, trans, emit)


def test_hmm_svi_with_masked_elbo():
    X, *_ = _hmm_data(6, 5, seed=8)
    elbo = MaskedELBO(estimator="chain")
    svi = SVI(_learnable_hmm, None, Adam({"lr": 0.05}), loss=elbo)
    losses = [svi.step(X) for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # The chain loss is exactly minus the forward-algorithm LML at the current parameters.
    store = pyro.get_param_store()
    lml = hmm_log_marginal(X, store["init"], store["trans"], store["emit"])
    assert_close(elbo.loss(_learnable_hmm, None, X), -lml.item(), atol=1e-8)


def _gaussian_hmm(X, init, trans, locs, scale):
    """An HMM with vector emissions: x_t | z_t ~ Normal(locs[z_t], scale).to_event(1), so
    every step contributes D event-element tokens."""
    N, T, D = X.shape
    with pyro.plate("sequences", N, dim=-1):
        z = None
        for t in pyro.markov(range(T)):
            probs = init if z is None else Vindex(trans)[z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Normal(Vindex(locs)[z], scale).to_event(1), obs=X[:, t])


def test_hmm_with_event_tokens_exhaustive_and_chain():
    N, T, D = 2, 3, 2
    init, trans, _ = _hmm_params(13)
    g = torch.Generator().manual_seed(14)
    locs = torch.randn(C, D, generator=g)
    scale = torch.tensor(0.7)
    X = torch.randn(N, T, D, generator=g)
    model = lambda X: _gaussian_hmm(X, init, trans, locs, scale)  # noqa: E731
    # forward algorithm
    log_b = dist.Normal(locs, scale).log_prob(X.unsqueeze(-2)).sum(-1)  # (N, T, C)
    alpha = init.log() + log_b[:, 0]
    for t in range(1, T):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + trans.log(), -2) + log_b[:, t]
    lml = torch.logsumexp(alpha, -1).sum()
    curve = mpt_curve(model, X, exhaustive=True)  # 6 tokens: 63 masks
    assert_close(curve.area, lml, atol=1e-8)
    est = MaskedELBO(estimator="chain").estimate(model, None, X)
    assert_close(est.total, lml, atol=1e-8)


# ----------------------------------------------------------------------------------------
# Gaussian mixture: event-element tokens (.to_event) and plate tokens
# ----------------------------------------------------------------------------------------


def _mixture(N=5, D=4, seed=9):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(C, generator=g) + 0.2
    weights = weights / weights.sum()
    locs = 2.0 * torch.randn(C, D, generator=g)
    scale = torch.tensor(0.8)
    c = torch.multinomial(weights, N, replacement=True, generator=g)
    X = locs[c] + scale * torch.randn(N, D, generator=g)
    return X, weights, locs, scale


def test_gaussian_mixture_elimination_matches_joint_enumeration():
    X, weights, locs, scale = _mixture()
    N, D = X.shape
    model = lambda X: gaussian_mixture(X, C, weights, locs, scale)  # noqa: E731
    layout, scorer = _scorer(model, X)
    joint = EnumerateConditionals().scorer(model, (X,), {}, layout, None)
    assert isinstance(joint, ParticleScorer)
    batch = _exhaustive_masks(N, D)
    out = scorer(batch.observed, batch.scored)
    assert_close(out, joint(batch.observed, batch.scored), atol=1e-10)
    area = (out.sum(-1) * batch.weight).sum()
    assert_close(area, gaussian_mixture_log_marginal(X, weights, locs, scale), atol=1e-8)
    # with marginalised tokens too (neither observed nor scored)
    g = torch.Generator().manual_seed(10)
    state = torch.randint(0, 3, (7, N, D), generator=g)
    observed, scored = state == 0, state == 1
    assert_close(scorer(observed, scored), joint(observed, scored), atol=1e-10)


def _plate_mixture(X, weights, locs, scale):
    N, D = X.shape
    with pyro.plate("data", N, dim=-2):
        c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
        with pyro.plate("features", D, dim=-1):
            loc = Vindex(locs)[c, torch.arange(D)]
            pyro.sample("x", dist.Normal(loc, scale), obs=X)


def test_token_plate_mixture_exhaustive():
    X, weights, locs, scale = _mixture(N=4, D=4, seed=11)
    N, D = X.shape
    model = lambda X: _plate_mixture(X, weights, locs, scale)  # noqa: E731
    layout, scorer = _scorer(model, X, token_plate="features")
    batch = _exhaustive_masks(N, D)
    out = scorer(batch.observed, batch.scored)
    area = (out.sum(-1) * batch.weight).sum()
    assert_close(area, gaussian_mixture_log_marginal(X, weights, locs, scale), atol=1e-8)
    # against the closed form log p(x_E) = logsumexp_c(log w_c + sum_{t in E} log N(x_t))
    g = torch.Generator().manual_seed(12)
    state = torch.randint(0, 3, (7, N, D), generator=g)
    observed, scored = state == 0, state == 1
    comp = dist.Normal(locs, scale).log_prob(X.unsqueeze(-2))  # (N, C, D)

    def log_evidence(E):  # E: (R, N, D) -> (R, N)
        return torch.logsumexp(weights.log() + (comp * E.unsqueeze(-2)).sum(-1), -1)

    eye = torch.eye(D, dtype=torch.bool)
    with_j = observed.unsqueeze(-2) | eye  # (R, N, D_j, D)
    expected = torch.stack([log_evidence(with_j[..., j, :]) for j in range(D)], -1)
    expected = torch.where(scored, expected - log_evidence(observed).unsqueeze(-1), 0.0)
    assert_close(scorer(observed, scored), expected, atol=1e-10)


def test_rejects_unmaskable_gaussian_site():
    X, weights, locs, scale = _mixture(N=3, D=3)

    def model(X):
        with pyro.plate("data", X.shape[0]):
            c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
            cov = torch.eye(X.shape[1]) * scale**2
            pyro.sample("x", dist.MultivariateNormal(locs[c], cov), obs=X)

    layout = read_layout(poutine.trace(model).get_trace(X))
    with pytest.raises(ValueError, match="cannot be masked"):
        EliminationScorer(model, (X,), {}, layout, None)


# ----------------------------------------------------------------------------------------
# The two exact routes: probes (one elimination + backward per conditioning set) and
# differences of partial-evidence log-likelihoods agree, in value and in gradient
# ----------------------------------------------------------------------------------------


def _routes_agree(model, X, params, token_plate=None, seed=21):
    layout, scorer = _scorer(model, X, token_plate)
    N, T = layout.num_sequences, layout.num_tokens
    g = torch.Generator().manual_seed(seed)
    state = torch.randint(0, 3, (6, N, T), generator=g)
    observed, scored = state == 0, state == 1  # some tokens marginalised
    results = {}
    for route in ("probe", "differences"):
        scorer.route = route
        out = scorer(observed, scored)
        grads = torch.autograd.grad(out.sum(), params)
        results[route] = (out.detach(), grads)
    (out_p, grads_p), (out_d, grads_d) = results["probe"], results["differences"]
    assert_close(out_p, out_d, atol=1e-10)
    for gp, gd in zip(grads_p, grads_d):
        assert_close(gp, gd, atol=1e-9)


def test_routes_agree_on_hmm():
    X, init, trans, emit = _hmm_data(3, 6, seed=5)
    trans = trans.clone().requires_grad_()
    emit = emit.clone().requires_grad_()
    _routes_agree(lambda X: hmm(X, init, trans, emit), X, (trans, emit))


def test_routes_agree_on_event_tokens():
    X, weights, locs, scale = _mixture(N=4, D=4, seed=3)
    locs = locs.clone().requires_grad_()
    _routes_agree(lambda X: gaussian_mixture(X, C, weights, locs, scale), X, (locs,))


def test_routes_agree_on_plate_tokens():
    X, weights, locs, scale = _mixture(N=4, D=4, seed=4)
    locs = locs.clone().requires_grad_()
    _routes_agree(
        lambda X: _plate_mixture(X, weights, locs, scale), X, (locs,), token_plate="features"
    )


def test_probe_route_exhaustive_area_is_forward_lml():
    X, init, trans, emit = _hmm_data(2, 6, seed=8)
    layout, scorer = _scorer(lambda X: hmm(X, init, trans, emit), X)
    scorer.route = "probe"
    batch = _exhaustive_masks(2, 6)
    with torch.no_grad():
        area = (scorer(batch.observed, batch.scored).sum(-1) * batch.weight).sum()
    assert_close(area, hmm_log_marginal(X, init, trans, emit), atol=1e-8)


def test_integer_data_take_the_dtype_of_their_log_densities():
    """Symbols are integers: the estimate's dtype is that of the model's log-densities
    (float64 parameters under a float32 default dtype)."""
    X, init, trans, emit = _hmm_data(3, 5, seed=2)  # float64 parameters (fixture default)
    torch.set_default_dtype(torch.float32)  # the autouse fixture restores it
    curve = mpt_curve(lambda X: hmm(X, init, trans, emit), X, exhaustive=True)
    assert curve.area.dtype == torch.float64
    assert_close(curve.area, hmm_log_marginal(X, init, trans, emit), atol=1e-8)

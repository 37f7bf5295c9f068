r"""Tests of :mod:`pyro_mpt.conditionals.forward_backward`: the scaled forward-backward that
scores every masked token of a ``pyro.markov`` chain at once, against ``TraceEnum_ELBO``
with an empty guide (:math:`\log p(x_{O \cup \{j\}}) - \log p(x_O)`, the evidence set by
``poutine.mask``), brute-force paths, the forward algorithm and the elimination routes it
replaces."""

import itertools

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.ops.indexing import Vindex

from pyro_mpt import MaskedELBO, mpt_curve
from pyro_mpt.conditionals import EnumerateConditionals
from pyro_mpt.conditionals.elimination import EliminationScorer
from pyro_mpt.conditionals.forward_backward import MarkovChain
from pyro_mpt.models import hmm, hmm_log_marginal
from pyro_mpt.tokens import read_layout
from tests.conftest import assert_close, random_hmm_params, requires_cuda, sample_hmm_data

C, V, D = 3, 4, 2


def _scorer(model, args, token_plate=None, max_elements=None):
    layout = read_layout(poutine.trace(model).get_trace(*args), token_plate=token_plate)
    return EnumerateConditionals(max_elements).scorer(model, args, {}, layout, None)


def _splits(R, N, T, seed):
    """Random three-way splits per row and sequence: observed, scored (>= 1 per row) or
    marginalised."""
    g = torch.Generator().manual_seed(seed)
    state = torch.randint(0, 3, (R, N, T), generator=g)
    state[..., 0] = 1
    state = torch.gather(state, -1, torch.rand(R, N, T, generator=g).argsort(-1))
    return state == 0, state == 1


# ----------------------------------------------------------------------------------------
# Models as Pyro users write them, each with an ``evidence`` mask for TraceEnum_ELBO
# ----------------------------------------------------------------------------------------


def hmm_evidence(data, init, trans, emit, evidence):
    """``pyro_mpt.models.hmm`` with the tokens outside ``evidence`` (N, T) masked out."""
    N, T = data.shape
    with pyro.plate("sequences", N, dim=-1):
        z = None
        for t in pyro.markov(range(T)):
            probs = init if z is None else Vindex(trans)[z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            with poutine.mask(mask=evidence[:, t]):
                pyro.sample(f"x_{t}", dist.Categorical(Vindex(emit)[z]), obs=data[:, t])


def tones_hmm(sequences, lengths, probs_x, probs_y, evidence=None):
    """Pyro's polyphonic-music HMM, vectorised over sequences (examples/hmm.py style): a
    hidden state per time step, a Bernoulli per tone, ragged lengths by ``poutine.mask``."""
    N, T, tones = sequences.shape
    tones_plate = pyro.plate("tones", tones, dim=-1)
    with pyro.plate("sequences", N, dim=-2):
        x = 0
        for t in pyro.markov(range(T)):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(
                    f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"}
                )
                with tones_plate:
                    y = dist.Bernoulli(probs_y[x.squeeze(-1)])
                    if evidence is None:
                        pyro.sample(f"y_{t}", y, obs=sequences[:, t])
                    else:
                        with poutine.mask(mask=evidence[:, t]):
                            pyro.sample(f"y_{t}", y, obs=sequences[:, t])


def ar_tones_hmm(sequences, lengths, probs_x, probs_y):
    """Pyro's arHMM (examples/hmm.py style): each tone also depends on its previous
    observed value, ``probs_y[x, y, tones]``."""
    N, T, tones = sequences.shape
    tones_plate = pyro.plate("tones", tones, dim=-1)
    with pyro.plate("sequences", N, dim=-2):
        x, y = 0, 0
        for t in pyro.markov(range(T)):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(
                    f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"}
                )
                with tones_plate as k:
                    y = pyro.sample(
                        f"y_{t}", dist.Bernoulli(probs_y[x, y, k]), obs=sequences[:, t]
                    ).long()


def test_autoregressive_tones_equal_the_elimination():
    """Observed parents (the previous tone) enter each step's emission as a fixed value:
    the chain is still one state per step, scored as the elimination scores it."""
    seqs, lengths, px, _ = _tones_data(seed=25)
    py = torch.sigmoid(torch.randn(C, 2, D, generator=torch.Generator().manual_seed(26)))
    scorer = _scorer(lambda s, n: ar_tones_hmm(s, n, px, py), (seqs, lengths), "tones")
    assert scorer.chain is not None
    observed, scored = _splits(3, 3, 4 * D, seed=27)
    observed, scored = observed & scorer.layout.present, scored & scorer.layout.present
    fast = scorer(observed, scored)
    scorer.route = "differences"
    assert_close(fast, scorer(observed, scored), atol=1e-10)


def hmm_missing(data, present, init, trans, emit):
    """An HMM with missing symbols marked by ``obs_mask`` (Pyro imputes them)."""
    N, T = data.shape
    with pyro.plate("sequences", N, dim=-1):
        z = None
        for t in pyro.markov(range(T)):
            probs = init if z is None else Vindex(trans)[z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            x = dist.Categorical(Vindex(emit)[z])
            pyro.sample(f"x_{t}", x, obs=data[:, t], obs_mask=present[:, t])


def test_obs_mask_missing_symbols_equal_the_elimination():
    """The imputed sites of ``obs_mask`` are no factors; the missing symbols are absent."""
    X, init, trans, emit = sample_hmm_data(3, 5, C, V, seed=28)
    present = torch.rand(3, 5, generator=torch.Generator().manual_seed(29)) < 0.7
    model = lambda X, p: hmm_missing(X, p, init, trans, emit)  # noqa: E731
    scorer = _scorer(model, (X, present))
    assert scorer.chain is not None and (scorer.layout.present == present).all()
    observed, scored = _splits(4, 3, 5, seed=30)
    observed, scored = observed & present, scored & present
    fast = scorer(observed, scored)
    scorer.route = "differences"
    assert_close(fast, scorer(observed, scored), atol=1e-10)


def _tones_data(N=3, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs_x = torch.softmax(torch.randn(C, C, generator=g), -1)  # row 0: the initial state
    probs_y = torch.sigmoid(torch.randn(C, D, generator=g))
    seqs = torch.bernoulli(torch.full((N, T, D), 0.4), generator=g)
    lengths = torch.tensor([T, T - 1, T - 2][:N])
    return seqs, lengths, probs_x, probs_y


def _enum_log_evidence(model, *args, evidence, plates=1):
    """``log p(x_E)`` of one sequence by TraceEnum_ELBO with an empty guide."""
    elbo = TraceEnum_ELBO(max_plate_nesting=plates)
    return -elbo.loss(model, lambda *a, **k: None, *args, evidence=evidence)


# ----------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------


def test_chains_dispatch_to_forward_backward():
    X, init, trans, emit = sample_hmm_data(2, 5, C, V)
    scorer = _scorer(lambda X: hmm(X, init, trans, emit), (X,))
    assert isinstance(scorer, EliminationScorer) and isinstance(scorer.chain, MarkovChain)
    assert scorer.chain.trans.shape[0] == 4 and scorer.chain.emission.shape == (2, 5, C)
    seqs, lengths, px, py = _tones_data()
    scorer = _scorer(lambda s, n: tones_hmm(s, n, px, py), (seqs, lengths), "tones")
    assert isinstance(scorer.chain, MarkovChain)
    assert scorer.chain.step.tolist() == [t for t in range(4) for _ in range(D)]


def factorial_hmm(data, init, trans, emit):
    """Two hidden chains, each token depends on both: no single chain."""
    N, T = data.shape
    with pyro.plate("sequences", N, dim=-1):
        a = b = None
        for t in pyro.markov(range(T)):
            a = pyro.sample(
                f"a_{t}",
                dist.Categorical(init if a is None else Vindex(trans)[a]),
                infer={"enumerate": "parallel"},
            )
            b = pyro.sample(
                f"b_{t}",
                dist.Categorical(init if b is None else Vindex(trans)[b]),
                infer={"enumerate": "parallel"},
            )
            pyro.sample(f"x_{t}", dist.Categorical(Vindex(emit)[(a + b) % C]), obs=data[:, t])


def second_order_emissions(data, init, trans, emit):
    """Each token depends on the current and the previous state: not one state per token."""
    N, T = data.shape
    with pyro.plate("sequences", N, dim=-1):
        z = prev = None
        for t in pyro.markov(range(T), history=2):
            probs = init if z is None else Vindex(trans)[z]
            prev, z = (
                z,
                pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"}),
            )
            state = z if prev is None else (z + prev) % C
            pyro.sample(f"x_{t}", dist.Categorical(Vindex(emit)[state]), obs=data[:, t])


@pytest.mark.parametrize("model", [factorial_hmm, second_order_emissions])
def test_other_structures_keep_variable_elimination(model):
    X, init, trans, emit = sample_hmm_data(2, 4, C, V)
    scorer = _scorer(lambda X: model(X, init, trans, emit), (X,))
    assert isinstance(scorer, EliminationScorer) and scorer.chain is None
    observed, scored = _splits(2, 2, 4, seed=1)
    scorer(observed, scored)  # scored by elimination, as before
    scorer.route = "forward_backward"
    with pytest.raises(ValueError, match="route='forward_backward' needs"):
        scorer(observed, scored)


# ----------------------------------------------------------------------------------------
# Values: TraceEnum_ELBO, brute force, the forward algorithm
# ----------------------------------------------------------------------------------------


def test_hmm_conditionals_equal_trace_enum_differences():
    N, T, R = 2, 6, 3
    X, init, trans, emit = sample_hmm_data(N, T, C, V, seed=2)
    scorer = _scorer(lambda X: hmm(X, init, trans, emit), (X,))
    observed, scored = _splits(R, N, T, seed=3)
    out = scorer(observed, scored)
    expected = torch.zeros(R, N, T)
    for r, n in itertools.product(range(R), range(N)):
        x, obs = X[n : n + 1], observed[r, n : n + 1]
        base = _enum_log_evidence(hmm_evidence, x, init, trans, emit, evidence=obs)
        for j in scored[r, n].nonzero().flatten().tolist():
            with_j = obs.clone()
            with_j[0, j] = True
            lp = _enum_log_evidence(hmm_evidence, x, init, trans, emit, evidence=with_j)
            expected[r, n, j] = lp - base
    assert_close(out, expected, atol=1e-9)


def test_tones_conditionals_equal_trace_enum_differences():
    """Several tokens per state (a plate of tones), ragged lengths."""
    seqs, lengths, px, py = _tones_data(seed=4)
    N, T, _ = seqs.shape
    scorer = _scorer(lambda s, n: tones_hmm(s, n, px, py), (seqs, lengths), "tones")
    present = scorer.layout.present  # (N, T * D): t < length
    observed, scored = _splits(2, N, T * D, seed=5)
    observed, scored = observed & present, scored & present
    out = scorer(observed, scored)
    for r, n in itertools.product(range(2), range(N)):
        args = (seqs[n : n + 1], lengths[n : n + 1], px, py)
        obs = observed[r, n].reshape(1, T, D)
        base = _enum_log_evidence(tones_hmm, *args, evidence=obs, plates=2)
        for j in scored[r, n].nonzero().flatten().tolist():
            with_j = obs.clone().reshape(1, -1)
            with_j[0, j] = True
            lp = _enum_log_evidence(tones_hmm, *args, evidence=with_j.reshape(1, T, D), plates=2)
            assert_close(out[r, n, j], lp - base, atol=1e-9)
    assert (out[~scored] == 0).all()


def _brute_log_p(x, init, trans, emit):
    """log p(x) over all C^T state paths."""
    T = x.shape[0]
    paths = torch.tensor(list(itertools.product(range(C), repeat=T)))
    lp = init.log()[paths[:, 0]] + emit.log()[paths[:, 0], x[0]]
    for t in range(1, T):
        lp = lp + trans.log()[paths[:, t - 1], paths[:, t]] + emit.log()[paths[:, t], x[t]]
    return torch.logsumexp(lp, 0)


def test_identities_exhaustive_area_and_chain_are_the_lml():
    X, init, trans, emit = sample_hmm_data(2, 7, C, V, seed=6)
    model = lambda X: hmm(X, init, trans, emit)  # noqa: E731
    exact = sum(_brute_log_p(x, init, trans, emit) for x in X)
    assert_close(mpt_curve(model, X, exhaustive=True).area, exact, atol=1e-9)
    assert_close(-MaskedELBO(estimator="chain").loss(model, None, X), exact, atol=1e-9)
    # the chain rule scored row by row (no telescoping): a random order sums to the LML
    scorer = _scorer(model, (X,))
    ranks = torch.rand(2, 7, generator=torch.Generator().manual_seed(6)).argsort(-1).argsort(-1)
    k = torch.arange(7).view(7, 1, 1)
    rows = scorer(ranks < k, ranks == k)  # row k: the first k tokens observed, the next scored
    assert_close(rows.sum(), exact, atol=1e-9)


def single_sequence_hmm(x, init, trans, emit):
    """One sequence, no plate: the whole model is the sequence."""
    z = None
    for t in pyro.markov(range(x.shape[0])):
        probs = init if z is None else Vindex(trans)[z]
        z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
        pyro.sample(f"x_{t}", dist.Categorical(Vindex(emit)[z]), obs=x[t])


def test_single_sequence_without_plate():
    X, init, trans, emit = sample_hmm_data(1, 6, C, V, seed=33)
    model = lambda x: single_sequence_hmm(x, init, trans, emit)  # noqa: E731
    assert _scorer(model, (X[0],)).chain is not None
    curve = mpt_curve(model, X[0], exhaustive=True)
    assert_close(curve.area, _brute_log_p(X[0], init, trans, emit), atol=1e-9)


def test_tones_exhaustive_area_is_trace_enum_lml():
    seqs, lengths, px, py = _tones_data(N=2, T=4, seed=7)
    model = lambda s, n: tones_hmm(s, n, px, py)  # noqa: E731
    every = torch.ones(2, 4, D, dtype=torch.bool)
    exact = _enum_log_evidence(tones_hmm, seqs, lengths, px, py, evidence=every, plates=2)
    curve = mpt_curve(model, seqs, lengths, exhaustive=True, token_plate="tones")
    assert_close(curve.area, exact, atol=1e-9)


def test_long_sharp_chain_does_not_underflow():
    """T = 3000 steps of near-deterministic emissions: p(x) ~ e^-3000 underflows any
    unscaled recursion; the scaled one matches the log-space forward algorithm."""
    init, trans, emit = random_hmm_params(C, V, seed=8)
    emit = torch.softmax(8 * torch.randn(C, V, generator=torch.Generator().manual_seed(9)), -1)
    X = sample_hmm_data(1, 3000, C, V, seed=8)[0]
    scorer = _scorer(lambda X: hmm(X, init, trans, emit), (X,))
    every = torch.ones(1, 1, 3000, dtype=torch.bool)
    forward = hmm_log_marginal(X, init, trans, emit)
    assert forward < -1000
    assert_close(scorer.log_evidence(every)[0, 0], forward, atol=1e-8, rtol=1e-12)


def vector_hmm(data, init, trans, locs, scale):
    """An HMM whose every step emits a vector, ``Normal(locs[z], scale).to_event(1)``: its
    elements are the tokens, many per state."""
    N, T, _ = data.shape
    with pyro.plate("sequences", N, dim=-1):
        z = None
        for t in pyro.markov(range(T)):
            probs = init if z is None else Vindex(trans)[z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Normal(Vindex(locs)[z], scale).to_event(1), obs=data[:, t])


def test_steps_far_below_exp_range_are_shifted():
    """Steps of 40 sharp Gaussian tokens, each about -200 nats under every state: a step's
    likelihood (about e^-8000) underflows unless shifted; the conditionals equal the
    log-space elimination's and the evidence TraceEnum_ELBO's."""
    init, trans, _ = random_hmm_params(C, V, seed=19)
    g = torch.Generator().manual_seed(20)
    locs = torch.randn(C, 40, generator=g)
    X = locs[torch.randint(0, C, (2, 3), generator=g)] + 1.0  # (N, T, 40), 1 off every mean
    model = lambda X: vector_hmm(X, init, trans, locs, 0.05)  # noqa: E731
    scorer = _scorer(model, (X,))
    assert scorer.chain is not None and scorer.chain.num_steps == 3
    every = torch.ones(1, 2, 120, dtype=torch.bool)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    exact = -elbo.loss(model, lambda *a: None, X)
    assert exact < -40000
    assert_close(scorer.log_evidence(every).sum(), exact, atol=1e-6, rtol=1e-12)
    observed, scored = _splits(3, 2, 120, seed=21)
    fast = scorer(observed, scored)
    scorer.route = "differences"
    assert_close(fast, scorer(observed, scored), atol=1e-7, rtol=1e-12)


def test_float32_conditionals_follow_float64():
    """Single precision (a GPU's usual dtype) over 200 steps: the scaled recursions keep
    every conditional within 1e-4 of float64."""
    X, init, trans, emit = sample_hmm_data(4, 200, C, V, seed=31)
    observed, scored = _splits(3, 4, 200, seed=32)
    want = _scorer(lambda X: hmm(X, init, trans, emit), (X,))(observed, scored)
    params = [p.float() for p in (init, trans, emit)]
    scorer = _scorer(lambda X: hmm(X, *params), (X,))
    got = scorer(observed, scored)
    assert got.dtype == torch.float32
    assert_close(got, want, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Gradients: the same as the elimination routes'
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, ragged",
    [("probe", False), ("differences", True), ("probe", True)],
)
def test_gradients_equal_the_elimination_routes(route, ragged):
    seqs, lengths, px, py = _tones_data(seed=10)
    lengths = lengths if ragged else torch.full_like(lengths, seqs.shape[1])
    logits_x = px.log().clone().requires_grad_()
    logits_y = torch.logit(py).clone().requires_grad_()

    def model(s, n):
        tones_hmm(s, n, logits_x.softmax(-1), logits_y.sigmoid())

    scorer = _scorer(model, (seqs, lengths), "tones")
    observed, scored = _splits(4, 3, 4 * D, seed=11)
    if ragged:
        observed, scored = observed & scorer.layout.present, scored & scorer.layout.present
    weight = torch.rand(4, 3, 4 * D, generator=torch.Generator().manual_seed(12))
    fast = scorer(observed, scored)
    g_fast = torch.autograd.grad((fast * weight).sum(), [logits_x, logits_y])
    scorer.route = route
    old = scorer(observed, scored)
    g_old = torch.autograd.grad((old * weight).sum(), [logits_x, logits_y])
    assert_close(fast, old, atol=1e-10)
    for a, b in zip(g_fast, g_old):
        assert a.abs().max() > 1e-3
        assert_close(a, b, atol=1e-8)


def test_masked_elbo_gradients_match_the_old_route(monkeypatch):
    """One default MaskedELBO step (stratified): the same loss and gradients whichever
    route scores the same masks."""
    X, init, trans, emit = sample_hmm_data(3, 6, C, V, seed=13)
    logits = trans.log().clone().requires_grad_()
    model = lambda X: hmm(X, init, logits.softmax(-1), emit)  # noqa: E731
    original = EliminationScorer.__init__
    losses, grads = [], []
    for route in ["auto", "probe"]:

        def init_with_route(self, *args, _route=route, **kwargs):
            original(self, *args, **kwargs)
            self.route = _route

        monkeypatch.setattr(EliminationScorer, "__init__", init_with_route)
        pyro.set_rng_seed(14)  # the same masks for both routes
        loss = MaskedELBO().differentiable_loss(model, None, X)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, logits)[0])
    assert_close(losses[0], losses[1], atol=1e-9)
    assert grads[0].abs().max() > 1e-3
    assert_close(grads[0], grads[1], atol=1e-8)


def per_sequence_hmm(data, init, trans, emit):
    """Each sequence its own transition matrix (``trans`` (N, C, C)), by ``Vindex``."""
    N, T = data.shape
    with pyro.plate("sequences", N, dim=-1) as n:
        z = None
        for t in pyro.markov(range(T)):
            probs = init if z is None else Vindex(trans)[n, z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Categorical(Vindex(emit)[z]), obs=data[:, t])


def test_transitions_are_shared_only_when_every_sequence_reads_the_same_parameters():
    """A plate-expanded matrix is one table (one matrix product per step); per-sequence
    matrices, even equal ones (distinct parameters), stay per sequence, and each gets its
    own gradient, as the elimination's."""
    X, init, trans, emit = sample_hmm_data(3, 5, C, V, seed=23)
    shared = _scorer(lambda X: hmm(X, init, trans, emit), (X,))
    assert shared.chain.trans.shape == (4, 1, C, C) and shared.chain.init.shape == (1, C)
    logits = trans.log().expand(3, C, C).clone().requires_grad_()  # equal values, 3 leaves
    scorer = _scorer(lambda X: per_sequence_hmm(X, init, logits.softmax(-1), emit), (X,))
    assert scorer.chain.trans.shape == (4, 3, C, C)
    observed, scored = _splits(4, 3, 5, seed=24)
    weight = torch.arange(3.0).view(1, 3, 1) + 1  # sequences weigh differently
    fast = scorer(observed, scored)
    (g_fast,) = torch.autograd.grad((fast * weight).sum(), logits)
    scorer.route = "differences"
    (g_old,) = torch.autograd.grad((scorer(observed, scored) * weight).sum(), logits)
    assert not torch.allclose(g_fast[0], g_fast[1], atol=1e-3)
    assert_close(g_fast, g_old, atol=1e-8)


# ----------------------------------------------------------------------------------------
# Memory budget, devices
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows_per_budget", [2, 0.7, 0.34])
def test_rows_and_sequences_are_chunked_under_max_elements(rows_per_budget):
    """A budget of 2 rows: chunks of 2 rows; of 0.7 rows: 2 sequences, then 1; of a third
    of a row: one sequence at a time."""
    X, init, trans, emit = sample_hmm_data(3, 6, C, V, seed=15)
    model = lambda X: hmm(X, init, trans, emit)  # noqa: E731
    big = _scorer(model, (X,))
    one_row = big.chain.row_cost()
    small = _scorer(model, (X,), max_elements=int(rows_per_budget * one_row))
    assert small.row_cost() == one_row
    observed, scored = _splits(7, 3, 6, seed=16)
    assert_close(small(observed, scored), big(observed, scored), atol=1e-12)
    assert_close(small.log_evidence(observed), big.log_evidence(observed), atol=1e-12)


def test_a_budget_below_one_row_of_one_sequence_is_refused():
    X, init, trans, emit = sample_hmm_data(3, 6, C, V, seed=15)
    model = lambda X: hmm(X, init, trans, emit)  # noqa: E731
    unit = _scorer(model, (X,)).chain.row_cost() // 3
    tiny = _scorer(model, (X,), max_elements=unit - 1)
    observed, scored = _splits(2, 3, 6, seed=16)
    with pytest.raises(ValueError, match=rf"max_elements={unit - 1} is too small.*>= {unit}"):
        tiny(observed, scored)


@requires_cuda
def test_forward_backward_on_cuda_matches_cpu():
    X, init, trans, emit = sample_hmm_data(2, 6, C, V, seed=17)
    observed, scored = _splits(3, 2, 6, seed=18)
    cpu = _scorer(lambda X: hmm(X, init, trans, emit), (X,))(observed, scored)
    params = [p.cuda() for p in (init, trans, emit)]
    gpu = _scorer(lambda X: hmm(X, *params), (X.cuda(),))
    assert gpu.chain is not None
    assert_close(gpu(observed.cuda(), scored.cuda()).cpu(), cpu, atol=1e-10)

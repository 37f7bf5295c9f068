"""DiscreteHMM observed sites (:mod:`pyro_mpt.conditionals.hmm_sites`): the tokens are the
time steps; checked against ``DiscreteHMM.log_prob`` and forward algorithms written here."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals import get_conditionals
from pyro_mpt.reference import log_marginal_likelihood
from pyro_mpt.tokens import read_layout

F64 = torch.float64
C, V, N, T = 3, 4, 2, 5
_G = torch.Generator().manual_seed(7)
INIT = torch.randn(C, generator=_G, dtype=F64)
TRANS_T = torch.randn(T, C, C, generator=_G, dtype=F64)  # heterogeneous in time
EMIT = torch.randn(C, V, generator=_G, dtype=F64)
SYMBOLS = torch.randint(V, (N, T), generator=_G)


def symbol_hmm(data):
    """Categorical emissions (integer data), a transition matrix per step."""
    hmm = dist.DiscreteHMM(INIT, TRANS_T, dist.Categorical(logits=EMIT))
    with pyro.plate("seqs", data.shape[0]):
        pyro.sample("obs", hmm, obs=data)


def _evidence_by_forward(x, observed):
    """log p(x_O), Pyro's convention (z_{-1} ~ init, then a transition into each step)."""
    init = INIT.log_softmax(-1)
    trans = TRANS_T.log_softmax(-1)
    emit = EMIT.log_softmax(-1)[:, x].T  # (T, C)
    emit = torch.where(observed.unsqueeze(-1), emit, 0.0)
    alpha = init
    for t in range(len(x)):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + trans[t], -2) + emit[t]
    return torch.logsumexp(alpha, -1)


def _scorer(model, data):
    trace = pyro.poutine.trace(model).get_trace(data)
    layout = read_layout(trace)
    return layout, get_conditionals("auto", layout).scorer(model, (data,), {}, layout, trace)


def test_layout_reads_time_steps_as_tokens():
    layout, _ = _scorer(symbol_hmm, SYMBOLS)
    assert (layout.num_sequences, layout.num_tokens, layout.sites[0].kind) == (N, T, "hmm")


def test_symbol_conditionals_against_forward_algorithm():
    """Every (observed, scored) pair of masks of a 5-step sequence, to 1e-10."""
    _, scorer = _scorer(symbol_hmm, SYMBOLS)
    masks = torch.tensor(list(itertools.product([False, True], repeat=T)))  # (32, T)
    observed = masks.unsqueeze(1).expand(-1, N, -1)
    got = scorer(observed, ~observed)
    for r, o in enumerate(masks):
        for n in range(N):
            base = _evidence_by_forward(SYMBOLS[n], o)
            for j in torch.nonzero(~o).flatten().tolist():
                with_j = o.clone()
                with_j[j] = True
                want = _evidence_by_forward(SYMBOLS[n], with_j) - base
                assert float(got[r, n, j]) == pytest.approx(float(want), abs=1e-10)


def test_reference_and_chain_are_log_prob_and_gradients_agree():
    """The exact reference is DiscreteHMM.log_prob; the chain telescopes to it, and its
    gradient in a parameter equals the gradient of log_prob."""
    loc = torch.tensor([-1.0, 0.0, 1.0], dtype=F64, requires_grad=True)
    x = torch.randn(N, T, generator=_G, dtype=F64)

    def model(data):
        hmm = dist.DiscreteHMM(INIT, TRANS_T, dist.Normal(loc, 1.0))
        with pyro.plate("seqs", data.shape[0]):
            pyro.sample("obs", hmm, obs=data)

    exact = dist.DiscreteHMM(INIT, TRANS_T, dist.Normal(loc, 1.0)).log_prob(x).sum()
    ref = log_marginal_likelihood(model, x)
    assert ref.method == "exact"
    assert float(ref.total.detach()) == pytest.approx(float(exact.detach()), rel=1e-12)
    chain = MaskedELBO(estimator="chain", num_masks=2).estimate(model, None, x).total
    assert float(chain.detach()) == pytest.approx(float(exact.detach()), rel=1e-10)
    (g_chain,) = torch.autograd.grad(chain, loc)
    (g_exact,) = torch.autograd.grad(exact, loc)
    assert torch.allclose(g_chain, g_exact, atol=1e-9)


def test_vector_emissions_are_one_token_per_step():
    """Normal(...).to_event(1) emissions: a step of 2 values is one token."""
    locs = torch.randn(C, 2, generator=_G, dtype=F64)
    x = torch.randn(N, T, 2, generator=_G, dtype=F64)

    def model(data):
        hmm = dist.DiscreteHMM(INIT, TRANS_T, dist.Normal(locs, 1.0).to_event(1))
        with pyro.plate("seqs", data.shape[0]):
            pyro.sample("obs", hmm, obs=data)

    layout, scorer = _scorer(model, x)
    assert layout.num_tokens == T
    hmm = dist.DiscreteHMM(INIT, TRANS_T, dist.Normal(locs, 1.0).to_event(1))
    everything = torch.ones(1, N, T, dtype=torch.bool)
    assert torch.allclose(scorer.log_evidence(everything)[0], hmm.log_prob(x), atol=1e-10)
    # dropping the last step is the log_prob of the shorter sequence
    head = everything.clone()
    head[..., -1] = False
    short = dist.DiscreteHMM(INIT, TRANS_T[:-1], dist.Normal(locs, 1.0).to_event(1))
    assert torch.allclose(scorer.log_evidence(head)[0], short.log_prob(x[:, :-1]), atol=1e-10)


def test_particles_mix_the_site_over_latent_draws():
    """A continuous per-sequence latent shifting the emission means: "importance" draws it and
    the DiscreteHMM kernel scores each draw; the evidence is logmeanexp of log_prob."""
    x = torch.randn(N, T, generator=_G, dtype=F64)

    def model(data):
        with pyro.plate("seqs", data.shape[0]):
            shift = pyro.sample("shift", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
            locs = torch.tensor([-1.0, 0.0, 1.0], dtype=F64) + shift.unsqueeze(-1)
            pyro.sample(
                "obs",
                dist.DiscreteHMM(INIT, TRANS_T, dist.Normal(locs.unsqueeze(-2), 1.0)),
                obs=data,
            )

    pyro.set_rng_seed(0)
    trace = pyro.poutine.trace(model).get_trace(x)
    layout = read_layout(trace)
    backend = get_conditionals("auto", layout, num_samples=6)
    assert backend.name == "importance"
    pyro.set_rng_seed(0)
    scorer = backend.scorer(model, (x,), {}, layout, trace)
    pyro.set_rng_seed(0)
    tr = pyro.poutine.trace(pyro.plate("_mpt_particles", 6, dim=-2)(model)).get_trace(x)
    shifts = tr.nodes["shift"]["value"].reshape(6, N)
    locs = torch.tensor([-1.0, 0.0, 1.0], dtype=F64) + shifts.unsqueeze(-1)  # (6, N, C)
    lp = dist.DiscreteHMM(INIT, TRANS_T, dist.Normal(locs.unsqueeze(-2), 1.0)).log_prob(x)
    want = torch.logsumexp(lp, 0) - math.log(6)
    got = scorer.log_evidence(torch.ones(1, N, T, dtype=torch.bool))[0]
    assert torch.allclose(got, want, atol=1e-10)


def test_mixture_of_discrete_hmms_is_exact():
    """An enumerated class per sequence picks the chain's parameters: the enumerated support
    is particles for the DiscreteHMM kernel; the reference, the chain and the exhaustive
    estimate all equal :math:`\\sum_n \\log \\sum_k w_k\\, \\mathrm{HMM}_k(x_n)` to 1e-10."""
    from pyro.ops.indexing import Vindex

    weights = torch.tensor([0.3, 0.7], dtype=F64)
    inits = torch.randn(2, C, generator=_G, dtype=F64)
    trans = torch.randn(2, C, C, generator=_G, dtype=F64)
    locs = torch.tensor([-2.0, 0.0, 2.0], dtype=F64)
    x = torch.randn(N, 4, generator=_G, dtype=F64)

    def model(data):
        with pyro.plate("seqs", data.shape[0]):
            k = pyro.sample("k", dist.Categorical(weights), infer={"enumerate": "parallel"})
            # unsqueeze: a (C, C) matrix per class, not one per time step
            hmm = dist.DiscreteHMM(
                Vindex(inits)[k], Vindex(trans)[k].unsqueeze(-3), dist.Normal(locs, 1.0)
            )
            pyro.sample("obs", hmm, obs=data)

    per_class = torch.stack(
        [dist.DiscreteHMM(inits[j], trans[j], dist.Normal(locs, 1.0)).log_prob(x) for j in range(2)]
    )
    exact = float((per_class + weights.log().unsqueeze(-1)).logsumexp(0).sum())
    ref = log_marginal_likelihood(model, x)
    assert ref.method == "exact" and float(ref.total) == pytest.approx(exact, rel=1e-10)
    for estimator in ("chain", "exhaustive"):
        est = MaskedELBO(estimator=estimator, num_masks=2).estimate(model, None, x)
        assert est.conditionals == "enumerate"
        assert float(est.total.detach()) == pytest.approx(exact, rel=1e-10)


def test_quadrature_over_a_latent_shift_of_the_emissions():
    """A per-sequence Normal shift of the emission means integrated on a grid: the
    quadrature reference and the quadrature chain agree with a 20000-point midpoint rule of
    DiscreteHMM.log_prob to 1e-6 (relative)."""
    x = torch.randn(N, T, generator=_G, dtype=F64)
    base = torch.tensor([-2.0, 0.0, 2.0], dtype=F64)

    def model(data):
        with pyro.plate("seqs", data.shape[0]):
            shift = pyro.sample("shift", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
            locs = (base + shift.unsqueeze(-1)).unsqueeze(-2)
            pyro.sample("obs", dist.DiscreteHMM(INIT, TRANS_T, dist.Normal(locs, 1.0)), obs=data)

    edges = torch.linspace(-8.0, 8.0, 20001, dtype=F64)
    mid, width = (edges[1:] + edges[:-1]) / 2, edges[1] - edges[0]
    locs = (base + mid.view(-1, 1, 1)).unsqueeze(-2)
    lp = dist.DiscreteHMM(INIT, TRANS_T, dist.Normal(locs, 1.0)).log_prob(x)  # (G, N)
    prior = dist.Normal(0.0, 1.0).log_prob(mid).unsqueeze(-1) + width.log()
    exact = float(torch.logsumexp(lp + prior, 0).sum())
    ref = log_marginal_likelihood(model, x, method="quadrature", quadrature_points=200)
    assert float(ref.total) == pytest.approx(exact, rel=1e-6)
    elbo = MaskedELBO(estimator="chain", conditionals="quadrature", quadrature_points=200)
    assert float(elbo.estimate(model, None, x).total.detach()) == pytest.approx(exact, rel=1e-6)

"""Mixed latents: continuous latents by prior draws, enumerated ones summed out for each draw
(:mod:`pyro_mpt.conditionals.mixed`), checked against per-draw forward algorithms written
here."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.indexing import Vindex

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals import ImportanceConditionals, MixedConditionals, get_conditionals
from pyro_mpt.tokens import read_layout

F64 = torch.float64
C, N, T = 2, 2, 4
INIT = torch.tensor([0.6, 0.4], dtype=F64)
TRANS = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=F64)
LOCS = torch.tensor([-1.0, 1.0], dtype=F64)
X = torch.tensor([[-1.2, -0.3, 0.9, 1.4], [0.4, 1.1, -0.8, -1.5]], dtype=F64)


def noisy_hmm(x):
    """An HMM (pyro.markov, Vindex) whose emission scale is a per-sequence continuous latent."""
    with pyro.plate("seqs", x.shape[0]):
        scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=F64), 0.5))
        z = None
        for t in pyro.markov(range(x.shape[1])):
            probs = INIT if z is None else Vindex(TRANS)[z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Normal(Vindex(LOCS)[z], scale), obs=x[:, t])


def _layout(model, *args, **kwargs):
    trace = pyro.poutine.trace(model).get_trace(*args)
    return read_layout(trace, **kwargs), trace


def _forward(x, scale, observed):
    """log p(x_O | scale) of one sequence by the forward algorithm (unobserved steps give 1)."""
    emit = torch.where(
        observed.unsqueeze(-1), dist.Normal(LOCS, scale).log_prob(x.unsqueeze(-1)), 0.0
    )
    alpha = INIT.log() + emit[0]
    for t in range(1, len(x)):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + TRANS.log(), -2) + emit[t]
    return torch.logsumexp(alpha, -1)


def test_auto_picks_mixed_and_it_mixes_per_draw_forward_algorithms():
    """log p̂(x_O) = logmeanexp_s log p(x_O | scale_s) for any evidence set, to 1e-10, and
    each conditional is the difference of two such evidences."""
    pyro.set_rng_seed(0)
    layout, trace = _layout(noisy_hmm, X)
    backend = get_conditionals("auto", layout, num_samples=7)
    assert isinstance(backend, MixedConditionals) and backend.num_samples == 7
    scorer = backend.scorer(noisy_hmm, (X,), {}, layout, trace)
    scales = scorer.values["scale"].reshape(7, N)
    observed = torch.tensor([[True, False, True, False], [False, True, True, True]])

    def mixture(obs):
        per = torch.stack(
            [
                torch.stack([_forward(X[n], scales[s, n], obs[n]) for n in range(N)])
                for s in range(7)
            ]
        )
        return torch.logsumexp(per, 0) - math.log(7)

    got = scorer.log_evidence(observed.unsqueeze(0))[0]
    assert torch.allclose(got, mixture(observed), atol=1e-10)
    scored = torch.tensor([[False, True, False, False], [True, False, False, False]])
    cond = scorer(observed.unsqueeze(0), scored.unsqueeze(0))[0]
    want = mixture(observed | scored) - mixture(observed)
    assert torch.allclose(cond[scored], want, atol=1e-10)
    assert torch.all(cond[~scored] == 0)


def test_mixed_chain_telescopes_to_the_particle_evidence():
    pyro.set_rng_seed(1)
    with torch.no_grad():
        est = MaskedELBO(estimator="chain", num_masks=3, num_samples=64).estimate(
            noisy_hmm, None, X
        )
    assert est.conditionals == "mixed"
    # every chain draw telescopes to the same log p̂(x) of the step's draws
    assert float(est.draws.std(0).max()) < 1e-9


def test_mixed_estimate_is_differentiable_in_params():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.3, dtype=F64))
        with pyro.plate("seqs", x.shape[0]):
            shift = pyro.sample("shift", dist.Normal(loc, 1.0))
            z = None
            for t in pyro.markov(range(x.shape[1])):
                probs = INIT if z is None else Vindex(TRANS)[z]
                z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
                pyro.sample(f"x_{t}", dist.Normal(Vindex(LOCS)[z] + shift, 1.0), obs=x[:, t])

    pyro.clear_param_store()
    pyro.set_rng_seed(2)
    est = MaskedELBO(num_masks=2, num_samples=16).estimate(model, None, X)
    (grad,) = torch.autograd.grad(est.total, [pyro.param("loc").unconstrained()])
    assert torch.isfinite(grad) and grad.abs() > 0
    pyro.clear_param_store()


def test_importance_refuses_a_markov_chain_it_would_get_wrong():
    layout, trace = _layout(noisy_hmm, X)
    with pytest.raises(ValueError, match="pyro.markov recycles their enumeration dims.*'mixed'"):
        ImportanceConditionals(8).scorer(noisy_hmm, (X,), {}, layout, trace)


def test_importance_refuses_per_token_enumerated_sites():
    def gmm(data):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=F64), 2.0).to_event(1))
        with pyro.plate("data", len(data)):
            a = pyro.sample(
                "a", dist.Categorical(torch.ones(2, dtype=F64) / 2), infer={"enumerate": "parallel"}
            )
            pyro.sample("obs", dist.Normal(Vindex(locs)[..., a], 0.5), obs=data)

    data = X[0]
    layout, trace = _layout(gmm, data, token_plate="data")
    with pytest.raises(ValueError, match="'a' sits inside token_plate 'data'.*'mixed'"):
        ImportanceConditionals(8).scorer(gmm, (data,), {}, layout, trace)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "many"])
def test_mixed_options_are_checked(bad):
    with pytest.raises((ValueError, TypeError), match="num_samples"):
        MixedConditionals(num_samples=bad)


def test_mixed_by_name_takes_its_options():
    layout, _ = _layout(noisy_hmm, X)
    backend = get_conditionals("mixed", layout, num_samples=5, max_elements=1000)
    assert (backend.num_samples, backend.max_elements) == (5, 1000)
    assert repr(backend) == "MixedConditionals(num_samples=5)"


def per_sequence_mixture(x):
    """One enumerated class per sequence, then a continuous latent given it."""
    with pyro.plate("seqs", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(INIT), infer={"enumerate": "parallel"})
        mu = pyro.sample("mu", dist.Normal(Vindex(LOCS)[z], 1.0))
        pyro.sample("x", dist.Normal(mu.unsqueeze(-1), 1.0).to_event(1), obs=x)


def test_mixed_enumerates_jointly_where_that_is_exact():
    """One enumerated value per sequence with a dim of its own: the draws and the support
    are particles jointly (the importance scorer, same particles, same values)."""
    from pyro_mpt.conditionals import ParticleScorer

    layout, trace = _layout(per_sequence_mixture, X)
    everything = torch.ones(1, N, T, dtype=torch.bool)
    pyro.set_rng_seed(4)
    mixed = MixedConditionals(32).scorer(per_sequence_mixture, (X,), {}, layout, trace)
    pyro.set_rng_seed(4)
    imp = ImportanceConditionals(32).scorer(per_sequence_mixture, (X,), {}, layout, trace)
    assert isinstance(mixed, ParticleScorer)
    assert torch.equal(mixed.log_evidence(everything), imp.log_evidence(everything))


def test_mixed_refuses_a_continuous_latent_that_depends_on_an_eliminated_chain():
    def model(x):
        with pyro.plate("seqs", x.shape[0]):
            z = None
            for t in pyro.markov(range(x.shape[1])):
                probs = INIT if z is None else Vindex(TRANS)[z]
                z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
                if t == 0:
                    scale = pyro.sample("scale", dist.LogNormal(Vindex(LOCS)[z], 0.5))
                pyro.sample(f"x_{t}", dist.Normal(Vindex(LOCS)[z], scale), obs=x[:, t])

    layout, trace = _layout(model, X)
    with pytest.raises(
        ValueError, match="latent site 'scale' is continuous and depends on enumerated"
    ):
        MixedConditionals(8).scorer(model, (X,), {}, layout, trace)


def test_report_says_mixed_conditionals_carry_a_particle_error():
    import warnings

    from pyro_mpt import evaluate

    pyro.set_rng_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small reference: its diagnostics may warn
        report = evaluate(noisy_hmm, X, mpt_samples=64, reference_samples=2000, num_masks=2)
    assert "mixed" in str(report)
    assert "s.e. of mixed conditionals covers the masks' randomness only" in str(report)


def test_probe_route_equals_differences_in_value_and_gradient():
    """The mixed scorer's one-elimination probe route and its differences of evidences give
    the same conditionals for every mask of a 4-token sequence (1e-10), and the same
    gradient in a parameter of the model."""
    import itertools

    from pyro_mpt.conditionals.mixed import MixedEliminationScorer
    from pyro_mpt.conditionals.particles import particle_trace

    shift = torch.tensor(0.2, dtype=F64, requires_grad=True)

    def model(x):
        with pyro.plate("seqs", x.shape[0]):
            scale = pyro.sample("scale", dist.LogNormal(shift, 0.5))
            z = None
            for t in pyro.markov(range(x.shape[1])):
                probs = INIT if z is None else Vindex(TRANS)[z]
                z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
                pyro.sample(f"x_{t}", dist.Normal(Vindex(LOCS)[z] + shift, scale), obs=x[:, t])

    layout, _ = _layout(model, X)
    pyro.set_rng_seed(6)
    drawn = particle_trace(model, (X,), {}, layout, num_particles=9)
    values = {"scale": drawn.nodes["scale"]["value"]}
    scorer = MixedEliminationScorer(model, (X,), {}, layout, values, 9, drawn)
    masks = torch.tensor(list(itertools.product([False, True], repeat=T)))
    observed = masks.unsqueeze(1).expand(-1, N, -1)
    results = {}
    for route in ("probe", "differences"):
        scorer.route = route
        out = scorer(observed, ~observed)
        (grad,) = torch.autograd.grad(out.sum(), shift, retain_graph=True)
        results[route] = (out.detach(), grad)
    assert torch.allclose(results["probe"][0], results["differences"][0], atol=1e-10)
    assert torch.allclose(results["probe"][1], results["differences"][1], atol=1e-8)

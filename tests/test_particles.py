r"""Tests of :mod:`pyro_mpt.conditionals.particles`: the particle trace, the flattening of its
tensors to ``(S, N, ...)`` and the particle mixture, each against a hand computation:

.. math::
    a_s = \log w^0_s + \sum_{t \in O} l_{s,t}, \qquad
    \log p(x_j \mid x_O) = \operatorname{logsumexp}_s(a_s + l_{s,j})
    - \operatorname{logsumexp}_s a_s .
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_mpt.conditionals import base, particles, sites
from pyro_mpt.conditionals.kernels import FactorizedKernel
from pyro_mpt.conditionals.particles import (
    ParticleScorer,
    PerTokenLatent,
    combine_log_weights,
    enumerated_dims,
    flatten_particles,
    latent_log_prob,
    particle_shape,
    particle_trace,
)
from pyro_mpt.tokens import read_layout
from tests.conftest import assert_close

N, T, C, S = 3, 4, 2, 5


def _mixture_model():
    """c_n ~ Categorical(pi) (enumerated), z_n ~ N(0, 1), x_n | c, z ~ N(mu_c + z_n, 1)^T."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    locs = torch.randn(C, T, generator=gen, dtype=torch.float64)
    X = torch.randn(N, T, generator=gen, dtype=torch.float64)

    def model(X):
        with pyro.plate("data", X.shape[0]):
            c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
            pyro.sample("x", dist.Normal(locs[c] + z.unsqueeze(-1), 1.0).to_event(1), obs=X)

    layout = read_layout(poutine.trace(model).get_trace(X))
    return model, X, weights, locs, layout


def test_particle_trace_shapes_and_flattened_values():
    """With S particles and C enumerated values the particle dim sits left of the data
    plate and the enumeration dim left of that: c is (C, 1, 1), z is (S, N); flattened,
    row c * S + s holds (c, z[s])."""
    model, X, weights, _, layout = _mixture_model()
    pyro.set_rng_seed(1)
    tr = particle_trace(model, (X,), {}, layout, num_particles=S)
    c, z = tr.nodes["c"]["value"], tr.nodes["z"]["value"]
    assert c.shape == (C, 1, 1) and z.shape == (S, N)
    assert enumerated_dims(tr) == {"c": -3}
    lead = particle_shape([(c, 0), (z, 0)], layout.max_plate_nesting)
    assert lead == (C, S)
    flat_c = flatten_particles(c, layout, lead, 0)
    flat_z = flatten_particles(z, layout, lead, 0)
    assert flat_c.shape == flat_z.shape == (C * S, N)
    for k in range(C):
        for s in range(S):
            assert (flat_c[k * S + s] == k).all()
            assert_close(flat_z[k * S + s], z[s], atol=0.0)

    (lp_c,) = latent_log_prob(tr, ["c"], layout)
    log_w0 = combine_log_weights([(lp_c, 0)], layout, lead, base=-math.log(S))
    want = (weights.log() - math.log(S)).repeat_interleave(S).unsqueeze(-1).expand(C * S, N)
    assert_close(log_w0, want, atol=1e-12)


def test_particle_trace_sets_given_values():
    """``values`` (the quadrature grid) put particle s's value in every sequence."""
    model, X, _, _, layout = _mixture_model()
    grid = torch.linspace(-1.0, 1.0, S, dtype=torch.float64)
    tr = particle_trace(model, (X,), {}, layout, num_particles=S, values={"z": grid})
    assert_close(tr.nodes["z"]["value"], grid.unsqueeze(-1).expand(S, N), atol=0.0)


def test_particle_scorer_is_the_weighted_mixture():
    """Conditionals and evidence of :class:`ParticleScorer` equal the mixture formula of
    the module docstring, computed here by hand with explicit sums over particles."""
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(S, N, T, generator=gen, dtype=torch.float64)
    log_w0 = torch.log_softmax(torch.randn(S, N, generator=gen, dtype=torch.float64), 0)
    layout = type("L", (), {"num_sequences": N})()
    scorer = ParticleScorer([(slice(0, T), FactorizedKernel(table))], layout, log_w0)
    observed = torch.rand(3, N, T, generator=gen) < 0.5
    scored = ~observed
    out, evidence = scorer(observed, scored), scorer.log_evidence(observed)
    assert scorer.num_particles == S
    for r in range(3):
        for n in range(N):
            a = [
                float(log_w0[s, n])
                + sum(float(table[s, n, t]) for t in range(T) if observed[r, n, t])
                for s in range(S)
            ]
            norm = math.log(sum(math.exp(v) for v in a))
            assert math.isclose(float(evidence[r, n]), norm, abs_tol=1e-12)
            for j in range(T):
                want = 0.0
                if scored[r, n, j]:
                    num = sum(math.exp(a[s] + float(table[s, n, j])) for s in range(S))
                    want = math.log(num) - norm
                assert math.isclose(float(out[r, n, j]), want, abs_tol=1e-12)
    assert_close(scorer.row_scores(observed, scored), out.sum(-1), atol=1e-12)


def test_latent_inside_token_plate_is_per_token():
    """A latent that varies along the token plate cannot be a per-sequence particle."""
    X = torch.randn(N, T, dtype=torch.float64)

    def model(X):
        with pyro.plate("tokens", T, dim=-1), pyro.plate("data", N, dim=-2):
            w = pyro.sample("w", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))
            pyro.sample("x", dist.Normal(w, 1.0), obs=X)

    layout = read_layout(poutine.trace(model).get_trace(X), token_plate="tokens")
    tr = particle_trace(model, (X,), {}, layout, num_particles=S)
    with pytest.raises(PerTokenLatent, match="'w' sits inside token_plate 'tokens'") as info:
        latent_log_prob(tr, ["w"], layout)
    assert info.value.site == "w"


def test_moved_names_stay_importable_from_base():
    """``pyro_mpt.conditionals.base`` re-exports what moved to particles.py, sites.py and
    options.py: the very same objects."""
    from pyro_mpt import options

    assert base.ParticleScorer is particles.ParticleScorer
    assert base.particle_trace is particles.particle_trace
    assert base.build_kernels is sites.build_kernels
    assert base.site_token_log_probs is sites.site_token_log_probs
    assert base.resolve_max_elements is options.resolve_max_elements
    assert base.DEFAULT_MAX_ELEMENTS == options.DEFAULT_MAX_ELEMENTS == 2**24
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        base.nothing  # noqa: B018

"""Zoo: Gaussian mixtures as in Pyro's GMM tutorial (``Vindex``-indexed component means, the
assignment enumerated in ``pyro.plate("data")``): with fixed means and weights (exact,
checked against TraceEnum_ELBO with an empty guide) and with latent Dirichlet weights and
Normal means (mixed latents: the globals by prior draws, the assignments summed out for each
draw), checked against a brute-force sum over all assignments with the means integrated in
closed form."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.indexing import Vindex

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals import MixedConditionals, get_conditionals
from pyro_mpt.tokens import read_layout

from .common import ZooCase, check_case, run_case, trace_enum_exact

K, SCALE, PRIOR_SCALE = 2, 0.5, 2.0
DATA = torch.tensor([-2.1, -1.7, 0.2, 1.9, 2.4, 2.2], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
LOCS = torch.tensor([-2.0, 2.0], dtype=torch.float64)


def gmm_fixed(data):
    with pyro.plate("data", len(data)):
        assignment = pyro.sample(
            "assignment", dist.Categorical(WEIGHTS), infer={"enumerate": "parallel"}
        )
        pyro.sample("obs", dist.Normal(Vindex(LOCS)[..., assignment], SCALE), obs=data)


def gmm_latent(data):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(K, dtype=data.dtype)))
    locs = pyro.sample(
        "locs", dist.Normal(torch.zeros(K, dtype=data.dtype), PRIOR_SCALE).to_event(1)
    )
    with pyro.plate("data", len(data)):
        assignment = pyro.sample(
            "assignment", dist.Categorical(weights), infer={"enumerate": "parallel"}
        )
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., assignment], SCALE), obs=data)


def gmm_latent_exact(data=DATA):
    r"""Sum over the :math:`K^N` assignments :math:`z`: the Dirichlet(1)-multinomial
    :math:`p(z)` times the Gaussian :math:`p(x \mid z)` with the means integrated out,
    :math:`\mathcal N(0, \sigma^2 I + \tau^2 [z_i = z_j])`."""
    N, terms = len(data), []
    for z in itertools.product(range(K), repeat=N):
        z = torch.tensor(z)
        n = torch.bincount(z, minlength=K).to(data.dtype)
        log_pz = math.lgamma(K) - math.lgamma(N + K) + float(torch.lgamma(n + 1).sum())
        same = (z.unsqueeze(0) == z.unsqueeze(1)).to(data.dtype)
        cov = SCALE**2 * torch.eye(N, dtype=data.dtype) + PRIOR_SCALE**2 * same
        zero = torch.zeros(N, dtype=data.dtype)
        terms.append(log_pz + torch.distributions.MultivariateNormal(zero, cov).log_prob(data))
    return float(torch.logsumexp(torch.stack(terms), 0))


CASES = [
    ZooCase(
        "GMM, fixed means",
        gmm_fixed,
        (DATA,),
        lambda: trace_enum_exact(gmm_fixed, (DATA,), 1),
        "exact",
    ),
    ZooCase(
        "GMM, latent means",
        gmm_latent,
        (DATA,),
        gmm_latent_exact,
        "importance",
        {"token_plate": "data"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mixture_zoo(case):
    check_case(case, run_case(case))


def _layout(model, *args, **kwargs):
    trace = pyro.poutine.trace(model).get_trace(*args)
    return read_layout(trace, **kwargs)


def test_auto_picks_mixed_for_continuous_globals_and_enumerated_locals():
    layout = _layout(gmm_latent, DATA, token_plate="data")
    assert isinstance(get_conditionals("auto", layout), MixedConditionals)


def test_mixed_chain_is_consistent():
    """The mixed chain telescopes to :math:`\\log \\hat p(x)` from S particles: over 8
    seeds its mean is within 4 standard errors (of that mean) of the exact value, plus the
    O(1/S) bias of a log of a mean, bounded by var/(2S) of the particle weights."""
    draws = []
    for seed in range(8):
        pyro.set_rng_seed(seed)
        elbo = MaskedELBO(estimator="chain", num_masks=1, num_samples=2000, token_plate="data")
        with torch.no_grad():
            draws.append(float(elbo.estimate(gmm_latent, None, DATA).total))
    draws = torch.tensor(draws)
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - gmm_latent_exact()) < 4 * se + 0.05


def test_mixed_conditionals_by_hand():
    """With S particles the mixed conditional is the weighted mixture of the exact
    per-particle conditionals; recomputed here from the particle values by brute force."""
    pyro.set_rng_seed(3)
    layout = _layout(gmm_latent, DATA, token_plate="data")
    backend = MixedConditionals(num_samples=5)
    trace = pyro.poutine.trace(gmm_latent).get_trace(DATA)
    scorer = backend.scorer(gmm_latent, (DATA,), {}, layout, trace)
    w, mu = scorer.values["weights"].reshape(5, K), scorer.values["locs"].reshape(5, K)
    # per particle and token: log p(x_t | theta_s) = log sum_k w_k N(x_t; mu_k, sigma)
    lik = torch.logsumexp(
        w.log().unsqueeze(1) + dist.Normal(mu.unsqueeze(1), SCALE).log_prob(DATA.view(1, -1, 1)),
        -1,
    )  # (S, T)
    observed = torch.tensor([[[True, False, True, False, False, False]]])
    scored = torch.tensor([[[False, True, False, False, True, False]]])
    a = (lik * observed[0, 0]).sum(-1)  # (S,)
    want = torch.logsumexp(a.unsqueeze(-1) + lik, 0) - torch.logsumexp(a, 0)
    got = scorer(observed, scored)[0, 0]
    assert torch.allclose(got[scored[0, 0]], want[scored[0, 0]], rtol=1e-10, atol=1e-10)
    assert torch.all(got[~scored[0, 0]] == 0)

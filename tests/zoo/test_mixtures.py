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
from pyro_mpt.conditionals import MixedConditionals, ParticleScorer, get_conditionals
from pyro_mpt.conditionals.mixed import MixedEliminationScorer
from pyro_mpt.conditionals.particles import particle_trace
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


def _layout(model, *args, **kwargs):
    trace = pyro.poutine.trace(model).get_trace(*args)
    return read_layout(trace, **kwargs)


def test_auto_picks_mixed_for_continuous_globals_and_enumerated_locals():
    layout = _layout(gmm_latent, DATA, token_plate="data")
    assert isinstance(get_conditionals("auto", layout), MixedConditionals)


def _mixed_chain_draws(num_seeds, num_samples):
    draws = []
    for seed in range(num_seeds):
        pyro.set_rng_seed(seed)
        elbo = MaskedELBO(
            estimator="chain", num_masks=1, num_samples=num_samples, token_plate="data"
        )
        with torch.no_grad():
            draws.append(float(elbo.estimate(gmm_latent, None, DATA).total))
    return torch.tensor(draws)


@pytest.mark.slow
def test_mixed_chain_is_consistent():
    """The mixed chain telescopes to :math:`\\log \\hat p(x)` from S particles: over 16
    seeds its mean is within 4 standard errors (of that mean) of the exact value, plus 0.05
    for the O(1/S) downward bias of the log of a mean of S = 4000 weights."""
    draws = _mixed_chain_draws(16, 4000)
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - gmm_latent_exact()) < 4 * se + 0.05


def test_mixed_chain_is_close():
    """The fast version: 3 seeds of S = 1000 draws, each within 0.5 nat of the exact value
    (their spread is about 0.1; an elimination that dropped or double-counted one data
    point's evidence would be off by more than 1 nat)."""
    draws = _mixed_chain_draws(3, 1000)
    assert (draws - gmm_latent_exact()).abs().max() < 0.5


def _both_routes(model, data, token_plate, num_samples):
    """The mixed scorer "auto" builds (the per-token fast route here) and the elimination
    route, over the same draws."""
    layout = _layout(model, data, token_plate=token_plate)
    trace = pyro.poutine.trace(model).get_trace(data)
    pyro.set_rng_seed(3)
    fast = MixedConditionals(num_samples).scorer(model, (data,), {}, layout, trace)
    pyro.set_rng_seed(3)
    drawn = particle_trace(model, (data,), {}, layout, num_particles=num_samples)
    values = {n: drawn.nodes[n]["value"] for n in layout.latents if n not in layout.enumerated}
    slow = MixedEliminationScorer(model, (data,), {}, layout, values, num_samples, drawn)
    return layout, fast, slow


@pytest.mark.parametrize("name", ["gmm", "lda"])
def test_per_token_route_equals_elimination(name):
    """Per-token enumerated sites summed out token by token (a factorized table over the
    draws) give the conditionals and evidences of elimination over the same draws, for
    every mask of a few shapes, to 1e-10."""
    model, data, plate = {"gmm": (gmm_latent, DATA, "data"), "lda": (lda, WORDS, "words")}[name]
    layout, fast, slow = _both_routes(model, data, plate, 20)
    assert isinstance(fast, ParticleScorer) and fast.scores_orders
    T, N = layout.num_tokens, layout.num_sequences
    masks = torch.tensor(list(itertools.product([False, True], repeat=T)))
    observed = masks.unsqueeze(1).expand(-1, N, -1)
    assert torch.allclose(fast(observed, ~observed), slow(observed, ~observed), atol=1e-10)
    assert torch.allclose(fast.log_evidence(observed), slow.log_evidence(observed), atol=1e-10)


def test_mixed_conditionals_by_hand():
    """With S particles the mixed conditional is the weighted mixture of the exact
    per-particle conditionals; recomputed here from the particle values by brute force."""
    _, _, scorer = _both_routes(gmm_latent, DATA, "data", 5)
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


# ---------------------------------------------------------------------------------------
# A small LDA (Pyro's examples/lda.py layout: documents plate dim -1, words plate dim -2)
# ---------------------------------------------------------------------------------------

NUM_TOPICS, VOCAB = 2, 4
TOPIC_WORDS = torch.tensor([[0.6, 0.3, 0.05, 0.05], [0.05, 0.05, 0.3, 0.6]], dtype=torch.float64)
DOC_ALPHA = torch.tensor([0.8, 0.8], dtype=torch.float64)
WORDS = torch.tensor([[0, 3, 1], [1, 2, 3], [0, 3, 0], [1, 2, 3], [0, 1, 2]])  # (words, docs)


def lda(data):
    """LDA with the topics fixed (as after training them): per document, topic proportions
    ``doc_topics`` (continuous) and per word an enumerated topic."""
    num_words, num_docs = data.shape
    with pyro.plate("documents", num_docs, dim=-1):
        doc_topics = pyro.sample("doc_topics", dist.Dirichlet(DOC_ALPHA))
        with pyro.plate("words", num_words, dim=-2):
            word_topics = pyro.sample(
                "word_topics", dist.Categorical(doc_topics), infer={"enumerate": "parallel"}
            )
            pyro.sample("doc_words", dist.Categorical(TOPIC_WORDS[word_topics]), obs=data)


def lda_exact(data=WORDS):
    r"""Per document, a sum over the :math:`K^L` topic assignments of the
    Dirichlet-multinomial :math:`p(z)` times :math:`\prod_i \phi_{z_i, w_i}`."""
    a = DOC_ALPHA
    total = 0.0
    for doc in data.T:
        terms = []
        for z in itertools.product(range(NUM_TOPICS), repeat=len(doc)):
            z = torch.tensor(z)
            n = torch.bincount(z, minlength=NUM_TOPICS).to(a.dtype)
            log_pz = torch.lgamma(a.sum()) - torch.lgamma(a.sum() + len(doc))
            log_pz = log_pz + (torch.lgamma(a + n) - torch.lgamma(a)).sum()
            terms.append(log_pz + TOPIC_WORDS[z, doc].log().sum())
        total += float(torch.logsumexp(torch.stack(terms), 0))
    return total


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
    ZooCase("LDA (topics fixed)", lda, (WORDS,), lda_exact, "importance", {"token_plate": "words"}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mixture_zoo(case):
    check_case(case, run_case(case))


def test_lda_auto_picks_mixed():
    layout = _layout(lda, WORDS, token_plate="words")
    assert layout.num_sequences == 3 and layout.num_tokens == 5
    assert isinstance(get_conditionals("auto", layout), MixedConditionals)


def test_mixed_draws_in_chunks_under_max_elements():
    """Issue 11's memory budget for ``"mixed"``: with room for 3 particles per chunk the
    per-token route runs 10 draws in chunks of 3, 3, 3, 1, and the chunked scorer equals
    one scorer over all the chunks' tables at once (every mask of the 6 tokens, to
    1e-12); a budget below one particle is refused, naming ``max_elements``; and a
    chunked chain estimate with 1000 draws is within 0.5 nat of the brute-force value (as
    the unchunked one in ``test_mixed_chain_is_close``)."""
    from pyro_mpt.conditionals.chunked import (
        CHUNK_FACTOR,
        ChunkedParticleScorer,
        particle_elements,
    )
    from pyro_mpt.conditionals.kernels import FactorizedKernel

    layout = _layout(gmm_latent, DATA, token_plate="data")
    trace = pyro.poutine.trace(gmm_latent).get_trace(DATA)
    one = CHUNK_FACTOR * particle_elements(trace, layout)
    pyro.set_rng_seed(3)
    backend = MixedConditionals(10, max_elements=3 * one)
    chunked = backend.scorer(gmm_latent, (DATA,), {}, layout, trace)
    assert isinstance(chunked, ChunkedParticleScorer) and len(chunked.chunks) == 4
    tables = [k.table for c in chunked.chunks for _, k in c.kernels()]
    whole = ParticleScorer(
        [(slice(0, len(DATA)), FactorizedKernel(torch.cat(tables)))], layout, chunked.log_w0
    )
    masks = torch.tensor(list(itertools.product([False, True], repeat=len(DATA))))
    observed = masks.unsqueeze(1)
    assert torch.allclose(chunked(observed, ~observed), whole(observed, ~observed), atol=1e-12)
    assert torch.allclose(chunked.log_evidence(observed), whole.log_evidence(observed), atol=1e-12)
    with pytest.raises(ValueError, match="max_elements"):
        MixedConditionals(10, max_elements=one - 1).scorer(gmm_latent, (DATA,), {}, layout, trace)
    pyro.set_rng_seed(0)
    elbo = MaskedELBO(
        estimator="chain",
        conditionals="mixed",
        num_samples=1000,
        max_elements=100 * one,
        token_plate="data",
    )
    estimate = elbo.estimate(gmm_latent, None, DATA).total
    assert abs(float(estimate) - gmm_latent_exact()) < 0.5

"""The conjugate route (pyro_mpt.conditionals.conjugate, pyro_mpt.reference.conjugate):
every masked conditional against numerical integration over the latent (or the
Dirichlet-multinomial predictive in closed form), evidences against closed forms, gradients
against autograd of the closed form, and the models it must refuse."""

from __future__ import annotations

import itertools
import logging
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import constraints

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals import ConjugateConditionals
from pyro_mpt.engine import MPTOptions, prepare
from pyro_mpt.reference import log_marginal_likelihood
from tests.conftest import assert_close

A, B = 2.0, 3.0


def beta_bernoulli(x):
    p = pyro.sample("p", dist.Beta(A, B))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Bernoulli(p), obs=x)


def beta_binomial(x):
    p = pyro.sample("p", dist.Beta(A, B))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Binomial(5, probs=p), obs=x)


def gamma_poisson(x):
    rate = pyro.sample("rate", dist.Gamma(A, B))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Poisson(rate), obs=x)


def gamma_exponential(x):
    rate = pyro.sample("rate", dist.Gamma(A, B))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Exponential(rate), obs=x)


def _grid(prior: str, n: int = 200_000):
    """Midpoints and log prior weights (density times width) of a fine grid over the
    latent: (0, 1) for a Beta, (0, 25) for a Gamma (mass beyond it below 1e-25 here)."""
    high = 1.0 if prior == "beta" else 25.0
    theta = (torch.arange(n, dtype=torch.float64) + 0.5) * (high / n)
    fn = dist.Beta(A, B) if prior == "beta" else dist.Gamma(A, B)
    return theta, fn.log_prob(theta) + math.log(high / n)


PAIRS = {
    "Beta-Bernoulli": (
        beta_bernoulli,
        torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64),
        "beta",
        lambda th: dist.Bernoulli(th),
    ),
    "Beta-Binomial": (
        beta_binomial,
        torch.tensor([3.0, 0.0, 5.0, 2.0], dtype=torch.float64),
        "beta",
        lambda th: dist.Binomial(5, probs=th),
    ),
    "Gamma-Poisson": (
        gamma_poisson,
        torch.tensor([3.0, 1.0, 4.0, 0.0], dtype=torch.float64),
        "gamma",
        lambda th: dist.Poisson(th),
    ),
    "Gamma-Exponential": (
        gamma_exponential,
        torch.tensor([0.3, 1.7, 0.9, 2.2], dtype=torch.float64),
        "gamma",
        lambda th: dist.Exponential(th),
    ),
}


def _every_mask(T):
    """Every conditioning set O (rows) with every other token scored: ``(2^T, 1, T)``."""
    rows = torch.tensor(list(itertools.product([False, True], repeat=T)))
    return rows.unsqueeze(1), ~rows.unsqueeze(1)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_every_conditional_equals_numerical_integration(name):
    """All 2^T conditioning sets and every scored token, T = 4, against
    log int p(theta) prod_{O+j} p(x|theta) - log int p(theta) prod_O p(x|theta) on a grid
    of 200,000 midpoints (no pyro_mpt): agree to 1e-6."""
    model, x, prior, token = PAIRS[name]
    _, scorer, backend = prepare(
        model, (x,), {}, MPTOptions(conditionals="auto", token_plate="data")
    )
    assert backend.name == "conjugate"
    observed, scored = _every_mask(len(x))
    got = scorer(observed, scored)[:, 0]  # (2^T, T)
    theta, log_w = _grid(prior)
    lik = token(theta.unsqueeze(-1)).log_prob(x)  # (G, T)

    def evidence(rows):  # (R, T) bool -> (R,)
        return torch.logsumexp(log_w.unsqueeze(-1) + lik @ rows.double().T, 0)

    rows = observed[:, 0]
    base = evidence(rows)
    for j in range(len(x)):
        with_j = rows.clone()
        with_j[:, j] = True
        want = torch.where(scored[:, 0, j], evidence(with_j) - base, torch.zeros(()))
        assert_close(got[:, j], want, atol=1e-6, msg=f"{name}, token {j}")


def dirichlet_categorical(x, concentration):
    probs = pyro.sample("probs", dist.Dirichlet(concentration))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Categorical(probs), obs=x)


def test_dirichlet_conditionals_are_the_polya_predictive():
    r"""p(x_j = k | x_O) = (alpha_k + n_k(O)) / (sum alpha + |O|), written out here for
    every conditioning set of T = 5 symbols from 3."""
    x, conc = torch.tensor([0, 2, 2, 1, 2]), torch.tensor([1.0, 0.5, 2.0])
    _, scorer, backend = prepare(
        dirichlet_categorical, (x, conc), {}, MPTOptions(conditionals="auto", token_plate="data")
    )
    assert backend.name == "conjugate"
    observed, scored = _every_mask(len(x))
    got = scorer(observed, scored)[:, 0]
    onehot = torch.nn.functional.one_hot(x, 3).double()  # (T, 3)
    counts = observed[:, 0].double() @ onehot  # (R, 3)
    pred = (conc + counts) / (conc.sum() + observed[:, 0].sum(-1, keepdim=True))  # (R, 3)
    want = torch.where(scored[:, 0], pred[:, x].log(), torch.zeros(()))
    assert_close(got, want, atol=1e-12)


def per_sequence_beta_bernoulli(x):
    """One coin per row of ``x`` (N, T): the tokens are the row's flips (to_event)."""
    N, T = x.shape
    with pyro.plate("rows", N):
        p = pyro.sample("p", dist.Beta(A, B))
        pyro.sample("x", dist.Bernoulli(p.unsqueeze(-1).expand(N, T)).to_event(1), obs=x)


def _log_beta(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def test_per_sequence_latent_equals_the_closed_form():
    x = torch.tensor([[1.0, 0, 1, 1, 0], [0, 0, 0, 1, 0], [1, 1, 1, 1, 1]])
    k, n = x.sum(-1), x.shape[-1]
    exact = _log_beta(A + k, B + n - k) - _log_beta(torch.tensor(A), torch.tensor(B))
    ref = log_marginal_likelihood(per_sequence_beta_bernoulli, x)
    assert ref.method == "conjugate", ref.messages
    assert_close(ref.per_sequence, exact, atol=1e-12)
    chain = MaskedELBO(estimator="chain").estimate(per_sequence_beta_bernoulli, None, x)
    assert_close(chain.per_sequence, exact, atol=1e-12)


def test_poutine_mask_scores_the_present_tokens_only():
    """Masked-out tokens (NaN here, as missing data often are) are neither observed nor
    scored: the evidence is the closed form over the present ones."""
    x = torch.tensor([1.0, float("nan"), 0.0, 1.0, float("nan"), 1.0])
    present = ~x.isnan()

    def model(x):
        p = pyro.sample("p", dist.Beta(A, B))
        with pyro.plate("data", len(x)), poutine.mask(mask=present):
            pyro.sample("obs", dist.Bernoulli(p), obs=x.nan_to_num())

    kept = x[present]
    k, n = kept.sum(), len(kept)
    exact = _log_beta(A + k, B + n - k) - _log_beta(torch.tensor(A), torch.tensor(B))
    ref = log_marginal_likelihood(model, x, token_plate="data")
    assert ref.method == "conjugate", ref.messages
    assert_close(ref.total, exact, atol=1e-12)
    chain = MaskedELBO(estimator="chain", token_plate="data").estimate(model, None, x)
    assert_close(chain.total, exact, atol=1e-12)  # telescopes over the present tokens


def learnable_beta_bernoulli(x):
    a = pyro.param("a", torch.tensor(A), constraint=constraints.positive)
    b = pyro.param("b", torch.tensor(B), constraint=constraints.positive)
    p = pyro.sample("p", dist.Beta(a, b))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Bernoulli(p), obs=x)


def test_gradients_equal_the_closed_form():
    """d(-log p(x))/d(a, b) of the chain loss and of the reference against autograd of
    log B(a + k, b + n - k) - log B(a, b), to 1e-10."""
    x = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    elbo = MaskedELBO(estimator="chain", token_plate="data")
    loss = elbo.differentiable_loss(learnable_beta_bernoulli, None, x)
    leaves = [pyro.param(n).unconstrained() for n in ("a", "b")]
    got = torch.autograd.grad(loss, leaves)
    a, b = pyro.param("a"), pyro.param("b")
    k, n = x.sum(), len(x)
    closed = -(_log_beta(a + k, b + n - k) - _log_beta(a, b))
    want = torch.autograd.grad(closed, leaves)
    assert_close(loss, closed, atol=1e-12)
    for g, w in zip(got, want):
        assert_close(g, w, atol=1e-10)
    ref = log_marginal_likelihood(learnable_beta_bernoulli, x, token_plate="data")
    for g, w in zip(torch.autograd.grad(ref.total, leaves), want):
        assert_close(g, -w, atol=1e-10)


def squared_probs(x):
    p = pyro.sample("p", dist.Beta(A, B))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Bernoulli(p**2), obs=x)


def two_children(x):
    p = pyro.sample("p", dist.Beta(A, B))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Bernoulli(p), obs=x)
        pyro.sample("counts", dist.Binomial(3, probs=p), obs=2 * x)


def per_token_latent(x):
    with pyro.plate("data", len(x)):
        p = pyro.sample("p", dist.Beta(A, B))
        pyro.sample("obs", dist.Bernoulli(p), obs=x)


def normal_latent(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Poisson(loc.exp()), obs=x)


REFUSED = {
    "transformed parameter": (squared_probs, "the probs of observed site 'obs' is not the latent"),
    "two kinds of children": (two_children, "several observed children"),
    "latent inside the token plate": (per_token_latent, "values per sequence"),
    "not a conjugate prior": (normal_latent, "latent site 'loc' is a Normal"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_non_conjugate_models_fall_back_with_the_reason(case, caplog):
    model, reason = REFUSED[case]
    x = torch.tensor([1.0, 0.0, 1.0])
    with caplog.at_level(logging.INFO, logger="pyro_mpt"):
        ref = log_marginal_likelihood(model, x, token_plate="data", num_samples=200)
    assert ref.method != "conjugate"
    assert any(reason in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(ValueError, match=f"conditionals='conjugate' cannot score.*{reason}"):
        MaskedELBO(conditionals="conjugate", token_plate="data").loss(model, None, x)
    with pytest.raises(ValueError, match=f"method='conjugate' cannot integrate.*{reason}"):
        log_marginal_likelihood(model, x, method="conjugate", token_plate="data")


def test_backend_is_registered_and_explicit():
    x = torch.tensor([1.0, 0.0, 1.0])
    est = MaskedELBO(conditionals=ConjugateConditionals(), estimator="chain", token_plate="data")
    exact = _log_beta(A + 2, B + 1) - _log_beta(torch.tensor(A), torch.tensor(B))
    assert_close(est.estimate(beta_bernoulli, None, x).total, exact, atol=1e-12)


def test_the_smc_ladder_model_is_exact_now():
    """tests/test_smc.py's Gamma-Poisson (a rate per sequence, expanded over 50 counts,
    where prior importance sampling fails its diagnostics) is integrated exactly."""
    from tests.test_smc import gamma_poisson, gamma_poisson_exact

    lam = torch.linspace(2.0, 40.0, 20)
    x = torch.poisson(lam.unsqueeze(-1).expand(20, 50), generator=torch.Generator().manual_seed(0))
    ref = log_marginal_likelihood(gamma_poisson, x)
    assert ref.method == "conjugate", ref.messages
    assert_close(ref.total, gamma_poisson_exact(x), atol=0.0, rtol=1e-10)


def rows_of_counts(x):
    """A rate per row (plate at dim -2), the row's counts in the token plate at dim -1."""
    with pyro.plate("rows", x.shape[0], dim=-2):
        lam = pyro.sample("lam", dist.Gamma(2.0, 0.5))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("x", dist.Poisson(lam), obs=x)


def test_nested_plates_per_row_rate():
    """Per-sequence Gamma rates with token_plate nested inside the sequence plate: the
    reference equals the negative-binomial closed form of each row, and the stratified
    estimate (20 masks, seed 0) is within 4 standard errors of their sum."""
    x = torch.tensor([[3.0, 1, 4, 0, 2], [0, 0, 1, 0, 0], [7, 5, 6, 8, 9]])
    a, b, s, n = 2.0, 0.5, x.sum(-1), x.shape[1]
    exact = (
        a * math.log(b)
        - math.lgamma(a)
        + torch.lgamma(a + s)
        - (a + s) * math.log(b + n)
        - torch.lgamma(x + 1).sum(-1)
    )
    ref = log_marginal_likelihood(rows_of_counts, x, token_plate="data")
    assert ref.method == "conjugate", ref.messages
    assert_close(ref.per_sequence, exact, atol=1e-12)
    pyro.set_rng_seed(0)
    elbo = MaskedELBO(estimator="stratified", num_masks=20, token_plate="data")
    est = elbo.estimate(rows_of_counts, None, x)
    assert abs(float(est.total) - float(exact.sum())) <= 4 * est.stderr

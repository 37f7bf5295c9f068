"""Zoo: conjugate models with one global latent and closed-form evidence (Beta-Bernoulli,
Gamma-Poisson, Dirichlet-Categorical), written as in Pyro's SVI tutorials: a global
``pyro.sample`` and the data in ``pyro.plate("data", N)``. The data points are the tokens
of one sequence (``token_plate="data"``); "auto" integrates the latent in closed form
(:mod:`pyro_mpt.conditionals.conjugate`), so the values are checked to 1e-6."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from .common import ZooCase, check_case, run_case

ALPHA, BETA = 2.0, 3.0
COIN = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
COUNTS = torch.tensor([3.0, 1.0, 4.0, 2.0, 5.0, 3.0], dtype=torch.float64)
SYMBOLS = torch.tensor([0, 2, 2, 1, 2, 0, 2, 2])
CONCENTRATION = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)


def beta_bernoulli(data):
    p = pyro.sample("p", dist.Beta(ALPHA, BETA))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Bernoulli(p), obs=data)


def gamma_poisson(data):
    rate = pyro.sample("rate", dist.Gamma(ALPHA, BETA))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Poisson(rate), obs=data)


def dirichlet_categorical(data):
    probs = pyro.sample("probs", dist.Dirichlet(CONCENTRATION))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Categorical(probs), obs=data)


def _log_beta(a, b):
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def beta_bernoulli_exact():
    r""":math:`\log B(a + k, b + n - k) - \log B(a, b)`."""
    k, n = float(COIN.sum()), len(COIN)
    return _log_beta(ALPHA + k, BETA + n - k) - _log_beta(ALPHA, BETA)


def gamma_poisson_exact():
    r"""The negative-binomial evidence of Poisson counts under a Gamma(shape, rate) prior."""
    s, n = float(COUNTS.sum()), len(COUNTS)
    return (
        ALPHA * math.log(BETA)
        - math.lgamma(ALPHA)
        + math.lgamma(ALPHA + s)
        - (ALPHA + s) * math.log(BETA + n)
        - float(torch.lgamma(COUNTS + 1).sum())
    )


def dirichlet_categorical_exact():
    r"""The Dirichlet-multinomial evidence of an ordered sequence of symbols."""
    a = CONCENTRATION
    n = torch.bincount(SYMBOLS, minlength=len(a)).to(a.dtype)
    return float(
        torch.lgamma(a.sum())
        - torch.lgamma(a.sum() + n.sum())
        + (torch.lgamma(a + n) - torch.lgamma(a)).sum()
    )


CASES = [
    ZooCase(
        "Beta-Bernoulli",
        beta_bernoulli,
        (COIN,),
        beta_bernoulli_exact,
        "conjugate",
        {"token_plate": "data"},
    ),
    ZooCase(
        "Gamma-Poisson",
        gamma_poisson,
        (COUNTS,),
        gamma_poisson_exact,
        "conjugate",
        {"token_plate": "data"},
    ),
    ZooCase(
        "Dirichlet-Categorical",
        dirichlet_categorical,
        (SYMBOLS,),
        dirichlet_categorical_exact,
        "conjugate",
        {"token_plate": "data"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_conjugate_zoo(case):
    check_case(case, run_case(case))


def test_closed_forms_against_quadrature():
    """The closed forms themselves, against a fine midpoint rule over the latent (no
    pyro_mpt): they must agree to 1e-6."""
    grid = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    prior = dist.Beta(ALPHA, BETA).log_prob(grid)
    lik = dist.Bernoulli(grid.unsqueeze(-1)).log_prob(COIN).sum(-1)
    value = float(torch.logsumexp(prior + lik, 0) - math.log(len(grid)))
    assert value == pytest.approx(beta_bernoulli_exact(), rel=1e-6)

r"""Tests of :mod:`pyro_mpt.conditionals.evidence`: partial evidence and its contraction,
against sums written by hand for a Gaussian mixture,

.. math:: \log p(x_E) = \log \sum_c \pi_c \prod_{t \in E} \mathcal N(x_t; \mu_{ct}, \sigma^2),

and the probe factor :math:`1 + t\,p(x_t \mid z)/c` whose derivative at :math:`t = 0` gives
the conditionals."""

import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from pyro_mpt.conditionals.elimination import EliminationScorer
from pyro_mpt.conditionals.evidence import Probe
from pyro_mpt.models import gaussian_mixture
from pyro_mpt.tokens import read_layout
from tests.conftest import assert_close

N, T, C = 3, 5, 4


def _mixture():
    gen = torch.Generator().manual_seed(0)
    weights = torch.softmax(torch.randn(C, generator=gen, dtype=torch.float64), 0)
    locs = torch.randn(C, T, generator=gen, dtype=torch.float64)
    scale = torch.tensor(0.8, dtype=torch.float64)
    X = torch.randn(N, T, generator=gen, dtype=torch.float64)
    return X, weights, locs, scale


def test_contracted_evidence_matches_hand_sum():
    """Evidence sets: empty (log 1 = 0), full, and random per sequence, all at once."""
    X, weights, locs, scale = _mixture()
    model = lambda X: gaussian_mixture(X, C, weights, locs, scale)  # noqa: E731
    layout = read_layout(poutine.trace(model).get_trace(X))
    scorer = EliminationScorer(model, (X,), {}, layout)
    gen = torch.Generator().manual_seed(1)
    evidence = torch.rand(6, N, T, generator=gen) < 0.5
    evidence[0] = False
    evidence[1] = True
    got = scorer.log_evidence(evidence)
    l = dist.Normal(locs, scale).log_prob(X.unsqueeze(-2))  # (N, C, T)
    a = weights.log() + torch.einsum("bnt,nct->bnc", evidence.to(l.dtype), l)
    want = torch.logsumexp(a, -1)  # (B, N)
    assert got.shape == (6, N)
    assert_close(got[0], torch.zeros(N), atol=1e-12)
    assert_close(got, want, atol=1e-12)


def test_probe_factor_and_its_derivative():
    r"""Observed elements keep their log-density; the others have log-factor
    :math:`\log(1 + t\,e^{\ell - \log c}) = 0` at :math:`t = 0`, with derivative
    :math:`e^{\ell - \log c}`; :math:`\log c = \max_c \ell` is stored under the key."""
    _, weights, locs, scale = _mixture()
    X = torch.randn(N, T, dtype=torch.float64)
    base = dist.Normal(locs.view(C, 1, T), scale)  # batch (C, 1, T): C enumerated values
    observed = torch.rand(N, T, generator=torch.Generator().manual_seed(2)) < 0.5
    t = torch.zeros(N, T, dtype=torch.float64, requires_grad=True)
    store = {}
    lp = Probe(base, observed, t, store, "x").log_prob(X)  # (C, N, T)
    ell = base.log_prob(X)
    logc = ell.amax(0)
    assert_close(store["x"], logc, atol=0.0)
    assert_close(lp, torch.where(observed, ell, 0.0), atol=0.0)
    (grad,) = torch.autograd.grad(lp.sum(), t)
    want = torch.where(observed, 0.0, (ell - logc).exp().sum(0))
    assert_close(grad, want, atol=1e-12)

"""Observed tokens that are parents of other tokens (issue 12): detected; the curve and a
fixed mask rate are refused with a clear error; log p(x) and MaskedELBO's chain (exact) and
stratified estimate (unbiased: the conditionals are still ratios of one set function) run.
Exact values by hand (AR densities, a forward algorithm), without pyro_mpt."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import MaskedELBO, mpt_curve
from pyro_mpt.engine import MPTOptions, prepare
from pyro_mpt.reference import log_marginal_likelihood
from pyro_mpt.tokens.dependencies import observed_parents
from tests.conftest import assert_close

TRANS = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
LOCS = torch.tensor([-1.0, 1.0], dtype=torch.float64)


def ar1(x):
    """AR(1) observations, each x_t's mean the previous observed value."""
    with pyro.plate("seq", x.shape[0]):
        prev = torch.zeros(x.shape[0])
        for t in pyro.markov(range(x.shape[1])):
            prev = pyro.sample(f"x_{t}", dist.Normal(0.5 * prev, 1.0), obs=x[:, t])


def arhmm(y, ar=0.3):
    """An autoregressive HMM: y_t ~ N(locs[z_t] + ar * y_{t-1}, 1)."""
    with pyro.plate("seq", y.shape[0]):
        z, prev = 0, torch.zeros(y.shape[0])
        for t in pyro.markov(range(y.shape[1])):
            z = pyro.sample(f"z_{t}", dist.Categorical(TRANS[z]), infer={"enumerate": "parallel"})
            loc = LOCS[z] if ar is None else LOCS[z] + ar * prev  # None: a plain HMM
            prev = pyro.sample(f"y_{t}", dist.Normal(loc, 1.0), obs=y[:, t])


def _ar1_exact(x):
    prev = torch.cat([torch.zeros(x.shape[0], 1), x[:, :-1]], 1)
    return dist.Normal(0.5 * prev, 1.0).log_prob(x).sum()


def _arhmm_exact(y, ar=0.3):
    prev = torch.cat([torch.zeros(y.shape[0], 1), y[:, :-1]], 1)
    emit = dist.Normal(LOCS + ar * prev.unsqueeze(-1), 1.0).log_prob(y.unsqueeze(-1))
    alpha = TRANS[0].log() + emit[:, 0]  # z_0 ~ TRANS[0]
    for t in range(1, y.shape[1]):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + TRANS.log(), -2) + emit[:, t]
    return torch.logsumexp(alpha, -1).sum()


@pytest.mark.parametrize("model, exact_fn", [(ar1, _ar1_exact), (arhmm, _arhmm_exact)])
def test_observed_parents_log_p_and_chain_run(model, exact_fn):
    y = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)) * 1.5
    exact = exact_fn(y)
    assert_close(log_marginal_likelihood(model, y).total, exact, atol=1e-9)
    chain = MaskedELBO(estimator="chain").estimate(model, None, y)
    assert_close(chain.total, exact, atol=1e-9)
    strat = MaskedELBO(num_masks=64).estimate(model, None, y)
    assert abs(float(strat.total) - float(exact)) < 4 * strat.stderr


@pytest.mark.parametrize("model", [ar1, arhmm])
def test_curve_and_fixed_rate_refused(model):
    y = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"mpt_curve is not available.*'y?x?_1' depends on"):
        mpt_curve(model, y)
    with pytest.raises(ValueError, match=r"estimator='fixed' is not available.*observed site"):
        MaskedELBO(estimator="fixed").loss(model, None, y)


def test_detection_has_no_false_positive():
    """The same HMM without the AR term: no observed parent, the curve runs."""
    y = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    layout, _, _ = prepare(arhmm, (y, None), {}, MPTOptions())
    assert observed_parents(arhmm, (y, None), {}, layout) == {}
    layout, _, _ = prepare(arhmm, (y,), {}, MPTOptions())
    parents = observed_parents(arhmm, (y,), {}, layout)
    assert parents == {f"y_{t}": [f"y_{t - 1}"] for t in range(1, 5)}
    curve = mpt_curve(arhmm, y, None, exhaustive=True)
    assert_close(curve.area, _arhmm_exact(y, 0.0), atol=1e-8)

"""Masks read as Pyro reads them (issue 12): Pyro applies a site's mask when it computes the
log-density, after the model has run, so a mask tensor mutated in place after the sample
statement (the ``first_capture_mask |= ...`` idiom of Pyro's capture-recapture example,
examples/capture_recapture/cjs.py) counts with its final value. pyro_mpt reads it at the same
moment; checked against TraceEnum_ELBO with an empty guide."""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch.distributions.utils import clamp_probs

from pyro_mpt import MaskedELBO
from pyro_mpt.reference import log_marginal_likelihood
from tests.conftest import assert_close

PHI, RHO = torch.tensor(0.7), torch.tensor(0.4)


def cjs(capture_history):
    """A Cormack-Jolly-Seber model written as Pyro's example writes model_1 (survival phi,
    recapture rho, enumerated alive states), with the mask mutated in place."""
    N, T = capture_history.shape
    phi = pyro.sample("phi", dist.Uniform(0.0, 1.0))
    rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))
    with pyro.plate("animals", N, dim=-1):
        z = torch.ones(N)
        first_capture_mask = torch.zeros(N, dtype=torch.bool)
        for t in pyro.markov(range(T)):
            with poutine.mask(mask=first_capture_mask):
                mu_z = first_capture_mask.double() * phi * z + (1 - first_capture_mask.double())
                z = pyro.sample(
                    f"z_{t}",
                    dist.Bernoulli(clamp_probs(mu_z)),
                    infer={"enumerate": "parallel"},
                )
                pyro.sample(f"y_{t}", dist.Bernoulli(rho * z), obs=capture_history[:, t])
            first_capture_mask |= capture_history[:, t].bool()  # mutated after the statements


def _history(seed=0, N=12, T=5):
    g = torch.Generator().manual_seed(seed)
    h = (torch.rand(N, T, generator=g) < 0.35).double()
    h[0] = 0  # one animal never seen: every token masked out
    return h


def test_mutated_mask_scored_as_pyro_scores_it():
    h = _history()
    model = poutine.condition(cjs, data={"phi": PHI, "rho": RHO})
    pyro_value = -TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda h: None, h)
    own = dist.Uniform(0.0, 1.0).log_prob(PHI) + dist.Uniform(0.0, 1.0).log_prob(RHO)  # 0
    expected = pyro_value - own
    ref = log_marginal_likelihood(model, h)
    assert ref.method == "exact"
    assert_close(ref.total, expected, atol=1e-9)
    chain = MaskedELBO(estimator="chain").estimate(model, None, h)
    assert_close(chain.total, expected, atol=1e-9)
    strat = MaskedELBO(num_masks=32).estimate(model, None, h)
    assert abs(float(strat.total) - float(expected)) < 4 * strat.stderr
    assert strat.draws[:, 0].abs().max() == 0  # the animal never seen has no token


def test_mask_read_at_the_end_not_at_the_statement():
    """The value Pyro and pyro_mpt compute differs from the model with the mask copied at
    each statement (what a reader of the code may expect): the final mask is the one used."""
    h = _history(1)
    model = poutine.condition(cjs, data={"phi": PHI, "rho": RHO})

    def copied(capture_history):  # the mask copied at each statement
        with poutine.mask(mask=True):
            return _cjs_copied(capture_history)

    ours = log_marginal_likelihood(model, h).total
    theirs = -TraceEnum_ELBO(max_plate_nesting=1).loss(
        poutine.condition(copied, data={"phi": PHI, "rho": RHO}), lambda h: None, h
    )
    assert abs(float(ours) - float(theirs)) > 1e-3


def _cjs_copied(capture_history):
    N, T = capture_history.shape
    phi = pyro.sample("phi", dist.Uniform(0.0, 1.0))
    rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))
    with pyro.plate("animals", N, dim=-1):
        z = torch.ones(N)
        seen = torch.zeros(N, dtype=torch.bool)
        for t in pyro.markov(range(T)):
            with poutine.mask(mask=seen.clone()):
                mu_z = seen.double() * phi * z + (1 - seen.double())
                z = pyro.sample(
                    f"z_{t}",
                    dist.Bernoulli(clamp_probs(mu_z)),
                    infer={"enumerate": "parallel"},
                )
                pyro.sample(f"y_{t}", dist.Bernoulli(rho * z), obs=capture_history[:, t])
            seen = seen | capture_history[:, t].bool()

"""Reference method "smc_importance" (a Student-t fitted to one SMC sweep, then importance
sampling) against values computed without pyro_mpt: the collapsed PPCA density, the
regression evidence as a dense Gaussian, eight schools by a grid over tau (tests/test_smc.py).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt.models import multivariate_normal
from pyro_mpt.reference import METHODS, log_marginal_likelihood
from pyro_mpt.reference.smc_importance import smc_importance_reference
from tests.test_smc import CASES, two_peaks


def test_registered():
    assert METHODS["smc_importance"] is smc_importance_reference


@pytest.mark.parametrize("case", sorted(CASES))
def test_smc_importance_within_three_standard_errors(case):
    model, args, kwargs, plate, exact = CASES[case]()
    pyro.set_rng_seed(0)
    ref = log_marginal_likelihood(
        model, *args, **kwargs, method="smc_importance", num_samples=2048, token_plate=plate
    )
    assert ref.method == "smc_importance" and ref.trustworthy
    assert 0 < ref.stderr < 0.2  # the fitted proposal: weights nearly constant
    assert abs(float(ref.total) - exact) < 3 * ref.stderr, (float(ref.total), exact, ref.stderr)
    assert (ref.khat < ref.khat_threshold).all() and ref.ess.min() > 100


def test_smc_importance_beats_prior_importance_at_equal_draws():
    """PPCA in the hard regime, 2048 draws each: the fitted proposal's standard error is
    far below the prior's (measured 0.04 against 1.5; the prior's estimate was 4.7 nats
    low, and not flagged)."""
    model, args, kwargs, plate, exact = CASES["ppca_hard"]()
    pyro.set_rng_seed(0)
    fitted = log_marginal_likelihood(
        model, *args, **kwargs, method="smc_importance", num_samples=2048
    )
    prior = log_marginal_likelihood(model, *args, **kwargs, method="importance", num_samples=2048)
    assert 10 * fitted.stderr < prior.stderr
    assert "(smc_importance, S=2048" in str(fitted)


def test_smc_importance_covers_both_modes():
    """z ~ N(0, 1), x_t ~ N(z^2, 0.01) with x = 4: modes at z = +-2, 0.003 wide. The sweeps
    settle in different modes and the mixture of their fits covers both: against a grid
    over z (step 6e-6, far below the modes' width), within 4 standard errors."""
    x = torch.full((4, 2), 4.0)
    z = torch.linspace(-6.0, 6.0, 2_000_001)
    lp = dist.Normal(0.0, 1.0).log_prob(z) + 2 * dist.Normal(z**2, 0.01).log_prob(torch.tensor(4.0))
    exact = 4 * float(torch.logsumexp(lp, 0) + math.log(float(z[1] - z[0])))
    pyro.set_rng_seed(0)
    ref = log_marginal_likelihood(two_peaks, x, method="smc_importance", num_samples=2048)
    assert ref.trustworthy
    assert abs(float(ref.total) - exact) < 4 * ref.stderr, (float(ref.total), exact, ref.stderr)


def test_smc_importance_refuses_models_without_continuous_latents():
    X = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'smc_importance' needs a continuous latent site"):
        log_marginal_likelihood(
            multivariate_normal, X, torch.zeros(3), torch.eye(3), method="smc_importance"
        )


def test_data_outside_the_support_is_flagged_not_a_crash():
    """A sequence that no latent value can explain (x = 10 beyond a Uniform(m - 1, m + 1)
    with m in (-1, 1)) loses every particle: its estimate is -inf and flagged, the other
    sequence within 3 s.e. of log(1/2) (its weights vary: the proposal is a fitted
    Student-t, not the prior)."""

    def model(X):
        with pyro.plate("data", X.shape[0]):
            m = pyro.sample("m", dist.Uniform(-1.0, 1.0))
            pyro.sample("x", dist.Uniform(m - 1.0, m + 1.0), obs=X)

    X = torch.tensor([0.0, 10.0])
    # seed 1: on sequence 0's nearly constant weights (ESS ~2040 of 2048) ArviZ's k-hat
    # misfires in about 1 seed of 20 (1.32 at seed 0 with the tempered fits, 3.62 at seed 5
    # with the sweeps before them), an extra warning this test is not about
    pyro.set_rng_seed(1)
    with pytest.warns(UserWarning, match=r"1 of 2 sequences have a non-finite estimate"):
        ref = log_marginal_likelihood(model, X, method="smc_importance", num_samples=2048)
    assert not ref.trustworthy and ref.per_sequence[1] == -math.inf
    se = float(ref.per_sequence_stderr[0])
    assert 0 < se < 0.05 and abs(float(ref.per_sequence[0]) - math.log(0.5)) < 3 * se

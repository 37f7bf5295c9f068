"""Zoo: the linear-Gaussian models of :mod:`tests.zoo.linear_gaussian_models` (a Kalman
filter with ``pyro.markov``, PPCA with an explicit ``z``, Bayesian linear regression with
``token_plate``, eight schools with a fixed tau) as :class:`~tests.zoo.common.ZooCase`
entries, so that the zoo's common checks and ``python -m tests.zoo.table`` cover them:
"auto" takes ``"gaussian"``, exact to 1e-6 against the dense Gaussian or the Kalman filter
written without pyro_mpt; the chain telescopes to it; the stratified estimate is within
4 standard errors."""

from __future__ import annotations

import pyro
import pytest

from . import linear_gaussian_models as lg
from .common import ZooCase, check_case, in_float64, run_case

KALMAN_Y = in_float64(lg.kalman_data)
PPCA_X = in_float64(lg.ppca_data)
BLR_X, BLR_Y = in_float64(lg.blr_data)
SIGMA, Y = lg.SCHOOLS_SIGMA.double(), lg.SCHOOLS_Y.double()  # whole numbers: cast exactly


def kalman_exact():
    return float(lg.kalman_log_likelihood(KALMAN_Y, *lg.kalman_params()).sum().detach())


def ppca_exact():
    """Reads the model's parameters from the param store (creating them at their initial
    values, as the model's own ``pyro.param`` statements do)."""
    lg.ppca(PPCA_X)
    store = pyro.get_param_store()
    return float(
        lg.ppca_log_likelihood(PPCA_X, store["W"], store["mu"], store["sigma"]).sum().detach()
    )


def blr_exact():
    return float(lg.blr_log_likelihood(BLR_X, BLR_Y))


def schools_exact():
    return float(lg.eight_schools_log_likelihood(SIGMA, Y))


CASES = [
    ZooCase("Kalman filter (pyro.markov)", lg.kalman, (KALMAN_Y,), kalman_exact, "gaussian"),
    ZooCase("PPCA with z", lg.ppca, (PPCA_X,), ppca_exact, "gaussian"),
    ZooCase(
        "Bayesian linear regression",
        lg.blr,
        (BLR_X, BLR_Y),
        blr_exact,
        "gaussian",
        {"token_plate": "data"},
    ),
    ZooCase(
        "eight schools (tau fixed)",
        lg.eight_schools,
        (SIGMA, Y),
        schools_exact,
        "gaussian",
        {"token_plate": "schools"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_linear_gaussian_zoo(case):
    result = run_case(case)
    check_case(case, result)
    assert result["stratified"].conditionals == "linear_gaussian"

r"""Training with ``MaskedELBO`` (the paper's experiment 3, at test size): SVI + Adam on
collapsed PPCA (``W``, ``loc``, ``noise_scale`` learned) from ``models.sample_ppca`` with
N = 500, T = 10, K = 2 and noise precision 5.

- The cumulative (stratified) MPT objective drives the model to the closed-form
  maximum-likelihood PPCA's LML, and its value tracks the exact LML (it is unbiased).
- A fixed mask rate of 80% (BERT-style, ``estimator="fixed"``) estimates
  :math:`T\,S(8)`, not :math:`\log p(X)`: its value settles far from the exact LML of the
  model it trained.

Numbers observed (torch 2.x CPU, float64, data seed 0, pyro seed 0; 120 steps of
ClippedAdam lr=0.1, lrd=0.98, one mask draw per step):

====================  =========  ==========================================
quantity              value      note
====================  =========  ==========================================
LML of ML PPCA        -4976.76   closed form (Tipping & Bishop)
LML of true params    -4983.45   the generating W, loc, sigma
stratified-trained    -4978.72   ML - 1.96 nats (rel. gap 3.9e-4)
stratified objective  -4978.58   mean of the last 20 losses, = LML +- noise
fixed(0.8)-trained    -4981.42   ML - 4.66 nats (rel. gap 9.4e-4)
fixed(0.8) objective  -5747.94   mean of the last 20 losses
exact T*S(8) there    -5760.29   exhaustive curve at the trained params
bias T*S(8) - LML     -778.87    15.7% of |LML|
====================  =========  ==========================================

Other data seeds (1, 2, 3): stratified ML - 2.1 / 3.0 / 2.0 nats, fixed ML - 6.7 / 4.6 /
4.1 nats, fixed objective minus LML -1031 / -713 / -699 nats. The exact maximiser of the
fixed-rate objective (all 45 masks of size 8, L-BFGS) has an LML only 0.07 nats below ML
(data seed 0; 0.30 / 0.18 for seeds 1 / 2): PPCA is well specified, so the fixed rate's
*value* is what is badly biased, while the model it trains is close to ML, a little further
from it than the stratified one under the same optimiser (noisier gradients).

Wall time of the two SVI runs: 1.5-3 s each on an idle 2-core machine (up to ~15 s under
load).
"""

import math
from functools import cache
from itertools import combinations

import pyro
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import ClippedAdam

from pyro_mpt import MaskedELBO, mpt_curve
from pyro_mpt.estimators import MaskBatch, MaskEstimator
from pyro_mpt.models import (
    ppca_collapsed,
    ppca_log_marginal,
    ppca_maximum_likelihood,
    sample_ppca,
)
from tests.conftest import assert_close

N, T, K, NOISE = 500, 10, 2, 0.447
STEPS, LR, LRD = 120, 0.1, 0.98
TAIL = 20  # losses averaged for the objective's final value
FIXED_RATE = 0.8  # m = round(0.8 * 10) = 8 masked tokens


def _model(X):
    ppca_collapsed(X, K)


@cache
def _problem():
    X, truth = sample_ppca(N, T, K, NOISE, generator=torch.Generator().manual_seed(0))
    ml = ppca_maximum_likelihood(X, K)
    lml_ml = ppca_log_marginal(X, ml["W"], ml["loc"], ml["noise_scale"]).item()
    lml_true = ppca_log_marginal(X, truth["W"], truth["loc"], truth["noise_scale"]).item()
    return X, lml_ml, lml_true


def _param_lml(X):
    p = {n: pyro.param(n).detach() for n in ("W", "loc", "noise_scale")}
    return ppca_log_marginal(X, p["W"], p["loc"], p["noise_scale"]).item(), p


@cache
def _train(estimator, mask_rate=0.15):
    """Trains collapsed PPCA by SVI with MaskedELBO; returns the losses, the exact LML of
    the trained params and the params (cached: each run is shared by the tests below)."""
    X, _, _ = _problem()
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        svi = SVI(
            _model,
            None,
            ClippedAdam({"lr": LR, "lrd": LRD}),
            loss=MaskedELBO(estimator=estimator, mask_rate=mask_rate),
        )
        losses = [svi.step(X) for _ in range(STEPS)]
        lml, params = _param_lml(X)
        pyro.clear_param_store()
    finally:
        torch.set_default_dtype(dtype)
    return losses, lml, params


def _objective(losses):
    """The objective's final value: minus the mean of the last TAIL losses."""
    return -sum(losses[-TAIL:]) / TAIL


def test_ml_reference_is_a_maximum():
    """Sanity of the reference: the closed-form ML fit beats the generating parameters."""
    X, lml_ml, lml_true = _problem()
    assert lml_ml > lml_true
    assert_close(lml_ml, -4976.76, atol=0.01)  # observed


def test_stratified_training_reaches_ml_lml():
    X, lml_ml, lml_true = _problem()
    losses, lml, params = _train("stratified")
    assert all(math.isfinite(loss) for loss in losses)
    # Reaches the ML LML within 0.5% (observed: -4978.72 vs -4976.76, rel. gap 3.9e-4).
    assert abs(lml - lml_ml) <= 0.005 * abs(lml_ml), (lml, lml_ml)
    assert lml <= lml_ml + 1e-6  # ML is the maximum
    # Better than the generating parameters, as ML is (observed: -4978.72 > -4983.45).
    assert lml > lml_true, (lml, lml_true)
    # It learned the noise level (ML sigma 0.4464; observed 0.450).
    assert_close(params["noise_scale"], 0.4464, atol=0.02)
    # Training made progress from the initialisation (W ~ 0.1 randn, sigma = 1).
    assert -losses[0] < lml - 1000.0
    # The objective is unbiased: its final value tracks the exact LML of the model it trained
    # (observed -4978.58 vs -4978.72; the per-step loss has sd ~30 nats, so 20 steps ~7).
    objective = _objective(losses)
    assert abs(objective - lml) <= 0.01 * abs(lml_ml), (objective, lml)


def test_fixed_rate_objective_settles_away_from_the_lml():
    """The paper's finding: a fixed 80% rate optimises T * S(8), whose value sits far below
    the exact LML of the very model it trained (observed bias -766 nats, 15.4% of |LML|, from
    the losses; -778.9 exactly, from the exhaustive curve)."""
    X, lml_ml, _ = _problem()
    losses, lml, params = _train("fixed", FIXED_RATE)
    objective = _objective(losses)
    gap = lml - objective  # observed 766.5
    assert 0.10 * abs(lml_ml) < gap < 0.22 * abs(lml_ml), (gap, objective, lml)

    # The objective is T * S(round(0.8 T)) of the trained model: check against the exact
    # curve of the trained model (every one of the 2^10 - 1 masks).
    curve = mpt_curve(
        lambda X: ppca_collapsed(X, K, params["W"], params["loc"], params["noise_scale"]),
        X,
        exhaustive=True,
    )
    assert curve.mask_size(FIXED_RATE) == 8
    assert_close(curve.area, lml, atol=1e-6)  # the area is the LML
    bias = curve.fixed_rate_bias(FIXED_RATE).item()  # observed -778.87
    assert -0.22 * abs(lml_ml) < bias < -0.10 * abs(lml_ml), bias
    # The last losses estimate T * S(8) (observed -5747.9 vs -5760.3; per-step sd ~90).
    assert abs(objective - curve.fixed_rate_estimate(FIXED_RATE).item()) < 0.02 * abs(lml_ml)

    # The stratified objective, trained the same way, has no such gap.
    s_losses, s_lml, _ = _train("stratified")
    assert abs(_objective(s_losses) - s_lml) < 0.1 * gap


def test_fixed_rate_trained_model_lml():
    """What LML the fixed-rate-trained model reaches: observed -4981.42, i.e. 4.66 nats
    below ML (rel. 9.4e-4), against 1.96 below for the stratified objective under the same
    optimiser and seed (other data seeds: fixed 6.7 / 4.6 / 4.1 below ML, stratified
    2.1 / 3.0 / 2.0). Band asserted: 1 to 15 nats below ML, and below the stratified run."""
    X, lml_ml, _ = _problem()
    _, lml_fixed, _ = _train("fixed", FIXED_RATE)
    _, lml_strat, _ = _train("stratified")
    assert lml_ml - 15.0 < lml_fixed < lml_ml - 1.0, (lml_fixed, lml_ml)
    assert lml_fixed < lml_strat, (lml_fixed, lml_strat)


class _AllMasksOfSize(MaskEstimator):
    """Every mask of size m, weighted T / (m * C(T, m)): the exact fixed-rate objective
    T * S(m), deterministic."""

    name = "all-of-size"
    unbiased = False

    def __init__(self, m):
        self.m = m

    def rows_per_draw(self, T):
        return math.comb(T, self.m)

    def batches(self, N, T, num_draws, *, device, dtype, max_rows, generator=None):
        rows = [[t in s for t in range(T)] for s in combinations(range(T), self.m)]
        masks = torch.tensor(rows, dtype=torch.bool, device=device)
        R = masks.shape[0]
        scored = masks.unsqueeze(1).expand(R, N, T)
        weight = torch.full((R, N), T / (self.m * R), dtype=dtype, device=device)
        size = torch.full((R, N), self.m, device=device)
        draw = torch.zeros(R, dtype=torch.long, device=device)
        yield MaskBatch(~scored, scored, weight, size, draw)


def test_fixed_rate_exact_optimum():
    """Deterministically: maximise the exact T * S(8) by L-BFGS from the ML fit. The optimum
    moves off ML only slightly in LML (observed 0.07 nats below), while the objective's value
    there is 778.3 nats below the LML (observed -5755.11 vs LML -4976.83)."""
    X, lml_ml, _ = _problem()
    ml = ppca_maximum_likelihood(X, K)
    pyro.param("W", ml["W"].clone())
    pyro.param("loc", ml["loc"].clone())
    pyro.param(
        "noise_scale",
        ml["noise_scale"].clone(),
        constraint=torch.distributions.constraints.positive,
    )
    elbo = MaskedELBO(estimator=_AllMasksOfSize(8))
    at_ml = -elbo.loss(_model, None, X)
    store = pyro.get_param_store()
    leaves = [store.get_param(n).unconstrained() for n in ("W", "loc", "noise_scale")]
    opt = torch.optim.LBFGS(leaves, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = elbo.differentiable_loss(_model, None, X)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    at_opt = -elbo.loss(_model, None, X)
    lml_opt, _ = _param_lml(X)
    assert at_opt >= at_ml  # it did maximise T * S(8) (observed -5755.11 vs -5755.18)
    assert lml_opt <= lml_ml + 1e-6
    assert lml_ml - lml_opt < 1.0, (lml_opt, lml_ml)  # observed 0.07
    assert 0.10 * abs(lml_ml) < lml_opt - at_opt < 0.22 * abs(lml_ml)  # observed 778.3


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stratified_training_other_seeds(seed):
    X, truth = sample_ppca(N, T, K, NOISE, generator=torch.Generator().manual_seed(seed))
    ml = ppca_maximum_likelihood(X, K)
    lml_ml = ppca_log_marginal(X, ml["W"], ml["loc"], ml["noise_scale"]).item()
    svi = SVI(_model, None, ClippedAdam({"lr": LR, "lrd": LRD}), loss=MaskedELBO())
    for _ in range(STEPS):
        svi.step(X)
    lml, _ = _param_lml(X)
    assert abs(lml - lml_ml) <= 0.005 * abs(lml_ml), (seed, lml, lml_ml)

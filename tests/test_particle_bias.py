r"""The particles' jackknife bias correction (:func:`pyro_mpt.particle_error.particle_error`)
and the ``reliable`` flag of :class:`~pyro_mpt.MPTEstimate` (issue 14, hard regime).

The chain estimate with importance conditionals telescopes, for every order, to the
importance estimate :math:`\log \frac1S\sum_s p(x_n \mid z_s)`, so the jackknife over
particle groups can be computed by hand from the prior draws' likelihood table.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import MaskedELBO, mpt_curve
from pyro_mpt.engine import MPTOptions, prepare
from pyro_mpt.estimate import MPTEstimate, particle_bias_correction
from pyro_mpt.particle_error import (
    MIN_CONDITIONAL_ESS,
    NUM_GROUPS,
    ParticleError,
    particle_error,
    particle_terms,
)
from tests import calibration_cases as cases
from tests.conftest import assert_close


def test_jackknife_bias_against_brute_force():
    X, params, _ = cases._ppca_data(N=6, T=4, K=1, noise=0.5)
    pyro.set_rng_seed(0)
    opts = MPTOptions(estimator="chain", conditionals="importance", num_samples=64)
    layout, scorer, _ = prepare(cases.ppca_latent, (X, *params.values()), {}, opts)
    error = particle_error(scorer, opts.estimator, layout)
    # log p(x_n | z_s) summed over tokens; particle s belongs to group s mod G
    log_lik = scorer.kernels[0][1].table.sum(-1)  # (S, N)
    S, G = log_lik.shape[0], NUM_GROUPS
    group = torch.arange(S) % G
    full = torch.logsumexp(log_lik, 0) - math.log(S)
    left_out = torch.stack(
        [torch.logsumexp(log_lik[group != g], 0) - math.log(S - S // G) for g in range(G)]
    )
    expected = (G - 1) * (left_out.mean(0) - full)
    assert_close(error.bias, expected, atol=1e-10, rtol=1e-10)
    # the same difference read as S^(-1/2): Delta / ((G / (G - 1))^(1/2) - 1)
    slow = (left_out.mean(0) - full) / (math.sqrt(G / (G - 1)) - 1)
    assert_close(error.bias_slow, slow, atol=1e-10, rtol=1e-10)
    assert error.dof == G - 1


def test_estimate_subtracts_the_bias_and_widens_by_it():
    X, params, _ = cases._ppca_data(N=10, T=4, K=1, noise=1.0)
    args = (X, *params.values())
    elbo = MaskedELBO(estimator="chain", num_masks=2, conditionals="importance", num_samples=128)
    pyro.set_rng_seed(3)
    est = elbo.estimate(cases.ppca_latent, None, *args)
    raw = est.draws.detach().mean(0).sum()
    assert float(est.total) == pytest.approx(float(raw) - est.particle_bias, abs=1e-10)
    assert_close(est.per_sequence.sum(), est.total, atol=1e-10)
    # chain: no mask spread, so the whole error is the particles' (variance + bias^2)
    assert est.stderr == est.particle_stderr > abs(est.particle_bias) > 0
    assert est.reliable and est.num_tokens == X.shape[-1]


def test_correction_removes_most_of_the_hard_regime_bias():
    # posterior far from the prior: the raw estimate is ~26 nats low (sd 14, 200 seeds);
    # over 20 seeds the mean's s.e. is ~3.3, the expected gain ~15
    run = cases.hard_settings()["hard, chain"]
    raw, corrected = [], []
    with pytest.warns(UserWarning, match="importance conditionals degenerate"):
        for seed in range(20):
            est, exact = run(seed)
            assert not est.reliable  # the measured under-coverage is flagged
            corrected.append(float(est.total) - exact)
            raw.append(corrected[-1] + est.particle_bias)
    raw, corrected = torch.tensor(raw), torch.tensor(corrected)
    assert raw.mean() < -15 and abs(corrected.mean()) < abs(raw.mean()) - 8


def test_deterministic_conditionals_have_no_bias_term():
    X, params, _ = cases._ppca_data()
    est = MaskedELBO(num_masks=2).estimate(cases.ppca_collapsed, None, X, *params.values())
    assert est.particle_bias == 0.0 and est.reliable and est.particle_ess is None


def test_bias_correction_closed_form():
    fast = torch.tensor([1.0, 2.0], dtype=torch.float64)
    slow = torch.tensor([3.0, 5.0], dtype=torch.float64)
    scale = torch.tensor([1.0, 2.0], dtype=torch.float64)
    correction, total, extra = particle_bias_correction(ParticleError(1.0, 7.0, fast, slow), scale)
    # midpoint per sequence; B_1 = 1 + 4 = 5, B_1/2 = 3 + 10 = 13
    assert_close(correction, torch.tensor([2.0, 3.5], dtype=torch.float64), atol=0, rtol=0)
    assert total == 9.0 and extra == (25.0 + 169.0) / 2
    # no slow end: the plain jackknife, its square exactly
    correction, total, extra = particle_bias_correction(ParticleError(1.0, 7.0, fast), None)
    assert torch.equal(correction, fast) and total == 3.0 and extra == 9.0


def _hard_chain(seed):
    X, params, _ = cases._ppca_data(noise=0.3)
    opts = MPTOptions(estimator="chain", conditionals="importance", num_samples=256)
    pyro.set_rng_seed(seed)
    layout, scorer, backend = prepare(cases.ppca_latent, (X, *params.values()), {}, opts)
    return layout, scorer, backend, opts


def test_degenerate_conditionals_use_the_bias_range_by_hand():
    layout, scorer, backend, opts = _hard_chain(0)
    with pytest.warns(UserWarning, match="importance conditionals degenerate"):
        error, ess = particle_terms(scorer, backend, layout, opts)
    assert bool((ess < MIN_CONDITIONAL_ESS).float().mean() > 0.1)  # the data-level flag
    # by hand: the chain telescopes to log (1/n) sum_s p(x_n | z_s) over any particle set
    log_lik = scorer.kernels[0][1].table.sum(-1)  # (S, N)
    S, G = log_lik.shape[0], NUM_GROUPS
    group = torch.arange(S) % G
    full = torch.logsumexp(log_lik, 0) - math.log(S)
    alone = torch.stack([torch.logsumexp(log_lik[group == g], 0) for g in range(G)])
    alone = alone - math.log(S // G)
    left_out = torch.stack([torch.logsumexp(log_lik[group != g], 0) for g in range(G)])
    delta = left_out.mean(0) - (math.log(S - S // G) + full)
    b1, bh = (G - 1) * delta, delta / (math.sqrt(G / (G - 1)) - 1)
    assert_close(error.bias_slow, bh, atol=1e-9, rtol=1e-9)  # every sequence: degenerate
    draws = full.expand(2, -1)  # the chain's draws: the same importance estimate
    est = MPTEstimate.from_draws(draws, opts.estimator, "importance", particle_var=error)
    B1, Bh = float(b1.sum()), float(bh.sum())
    assert float(est.total) == pytest.approx(float(full.sum()) - (B1 + Bh) / 2, abs=1e-8)
    var_part = float(alone.sum(-1).var() / G)
    assert est.stderr**2 == pytest.approx(var_part + (B1**2 + Bh**2) / 2, rel=1e-9)
    assert est.particle_bias == pytest.approx((B1 + Bh) / 2, rel=1e-9) and est.dof == G - 1


def test_healthy_conditionals_keep_the_plain_jackknife():
    X, params, _ = cases._ppca_data(N=10, T=4, K=1, noise=1.0)
    opts = MPTOptions(estimator="chain", conditionals="importance", num_samples=512)
    pyro.set_rng_seed(0)
    layout, scorer, backend = prepare(cases.ppca_latent, (X, *params.values()), {}, opts)
    error, ess = particle_terms(scorer, backend, layout, opts)
    assert bool((ess >= MIN_CONDITIONAL_ESS).all()) and error.bias_slow is None


def test_gradient_is_the_uncorrected_estimates():
    X, params, _ = cases._ppca_data(noise=0.3)
    W = params["W"].clone().requires_grad_()
    elbo = MaskedELBO(num_masks=2, conditionals="importance", num_samples=64)
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="degenerate"):
        est = elbo.estimate(cases.ppca_latent, None, X, W, params["loc"], params["noise"])
    assert est.particle_bias != 0.0
    (corrected,) = torch.autograd.grad(est.total, W, retain_graph=True)
    (raw,) = torch.autograd.grad(est.draws.mean(0).sum(), W)
    assert_close(corrected, raw, atol=0, rtol=0)


def test_curve_area_is_corrected_as_a_whole():
    X, params, exact = cases._ppca_data(noise=0.3)
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="degenerate"):
        curve = mpt_curve(
            cases.ppca_latent, X, *params.values(), num_masks=4, conditionals="importance"
        )
    # the log of particle averages is biased low: the correction raises the area
    assert curve.particle_bias < 0
    assert float(curve.area) == pytest.approx(float(curve.scores.sum()) - curve.particle_bias)
    Xc, pc, _ = cases._ppca_data()
    deterministic = mpt_curve(cases.ppca_collapsed, Xc, *pc.values(), num_masks=2)
    assert deterministic.particle_bias == 0.0
    assert_close(deterministic.area, deterministic.scores.sum(), atol=0, rtol=0)


def test_particle_groups_score_the_ragged_masks_of_the_estimate():
    """With Pyro's masks (``obs_mask``) the estimate draws its masks over each sequence's
    present tokens (pyro_mpt.ragged); the particle groups must score those same masks, or
    their variance and bias belong to another estimator. The full weighting's draw equals
    the engine's draw on the same generator, sequence by sequence."""
    from pyro_mpt.engine import MPTOptions, prepare, score_masks
    from pyro_mpt.estimators import StratifiedEstimator
    from pyro_mpt.particle_error import _one_draw_per_weights
    from tests.test_pyro_semantics import _data

    def model(x, present):
        with pyro.plate("seq", x.shape[0], dim=-2):
            m = pyro.sample("m", dist.Normal(torch.zeros((), dtype=x.dtype), 2.0))
            with pyro.plate("tokens", x.shape[1], dim=-1):
                pyro.sample("x", dist.Normal(m, 1.0), obs=x, obs_mask=present)

    x, present = _data()
    pyro.set_rng_seed(0)
    options = MPTOptions(conditionals="importance", num_samples=64, token_plate="tokens")
    layout, scorer, backend = prepare(model, (x.double(), present), {}, options)
    assert backend.name == "importance" and layout.present is not None
    estimator = StratifiedEstimator()
    torch.manual_seed(3)
    rows = _one_draw_per_weights(
        scorer, estimator, layout, [scorer.log_w0], share_masks=False, max_elements=None
    )
    torch.manual_seed(3)  # the seed the groups draw their masks from
    seed = int(torch.randint(0, 2**62, ()))
    expected, _ = score_masks(
        scorer,
        estimator,
        1,
        num_sequences=layout.num_sequences,
        num_tokens=layout.num_tokens,
        dtype=layout.dtype,
        device=layout.device,
        generator=torch.Generator().manual_seed(seed),
        present=layout.present,
    )
    assert_close(rows[0], expected[0].double(), atol=1e-12)

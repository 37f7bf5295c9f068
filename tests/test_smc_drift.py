"""The SMC reference's particle-count check (issue 13: a wrong number is never silent): the
Kalman chain treated as non-Gaussian, whose estimate at 128 particles per run was low by
1.5-2 standard errors and unflagged, is flagged; easy models are not. Exact values: the
dense-Gaussian Kalman density and the eight-schools grid of tests/test_smc.py, computed
without pyro_mpt."""

import math
import warnings

import pyro
import pytest
import torch

import pyro_mpt.reference.smc_drift as smc_drift
from pyro_mpt.conditionals.smc import SweepResult
from pyro_mpt.reference import log_marginal_likelihood
from tests.conftest import assert_close
from tests.test_smc import SIGMA, Y, eight_schools, eight_schools_latent_exact, kalman, kalman_exact


def _fake_runs(monkeypatch, log_z):
    """The check's runs replaced by given log evidences ``(R, N)``."""

    def sweep(pm, order, num_reveal, P, *args):
        z = torch.zeros_like(log_z)
        return SweepResult(log_z, None, z, z, z, z)

    monkeypatch.setattr(smc_drift, "sweep_in_chunks", sweep)


class _PM:
    class layout:
        num_sequences, num_tokens, device = 2, 3, torch.device("cpu")


@pytest.mark.parametrize(
    "total, stderr, failed",
    [
        (-10.0, 0.1, True),
        (-11.3, 0.1, False),
        (-10.0, 2.0, False),
        (-10.9, 0.3, False),
        (-10.5, 0.1, False),
    ],
)
def test_drift_arithmetic_and_verdict(monkeypatch, total, stderr, failed):
    """D, se_D and the bias bounds D / 3, D / 15 against the check's runs pooled here by
    hand (their total is about -11.0, se 0.06); flagged only when D / se_D > 2 and D / 15 >
    se / 2: a drift of +1 against se 0.1; not a negative drift, nor +1 against se 2, nor
    +0.1 against se 0.3, nor +0.5 against se 0.1 (significant, z = 4, but D / 15 = 0.033)."""
    log_z = torch.tensor([[-5.0, -6.0], [-5.1, -6.1], [-4.9, -5.9], [-5.05, -6.05]])
    _fake_runs(monkeypatch, log_z)
    R = 4
    w = torch.exp(log_z - log_z.max(0).values)
    se2 = (R * (w**2).sum(0) / w.sum(0) ** 2 - 1) / (R - 1)
    small = torch.logsumexp(log_z, 0) - math.log(R) + se2 / 2
    check = smc_drift.particle_drift(_PM(), 128, R, total, stderr, torch.ones(2), 10**6, 1)
    drift = total - float(small.sum())
    drift_se = math.sqrt(stderr**2 + float(se2.sum()))
    assert check.num_particles == 32
    assert_close(torch.tensor(check.drift), torch.tensor(drift), atol=1e-12, rtol=0)
    assert_close(torch.tensor(check.stderr), torch.tensor(drift_se), atol=1e-12, rtol=0)
    assert_close(torch.tensor(check.bias), torch.tensor(drift / 3), atol=1e-12, rtol=0)
    assert_close(torch.tensor(check.bias_min), torch.tensor(drift / 15), atol=1e-12, rtol=0)
    expected = drift / drift_se > smc_drift.DRIFT_Z and drift / 15 > 0.5 * stderr
    assert check.failed == expected == failed


def test_drift_check_skipped_below_its_particle_floor(monkeypatch):
    _fake_runs(monkeypatch, torch.zeros(4, 2))
    assert smc_drift.particle_drift(_PM(), 127, 4, -1.0, 0.1, torch.ones(2), 10**6, 1) is None
    assert smc_drift.particle_drift(_PM(), 64, 4, -math.inf, 0.1, torch.ones(2), 10**6, 1) is None


def test_kalman_chain_at_128_particles_per_run_is_flagged():
    """Six scalar latents per sequence, ten sequences, 8 runs of 128 particles: low by
    about 1.5 standard errors (seed 0), and now flagged, with the standard error widened
    by the implied bias so that the interval reaches the exact value."""
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    exact = kalman_exact(x)
    pyro.set_rng_seed(SEED_FLAGGED)
    with pytest.warns(UserWarning, match="SMC failed its diagnostics: particle-count check"):
        ref = log_marginal_likelihood(kalman, x, method="smc", num_samples=1024)
    assert not ref.trustworthy and ref.drift.failed and "NOT TRUSTWORTHY" in str(ref)
    assert ref.drift.num_particles == 32 and ref.drift.bias > 0
    assert float(ref.total) < exact  # the bias is downwards ...
    assert exact - float(ref.total) < 3 * ref.stderr  # ... and the widened interval covers it


SEED_FLAGGED = 2


def test_easy_model_passes_the_drift_check():
    """Eight schools with a latent tau (exact by a grid over tau): no drift, trusted."""
    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = log_marginal_likelihood(
            eight_schools, Y, SIGMA, method="smc", num_samples=1024, token_plate="schools"
        )
    assert ref.trustworthy and ref.drift is not None and not ref.drift.failed
    assert ref.drift.num_particles == 32
    assert any(m.startswith("particle-count check: 128 against 32") for m in ref.messages)
    assert abs(float(ref.total) - eight_schools_latent_exact()) < 3 * ref.stderr


def _verdicts(model, args, kwargs, exact, num_samples, seeds):
    rows = []
    for seed in seeds:
        pyro.set_rng_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ref = log_marginal_likelihood(
                model, *args, **kwargs, method="smc", num_samples=num_samples
            )
        rows.append((ref.drift.failed, abs(float(ref.total) - exact) < 1.96 * ref.stderr))
    return rows


@pytest.mark.slow
def test_drift_check_false_alarms_and_hits():
    """Eight schools, 100 seeds: false alarms among the accurate runs below 10% (measured
    0 of 91); the Kalman chain at 128 per run, 12 seeds: flagged in at least half
    (measured 8 of 12)."""
    rows = _verdicts(
        eight_schools,
        (Y, SIGMA),
        {"token_plate": "schools"},
        eight_schools_latent_exact(),
        1024,
        range(100),
    )
    accurate = [failed for failed, ok in rows if ok]
    assert sum(accurate) < 0.1 * len(accurate)
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    rows = _verdicts(kalman, (x,), {}, kalman_exact(x), 1024, range(12))
    assert sum(failed for failed, _ in rows) >= 6


def test_report_names_the_drift():
    """evaluate's table says why an SMC reference is flagged (not a stage's ESS)."""
    from pyro_mpt.reference.result import LMLEstimate
    from pyro_mpt.report import EvaluationReport

    check = smc_drift.DriftCheck(1.0, 0.3, 1.0 / 3, 32, True, 1.0 / 15)
    ref = LMLEstimate(
        torch.tensor(-5.0),
        torch.tensor([-5.0]),
        0.5,
        torch.tensor([0.5]),
        "smc",
        trustworthy=False,
        drift=check,
    )
    report = EvaluationReport(ref, {}, None, [], {}, "cpu", 1, None)
    assert report.reference_status == "UNRELIABLE (drifts +1.00 from 32 particles)"

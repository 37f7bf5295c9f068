"""The importance reference (pyro_mpt.reference.importance) against closed forms, its
Monte Carlo error against its own standard error, and its diagnostics on good and bad
proposals."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

from pyro_mpt.diagnostics import effective_sample_size, pareto_khat
from pyro_mpt.models import gaussian_mixture, gaussian_mixture_log_marginal, ppca_log_marginal
from pyro_mpt.reference import log_marginal_likelihood
from pyro_mpt.reference.importance import MIN_ESS
from tests.conftest import assert_close
from tests.reference_data import latent_model, per_row_exact, ppca_data, quiet


def _laplace_noise_model(t):
    """Latent-z PPCA with Laplace noise: continuous latents, not linear-Gaussian."""

    def model(X):
        with pyro.plate("data", X.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            loc = z @ t["W"].T + t["loc"]
            pyro.sample("x", dist.Laplace(loc, t["noise_scale"]).to_event(1), obs=X)

    return model


def test_auto_chooses_importance_for_continuous_latents():
    """Continuous latents that are not linear-Gaussian (Laplace noise): importance; the
    message says why the Gaussian route was not taken."""
    X, t = ppca_data()
    est = log_marginal_likelihood(_laplace_noise_model(t), X, num_samples=4000)
    assert "observed site 'x' is a Laplace, not a Normal" in est.messages[0]
    assert est.method == "importance" and est.num_samples == 4000
    assert "chose 'importance'" in est.messages[0]
    assert est.messages[1].startswith("importance: 4000 draws per sequence from the prior")
    assert est.ess.shape == est.khat.shape == est.per_sequence.shape == (10,)
    assert est.log_weights.shape == (4000, 10)
    assert_close(est.khat_threshold, 0.7, atol=0.0)
    # k-hat (fitted on the device from the largest weights) is ArviZ's psislw k-hat
    assert_close(est.khat, pareto_khat(est.log_weights), atol=1e-10)
    assert_close(est.ess, effective_sample_size(est.log_weights), atol=1e-8)
    # the estimate and its delta-method SE from the kept weights, Jensen's bias se^2/2
    # added back to each sequence and, summed, to the total's SE in quadrature
    S = 4000
    se = ((S / est.ess - 1) / (S - 1)).sqrt()
    expected = torch.logsumexp(est.log_weights, 0) - math.log(S) + se**2 / 2
    assert_close(est.per_sequence, expected, atol=1e-10)
    assert_close(est.per_sequence_stderr, (se**2 + se**4 / 4).sqrt(), atol=1e-12)
    total_se = (se.pow(2).sum() + (se**2 / 2).sum() ** 2).sqrt()
    assert_close(est.stderr, total_se, atol=1e-12)


def test_importance_converges_to_exact_within_its_standard_error():
    """Prior importance sampling on latent-z PPCA: 100 draws are off by tenths of a nat,
    10^5 draws (chunked) by thousandths, and the reported SE covers the gap. Measured
    (seed 0): S = 100: error +0.41, SE 0.39; S = 10^5: error -0.0027, SE 0.013.
    Allowance: 4 SE plus the O(1/S) downward bias SE^2/2 of the log of a mean."""
    X, t = ppca_data()
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    small, _ = quiet(
        log_marginal_likelihood, latent_model(t), X, num_samples=100, method="importance"
    )
    big = log_marginal_likelihood(
        latent_model(t), X, num_samples=100_000, chunk_size=16384, method="importance"
    )
    err_small = abs(float(small.total - exact))
    err_big = abs(float(big.total - exact))
    assert big.trustworthy and big.ess.min() > 1000
    assert err_big < 4 * big.stderr + big.stderr**2 / 2
    assert err_small < 4 * small.stderr + small.stderr**2 / 2
    assert err_big < err_small / 10
    assert big.stderr < small.stderr / 10  # ~ 1 / sqrt(S): 31x more would be ideal
    # per sequence as well
    gap = (big.per_sequence - per_row_exact(X, t)).abs()
    se = big.per_sequence_stderr
    assert (gap < 4 * se + se**2 / 2).all()
    assert any("7 chunk(s) of up to 16384" in m for m in big.messages)


def test_standard_error_is_calibrated():
    """400 copies of one row are 400 independent replicates of the estimator of that row:
    their spread must match the reported per-sequence SE (delta method) within 15%
    (the spread of 400 draws is itself uncertain by about 4%)."""
    X, t = ppca_data(N=1)
    X = X.expand(400, -1).contiguous()
    est, _ = quiet(
        log_marginal_likelihood, latent_model(t), X, num_samples=200, method="importance"
    )
    spread = est.per_sequence.std()
    reported = est.per_sequence_stderr.mean()
    assert 0.85 < float(spread / reported) < 1.15, (float(spread), float(reported))


def test_per_sequence_beats_whole_trace_importance():
    """Local latents: one weight per particle for the whole data set (Pyro's Importance,
    log mean_s prod_n w_sn) degenerates with N, while the per-sequence log-mean-exp does not.
    Measured (N = 50, S = 2000, seed 0): per-sequence error -0.32 nats (SE 0.30),
    whole-trace error -38.9 nats (its best single particle alone: -31.3)."""
    X, t = ppca_data(N=50)
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    est = log_marginal_likelihood(latent_model(t), X, num_samples=2000, method="importance")
    S = est.log_weights.shape[0]
    whole = torch.logsumexp(est.log_weights.sum(1), 0) - math.log(S)
    err_seq = float(est.total - exact)
    err_whole = float(whole - exact)
    assert abs(err_seq) < 4 * est.stderr + est.stderr**2 / 2
    assert abs(err_seq) < 0.5
    assert err_whole < -20, (err_seq, err_whole)
    assert abs(err_whole) > 50 * abs(err_seq), (err_seq, err_whole)


def _fit_autonormal(model, X, steps=300):
    guide = AutoNormal(model)
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(steps):
        svi.step(X)
    return guide


def test_trained_guide_beats_prior():
    X, t = ppca_data(w_scale=1.0, noise=0.5)  # a narrow posterior: the prior is a poor proposal
    model = latent_model(t)
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    guide = _fit_autonormal(model, X)
    prior, _ = quiet(log_marginal_likelihood, model, X, num_samples=2000, method="importance")
    post = log_marginal_likelihood(model, X, num_samples=2000, guide=guide, method="importance")
    assert post.trustworthy
    assert (post.ess > 5 * prior.ess).all(), (post.ess, prior.ess)
    assert post.stderr < prior.stderr / 5
    assert abs(float(post.total - exact)) < 4 * post.stderr + post.stderr**2 / 2
    assert any("AutoNormal" in m for m in post.messages)


def test_bad_proposal_warns_and_is_flagged():
    """A guide far too narrow and off-centre: heavy-tailed weights, k-hat far above the
    threshold, a UserWarning and trustworthy=False (never silently)."""
    X, t = ppca_data()
    N = X.shape[0]

    def bad_guide(X):
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(torch.full((2,), 1.5), 0.05).to_event(1))

    with pytest.warns(UserWarning, match=r"Pareto k-hat up to .* \(threshold 0\.67"):
        est = log_marginal_likelihood(
            latent_model(t), X, num_samples=1000, guide=bad_guide, method="importance"
        )
    assert not est.trustworthy
    assert (est.khat > est.khat_threshold).sum() >= N // 2
    assert any(m.startswith("UNRELIABLE") for m in est.messages)
    assert "NOT TRUSTWORTHY" in str(est)


def test_small_ess_is_flagged():
    """The ESS floor is min(MIN_ESS, S / 100) = 100 for S = 20000: the prior of a narrow
    posterior leaves some rows below it, and the message counts exactly those."""
    X, t = ppca_data(w_scale=3.0, noise=0.2)
    S = 20_000
    with pytest.warns(UserWarning, match=r"ESS down to .* \(floor 100,") as caught:
        est = log_marginal_likelihood(
            latent_model(t), X, num_samples=S, chunk_size=5000, method="importance"
        )
    n_low = int((est.ess < MIN_ESS).sum())
    assert n_low > 0 and not est.trustworthy
    assert f"{n_low} below" in str(caught[0].message)
    assert_close(
        est.ess.min(), float(str(caught[0].message).split("ESS down to ")[1].split()[0]), atol=0.05
    )


def test_importance_on_enumerated_model_has_exact_weights():
    """No continuous latents: every per-sequence weight is p(x_n) itself (enumeration inside
    the weight), so importance equals exact with zero spread."""
    weights = torch.tensor([0.2, 0.3, 0.5])
    locs, scale = torch.randn(3, 4), torch.tensor(0.8)
    X = torch.randn(6, 4)
    est = log_marginal_likelihood(
        gaussian_mixture, X, 3, weights, locs, scale, method="importance", num_samples=64
    )
    assert_close(est.total, gaussian_mixture_log_marginal(X, weights, locs, scale), atol=1e-8)
    assert_close(est.ess, torch.full((6,), 64.0), atol=1e-8)
    assert est.trustworthy and (est.khat == -math.inf).all()
    assert any("no continuous latents" in m for m in est.messages)


def test_nonfinite_estimate_is_flagged():
    """A proposal whose support misses the data: every weight is zero for the row at
    x = 10 (a Uniform(-1, 1) mean with a Uniform likelihood of half-width 1), so its
    estimate is -inf and flagged; the other rows are exact, log(1/2 * 1/2 ... )."""

    def model(X):
        with pyro.plate("data", X.shape[0]):
            m = pyro.sample("m", dist.Uniform(-1.0, 1.0))
            pyro.sample("x", dist.Uniform(m - 1.0, m + 1.0), obs=X)

    X = torch.tensor([0.0, 10.0])
    with pytest.warns(UserWarning, match=r"1 of 2 sequences have a non-finite estimate"):
        est = log_marginal_likelihood(model, X, num_samples=100)
    assert not est.trustworthy
    assert est.per_sequence[1] == -math.inf
    # x = 0 lies in every [m - 1, m + 1]: every weight is 1/2
    assert_close(est.per_sequence[0], math.log(0.5), atol=1e-12)

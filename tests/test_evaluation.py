"""log_marginal_likelihood against closed forms, its Monte Carlo error against its own
standard error, its diagnostics on good and bad proposals, and its input checks."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.optim import Adam

from pyro_mpt import evaluation
from pyro_mpt.diagnostics import effective_sample_size, pareto_khat
from pyro_mpt.evaluation import LMLEstimate, log_marginal_likelihood
from pyro_mpt.models import (
    bayesian_linear_regression_latent,
    bayesian_linear_regression_log_marginal,
    gaussian_mixture,
    gaussian_mixture_log_marginal,
    hmm,
    hmm_log_marginal,
    multivariate_normal,
    ppca_collapsed,
    ppca_latent,
    ppca_log_marginal,
    sample_hmm,
    sample_ppca,
)
from tests.conftest import assert_close, requires_cuda


def _ppca(N=10, T=4, K=2, noise=1.0, w_scale=0.5, seed=0):
    """Small PPCA data whose posterior over z is not far narrower than the prior, so prior
    importance sampling works with 10^5 draws."""
    g = torch.Generator().manual_seed(seed)
    X, truth = sample_ppca(N, T, K, noise, generator=g)
    truth["W"] = truth["W"] * w_scale
    X = sample_ppca(N, T, K, noise, generator=g)[0]  # redraw under the scaled W below
    z = torch.randn(N, K, generator=g)
    X = z @ truth["W"].T + truth["loc"] + noise * torch.randn(N, T, generator=g)
    return X, truth


def _per_row_exact(X, t):
    T = X.shape[-1]
    cov_diag = (t["noise_scale"] ** 2).expand(T)
    return dist.LowRankMultivariateNormal(t["loc"], t["W"], cov_diag).log_prob(X)


def _latent(t, K=2):
    return lambda X: ppca_latent(X, K, t["W"], t["loc"], t["noise_scale"])


def _quiet(fn, *args, **kwargs):
    """Runs fn, returning (result, list of warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------------------
# exact
# ----------------------------------------------------------------------------------------


def test_exact_collapsed_ppca_equals_closed_form():
    X, t = _ppca(N=12, T=6)
    est = log_marginal_likelihood(
        lambda X: ppca_collapsed(X, 2, t["W"], t["loc"], t["noise_scale"]), X
    )
    assert isinstance(est, LMLEstimate)
    assert est.method == "exact" and est.stderr == 0.0 and est.trustworthy
    assert est.ess is None and est.khat is None and est.num_particles is None
    assert any("chose 'exact'" in m for m in est.messages)
    assert_close(est.total, ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"]), atol=1e-8)
    assert_close(est.per_sequence, _per_row_exact(X, t), atol=1e-8)
    assert_close(est.per_sequence_stderr, torch.zeros(12), atol=0.0)


def test_exact_mvn_equals_log_prob():
    T = 5
    A = torch.randn(T, T)
    cov = A @ A.T + 0.5 * torch.eye(T)
    loc = torch.randn(T)
    X = torch.randn(8, T)
    est = log_marginal_likelihood(multivariate_normal, X, loc, cov, method="exact")
    expected = dist.MultivariateNormal(loc, cov).log_prob(X)
    assert_close(est.per_sequence, expected, atol=1e-8)
    assert_close(est.total, expected.sum(), atol=1e-8)


def test_exact_gaussian_mixture_by_enumeration():
    C, T = 3, 5
    weights = torch.tensor([0.2, 0.3, 0.5])
    locs = torch.randn(C, T)
    scale = torch.tensor(0.8)
    X = torch.randn(9, T)
    est = log_marginal_likelihood(gaussian_mixture, X, C, weights, locs, scale)
    assert est.method == "exact"
    assert_close(est.total, gaussian_mixture_log_marginal(X, weights, locs, scale), atol=1e-8)
    per_row = torch.stack([gaussian_mixture_log_marginal(x[None], weights, locs, scale) for x in X])
    assert_close(est.per_sequence, per_row, atol=1e-8)


def test_exact_hmm_by_variable_elimination():
    init = torch.tensor([0.6, 0.4])
    A = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    B = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    D = sample_hmm(7, 6, init, A, B, generator=torch.Generator().manual_seed(1))
    est = log_marginal_likelihood(hmm, D, init, A, B, method="exact")
    assert_close(est.total, hmm_log_marginal(D, init, A, B), atol=1e-8)
    per_row = torch.stack([hmm_log_marginal(d[None], init, A, B) for d in D])
    assert_close(est.per_sequence, per_row, atol=1e-8)
    assert any("variable elimination" in m for m in est.messages)


def test_exact_rejects_continuous_latents():
    X, t = _ppca()
    with pytest.raises(
        ValueError,
        match=r"method='exact' cannot integrate .*\['z'\].*"
        r"method='importance'.*method='quadrature'",
    ):
        log_marginal_likelihood(_latent(t), X, method="exact")


def test_exact_suggests_enumerating_discrete_latents():
    def model(X):
        with pyro.plate("data", X.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).to_event(1), obs=X)

    with pytest.raises(ValueError, match=r"mark them infer=\{'enumerate': 'parallel'\}"):
        log_marginal_likelihood(model, torch.randn(4, 3), method="exact")


# ----------------------------------------------------------------------------------------
# importance
# ----------------------------------------------------------------------------------------


def test_auto_chooses_importance_for_continuous_latents():
    X, t = _ppca()
    est = log_marginal_likelihood(_latent(t), X, num_particles=4000)
    assert est.method == "importance" and est.num_particles == 4000
    assert "chose 'importance'" in est.messages[0]
    assert est.ess.shape == est.khat.shape == est.per_sequence.shape == (10,)
    assert est.log_weights.shape == (4000, 10)
    assert_close(est.khat_threshold, 0.7, atol=0.0)
    # k-hat (fitted on the device from the largest weights) is ArviZ's psislw k-hat
    assert_close(est.khat, pareto_khat(est.log_weights), atol=1e-10)
    assert_close(est.ess, effective_sample_size(est.log_weights), atol=1e-8)


def test_importance_converges_to_exact_within_its_standard_error():
    """Prior importance sampling on latent-z PPCA: 100 draws are off by tenths of a nat,
    10^5 draws (chunked) by thousandths, and the reported SE covers the gap. Measured
    (seed 0): S = 100: error +0.41, SE 0.39; S = 10^5: error -0.0027, SE 0.013.
    Allowance: 4 SE plus the O(1/S) downward bias SE^2/2 of the log of a mean."""
    X, t = _ppca()
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    small, _ = _quiet(log_marginal_likelihood, _latent(t), X, num_particles=100)
    big = log_marginal_likelihood(_latent(t), X, num_particles=100_000, chunk_size=16384)
    err_small = abs(float(small.total - exact))
    err_big = abs(float(big.total - exact))
    assert big.trustworthy and big.ess.min() > 1000
    assert err_big < 4 * big.stderr + big.stderr**2 / 2
    assert err_small < 4 * small.stderr + small.stderr**2 / 2
    assert err_big < err_small / 10
    assert big.stderr < small.stderr / 10  # ~ 1 / sqrt(S): 31x more would be ideal
    # per sequence as well
    gap = (big.per_sequence - _per_row_exact(X, t)).abs()
    se = big.per_sequence_stderr
    assert (gap < 4 * se + se**2 / 2).all()
    assert any("7 chunk(s) of up to 16384" in m for m in big.messages)


def test_standard_error_is_calibrated():
    """400 copies of one row are 400 independent replicates of the estimator of that row:
    their spread must match the reported per-sequence SE (delta method) within 15%
    (the spread of 400 draws is itself uncertain by about 4%)."""
    X, t = _ppca(N=1)
    X = X.expand(400, -1).contiguous()
    est, _ = _quiet(log_marginal_likelihood, _latent(t), X, num_particles=200)
    spread = est.per_sequence.std()
    reported = est.per_sequence_stderr.mean()
    assert 0.85 < float(spread / reported) < 1.15, (float(spread), float(reported))


def test_chunked_equals_unchunked():
    """The same draws in chunks or at once give the same log-weights and diagnostics. Chunk
    sizes are multiples of 16 draws per row: torch's CPU normal_ fills blocks of 16, so then
    the random stream splits exactly."""
    X, t = _ppca()
    pyro.set_rng_seed(3)
    one = log_marginal_likelihood(_latent(t), X, num_particles=1024)
    pyro.set_rng_seed(3)
    many = log_marginal_likelihood(_latent(t), X, num_particles=1024, chunk_size=128)
    assert_close(many.log_weights, one.log_weights, atol=1e-12)
    assert_close(many.total, one.total, atol=1e-10)
    assert_close(many.ess, one.ess, atol=1e-8)
    assert_close(many.khat, one.khat, atol=1e-10)
    assert_close(many.stderr, one.stderr, atol=1e-12)


def test_streaming_khat_equals_kept_weights_khat(monkeypatch):
    """Without the log-weights kept (S N too large), k-hat and the ESS come from a running
    top-(M+1) and running sums across chunks; they equal ArviZ's psislw k-hat and the ESS of
    all the weights, kept in the other run, to 1e-10."""
    X, t = _ppca()
    pyro.set_rng_seed(4)
    kept = log_marginal_likelihood(_latent(t), X, num_particles=2048)
    monkeypatch.setattr(evaluation, "KEEP_LOG_WEIGHTS", 0)
    pyro.set_rng_seed(4)
    streamed = log_marginal_likelihood(_latent(t), X, num_particles=2048, chunk_size=256)
    assert streamed.log_weights is None
    assert any("largest weights per sequence" in m for m in streamed.messages)
    assert_close(streamed.khat, pareto_khat(kept.log_weights), atol=1e-10)
    assert_close(streamed.ess, kept.ess, atol=1e-8)
    assert_close(streamed.total, kept.total, atol=1e-10)


def test_per_sequence_beats_whole_trace_importance():
    """Local latents: one weight per particle for the whole data set (Pyro's Importance,
    log mean_s prod_n w_sn) degenerates with N, while the per-sequence log-mean-exp does not.
    Measured (N = 50, S = 2000, seed 0): per-sequence error -0.32 nats (SE 0.30),
    whole-trace error -38.9 nats (its best single particle alone: -31.3)."""
    X, t = _ppca(N=50)
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    est = log_marginal_likelihood(_latent(t), X, num_particles=2000)
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
    X, t = _ppca(w_scale=1.0, noise=0.5)  # a narrow posterior: the prior is a poor proposal
    model = _latent(t)
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    guide = _fit_autonormal(model, X)
    prior, _ = _quiet(log_marginal_likelihood, model, X, num_particles=2000)
    post = log_marginal_likelihood(model, X, num_particles=2000, guide=guide)
    assert post.trustworthy
    assert (post.ess > 5 * prior.ess).all(), (post.ess, prior.ess)
    assert post.stderr < prior.stderr / 5
    assert abs(float(post.total - exact)) < 4 * post.stderr + post.stderr**2 / 2
    assert any("AutoNormal" in m for m in post.messages)


def test_bad_proposal_warns_and_is_flagged():
    """A guide far too narrow and off-centre: heavy-tailed weights, k-hat far above the
    threshold, a UserWarning and trustworthy=False (never silently)."""
    X, t = _ppca()
    N = X.shape[0]

    def bad_guide(X):
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(torch.full((2,), 1.5), 0.05).to_event(1))

    with pytest.warns(UserWarning, match=r"Pareto k-hat up to .* \(threshold 0\.67"):
        est = log_marginal_likelihood(_latent(t), X, num_particles=1000, guide=bad_guide)
    assert not est.trustworthy
    assert (est.khat > est.khat_threshold).sum() >= N // 2
    assert any(m.startswith("UNRELIABLE") for m in est.messages)
    assert "NOT TRUSTWORTHY" in str(est)


def test_importance_on_enumerated_model_has_exact_weights():
    """No continuous latents: every per-sequence weight is p(x_n) itself (enumeration inside
    the weight), so importance equals exact with zero spread."""
    weights = torch.tensor([0.2, 0.3, 0.5])
    locs, scale = torch.randn(3, 4), torch.tensor(0.8)
    X = torch.randn(6, 4)
    est = log_marginal_likelihood(
        gaussian_mixture, X, 3, weights, locs, scale, method="importance", num_particles=64
    )
    assert_close(est.total, gaussian_mixture_log_marginal(X, weights, locs, scale), atol=1e-8)
    assert_close(est.ess, torch.full((6,), 64.0), atol=1e-8)
    assert est.trustworthy and (est.khat == -math.inf).all()


def _mixed_model(X, weights, locs, W, sigma):
    """A mixture whose components share a 1-D latent factor: c_n enumerated, z_n continuous,
    x_n | c, z ~ N(locs_c + W z, sigma^2 I)."""
    with pyro.plate("data", X.shape[0]):
        c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(locs[c] + z @ W.T, sigma).to_event(1), obs=X)


def _mixed_exact(X, weights, locs, W, sigma):
    T = X.shape[-1]
    comp = dist.LowRankMultivariateNormal(locs, W, (sigma**2).expand(T)).log_prob(X[:, None])
    return torch.logsumexp(comp + weights.log(), -1)  # (N,)


def test_enumerated_and_continuous_latents():
    """Enumerated c summed out inside each weight (tensor variable elimination with the
    particle plate kept) and z on a grid or drawn: both match the closed form (a mixture of
    low-rank Gaussians)."""
    weights = torch.tensor([0.3, 0.7])
    locs, W, sigma = torch.randn(2, 4), 0.7 * torch.randn(4, 1), torch.tensor(0.9)
    X = torch.randn(5, 4)
    expected = _mixed_exact(X, weights, locs, W, sigma)
    args = (X, weights, locs, W, sigma)
    quad = log_marginal_likelihood(
        _mixed_model,
        *args,
        method="quadrature",
        quadrature_points=200,
        quadrature_bounds=(-8.0, 8.0),
    )
    assert_close(quad.per_sequence, expected, atol=1e-8)
    imp = log_marginal_likelihood(_mixed_model, *args, num_particles=20_000, chunk_size=5000)
    assert imp.method == "importance" and imp.trustworthy
    gap = (imp.per_sequence - expected).abs()
    se = imp.per_sequence_stderr
    assert (gap < 4 * se + se**2 / 2).all()


# ----------------------------------------------------------------------------------------
# quadrature
# ----------------------------------------------------------------------------------------


def test_quadrature_2d_latent_matches_collapsed_exact():
    X, t = _ppca(N=8, T=5, w_scale=1.0, noise=0.5)
    est = log_marginal_likelihood(
        _latent(t), X, method="quadrature", quadrature_points=80, quadrature_bounds=(-7.0, 7.0)
    )
    assert est.method == "quadrature" and est.num_particles == 6400 and est.trustworthy
    assert est.ess is None and est.khat is None and est.stderr == 0.0
    assert_close(est.per_sequence, _per_row_exact(X, t), atol=1e-6)


def test_quadrature_with_token_plate_bayesian_linear_regression():
    """A global 2-D weight vector, the data points as tokens of one sequence."""
    features = torch.randn(12, 2)
    y = features @ torch.tensor([0.8, -0.5]) + 0.5 * torch.randn(12)
    est = log_marginal_likelihood(
        bayesian_linear_regression_latent,
        y,
        features,
        method="quadrature",
        token_plate="data",
        quadrature_points=120,
        quadrature_bounds=(-6.0, 6.0),
    )
    assert est.per_sequence.shape == (1,)
    assert_close(est.total, bayesian_linear_regression_log_marginal(y, features), atol=1e-6)


def test_quadrature_warns_when_the_grid_cuts_off_mass():
    X, t = _ppca(N=4)
    with pytest.warns(UserWarning, match="outer cells of the quadrature grid"):
        est = log_marginal_likelihood(
            _latent(t),
            X,
            method="quadrature",
            quadrature_points=10,
            quadrature_bounds=(-0.5, 0.5),
        )
    assert not est.trustworthy


def test_quadrature_rejects_high_dimensional_latents():
    X, t = _ppca(K=4)
    t["W"] = torch.randn(4, 4)
    with pytest.raises(ValueError, match="total dimension 4 per sequence"):
        log_marginal_likelihood(
            lambda X: ppca_latent(X, 4, t["W"], t["loc"], t["noise_scale"]),
            X,
            method="quadrature",
        )


# ----------------------------------------------------------------------------------------
# input checks, progress, summary
# ----------------------------------------------------------------------------------------


def test_unknown_method_lists_valid_ones():
    X, t = _ppca()
    with pytest.raises(
        ValueError,
        match=r"unknown method 'mcmc'; valid methods are "
        r"\['auto', 'exact', 'importance', 'quadrature'\]",
    ):
        log_marginal_likelihood(_latent(t), X, method="mcmc")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1, got 0"),
        ({"num_particles": 0}, "num_particles must be an integer >= 1, got 0"),
        ({"num_particles": 2.5}, "num_particles must be an integer >= 1, got 2.5"),
        ({"max_elements": -1}, "max_elements must be an integer >= 1"),
        ({"compile": "fast"}, "unknown compile='fast'"),
    ],
)
def test_bad_sizes(kwargs, match):
    X, t = _ppca()
    with pytest.raises(ValueError, match=match):
        log_marginal_likelihood(_latent(t), X, **kwargs)


def test_bad_progress_type():
    X, t = _ppca()
    with pytest.raises(TypeError, match="progress must be None, True or False"):
        log_marginal_likelihood(_latent(t), X, progress="yes")


def test_guide_with_wrong_sites():
    X, t = _ppca()
    N = X.shape[0]

    def guide(X):
        with pyro.plate("data", N):
            pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(
        ValueError,
        match=r"does not sample the model's latent site\(s\) \['z'\]; it samples site\(s\) "
        r"\['w'\] that are not latent in the model",
    ):
        log_marginal_likelihood(_latent(t), X, guide=guide)


def test_guide_shared_by_all_sequences_is_rejected():
    X, t = _ppca()
    guide = AutoDiagonalNormal(_latent(t))
    with pytest.raises(
        ValueError,
        match=r"guide site '_AutoDiagonalNormal_latent' is not "
        r"inside the sequence plate\(s\) \['data'\]",
    ):
        log_marginal_likelihood(_latent(t), X, guide=guide)


def test_progress_bar_and_str(capsys):
    X, t = _ppca()
    est = log_marginal_likelihood(_latent(t), X, num_particles=512, chunk_size=128, progress=True)
    err = capsys.readouterr().err
    assert "chunk" in err  # tqdm wrote its bar to stderr
    assert str(est).startswith("log p(x) = ") and "importance, S=512" in str(est)
    est = log_marginal_likelihood(_latent(t), X, num_particles=512, chunk_size=128)
    assert capsys.readouterr().err == ""  # not a terminal: no bar by default


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["graph", "log_prob"])
def test_compiled_chunks_agree_with_exact(mode):
    """torch.compile of the chunks (CPU inductor here): statistically the same estimate."""
    X, t = _ppca()
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    est = log_marginal_likelihood(
        _latent(t), X, num_particles=40_000, chunk_size=8192, compile=mode
    )
    assert any(m.startswith(f"compile='{mode}':") for m in est.messages), est.messages
    assert abs(float(est.total - exact)) < 4 * est.stderr + est.stderr**2 / 2


@pytest.mark.slow
def test_compiled_graph_is_reused_only_while_it_reproduces_the_model():
    """A captured chunk graph holds the model's tensors by reference: a second call reuses
    it (also with another number of particles), also after a parameter changed in place (and stays right), and a parameter rebound
    to another tensor makes it fail the fresh-draw check, so the chunk is captured anew."""
    X, t = _ppca()
    params = {"W": t["W"].clone()}

    def model(X):
        ppca_latent(X, 2, params["W"], t["loc"], t["noise_scale"])

    def run(num_particles=4096):
        est = log_marginal_likelihood(
            model, X, num_particles=num_particles, chunk_size=1024, compile="graph"
        )
        exact = ppca_log_marginal(X, params["W"], t["loc"], t["noise_scale"])
        assert abs(float(est.total - exact)) < 4 * est.stderr + est.stderr**2 / 2
        return [m for m in est.messages if m.startswith("compile=")][-1]

    assert "captured by make_fx" in run()
    assert "reused from an earlier call" in run()
    # another particle count, same chunk shape: the graph (and the compiled code) carries over
    assert "reused from an earlier call" in run(num_particles=6144)
    params["W"].mul_(1.5)
    assert "reused from an earlier call" in run()
    params["W"] = params["W"] / 2
    assert "captured by make_fx" in run()


@pytest.mark.gpu
@requires_cuda
def test_importance_on_cuda():
    X, t = _ppca()
    X = X.cuda()
    t = {k: v.cuda() for k, v in t.items()}
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    est = log_marginal_likelihood(_latent(t), X, num_particles=2**16, chunk_size=2**14)
    assert est.device.type == "cuda"
    for value in (est.total, est.per_sequence, est.per_sequence_stderr, est.ess, est.khat):
        assert value.device.type == "cuda"
    assert est.log_weights.device.type == "cuda"
    assert abs(float(est.total - exact)) < 4 * est.stderr + est.stderr**2 / 2


@pytest.mark.gpu
@requires_cuda
def test_compiled_graph_on_cuda():
    """compile='graph' on CUDA: captured, checked against the eager chunk on a fresh draw,
    compiled (the latent matrix product unrolled into the likelihood reduction), and the
    estimate within its standard error of the exact value."""
    X, t = _ppca()
    X = X.cuda()
    t = {k: v.cuda() for k, v in t.items()}
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    est = log_marginal_likelihood(
        _latent(t), X, num_particles=2**16, chunk_size=2**13, compile="graph"
    )
    how = [m for m in est.messages if m.startswith("compile=")][-1]
    assert "captured by make_fx" in how and "unrolled" in how, how
    assert est.total.device.type == "cuda" and est.khat.device.type == "cuda"
    assert abs(float(est.total - exact)) < 4 * est.stderr + est.stderr**2 / 2

"""Linear-Gaussian models written as Pyro's tutorials write them (a Kalman filter with
pyro.markov, PPCA with an explicit z, Bayesian linear regression, eight schools with a fixed
tau): "auto" finds them, and the reference, MaskedELBO's chain and stratified estimates and
their gradients agree with the exact values computed without pyro_mpt. Models that are not
linear-Gaussian are not detected, and say why."""

import logging
import re
import warnings

import pyro
import pytest
import torch

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals import LinearGaussianConditionals, get_conditionals
from pyro_mpt.conditionals.affine import compile_linear_gaussian
from pyro_mpt.reference import log_marginal_likelihood
from pyro_mpt.tokens import read_layout
from pyro_mpt.tokens.checks import trace_model
from tests.conftest import assert_close
from tests.zoo import linear_gaussian_models as zoo

#: relative tolerance of every exact comparison (float64 arithmetic, T <= 12 tokens)
RTOL = 1e-6


def _kalman():
    y = zoo.kalman_data()
    return zoo.kalman, (y,), {}, lambda: zoo.kalman_log_likelihood(y, *zoo.kalman_params())


def _ppca():
    X = zoo.ppca_data()

    def exact():
        store = pyro.get_param_store()
        return zoo.ppca_log_likelihood(X, store["W"], store["mu"], store["sigma"])

    return zoo.ppca, (X,), {}, exact


def _blr():
    X, y = zoo.blr_data()
    return zoo.blr, (X, y), {"token_plate": "data"}, lambda: zoo.blr_log_likelihood(X, y)


def _schools():
    s, y = zoo.SCHOOLS_SIGMA, zoo.SCHOOLS_Y
    exact = lambda: zoo.eight_schools_log_likelihood(s, y)  # noqa: E731
    return zoo.eight_schools, (s, y), {"token_plate": "schools"}, exact


def _factor_mvn():
    X = zoo.ppca_data()

    def exact():
        store = pyro.get_param_store()
        return zoo.factor_model_mvn_log_likelihood(X, store["W"], store["mu"])

    return zoo.factor_model_mvn, (X,), {}, exact


CASES = {
    "kalman": _kalman,
    "ppca": _ppca,
    "blr": _blr,
    "eight_schools": _schools,
    "factor_mvn": _factor_mvn,
}


def _case(name):
    model, args, kwargs, exact = CASES[name]()
    model(*args)  # creates the model's params, so that the exact value can read them
    return model, args, kwargs, exact


@pytest.mark.parametrize("name", CASES)
def test_auto_reference_is_gaussian_and_exact(name):
    model, args, kwargs, exact = _case(name)
    ref = log_marginal_likelihood(model, *args, **kwargs)
    assert ref.method == "gaussian" and ref.trustworthy and ref.stderr == 0.0
    assert "method='auto' chose 'gaussian'" in ref.messages[0]
    expected = exact()
    assert_close(ref.per_sequence, expected.reshape(-1), atol=0.0, rtol=RTOL)
    assert_close(ref.total, expected.sum(), atol=0.0, rtol=RTOL)


@pytest.mark.parametrize("name", CASES)
def test_masked_elbo_chain_is_exact(name, caplog):
    model, args, kwargs, exact = _case(name)
    with caplog.at_level(logging.INFO, logger="pyro_mpt"):
        est = MaskedELBO(estimator="chain", **kwargs).estimate(model, None, *args)
    assert est.conditionals == "linear_gaussian"
    assert any("joint is Gaussian" in r.getMessage() for r in caplog.records)
    assert_close(est.total, exact().sum(), atol=0.0, rtol=RTOL)
    with torch.no_grad():  # the affine map is found by autograd even under no_grad
        quiet = MaskedELBO(estimator="chain", **kwargs).estimate(model, None, *args)
    assert_close(quiet.total, exact().sum(), atol=0.0, rtol=RTOL)


@pytest.mark.parametrize("name", CASES)
def test_masked_elbo_stratified_within_four_standard_errors(name):
    """Stratified MPT is unbiased for log p(x): 32 mask draws (seed 0 from the conftest)
    land within 4 of their standard errors of the exact value."""
    model, args, kwargs, exact = _case(name)
    est = MaskedELBO(estimator="stratified", num_masks=32, **kwargs).estimate(model, None, *args)
    assert est.conditionals == "linear_gaussian"
    assert 0 < est.stderr < 5.0
    gap = float(est.total.detach() - exact().sum().detach())
    assert abs(gap) < 4 * est.stderr, (gap, est.stderr)


@pytest.mark.parametrize("name", ["kalman", "ppca", "factor_mvn"])
def test_gradients_equal_the_exact_gradients(name):
    """The chain loss's gradients in the model's params (through the autograd-found affine
    map) are the exact log-likelihood's, to 1e-6 relative."""
    model, args, kwargs, exact = _case(name)
    store = pyro.get_param_store()
    leaves = [store[n].unconstrained() for n in sorted(store.keys())]
    loss = MaskedELBO(estimator="chain", **kwargs).differentiable_loss(model, None, *args)
    grads = torch.autograd.grad(loss, leaves)
    expected = torch.autograd.grad(-exact().sum(), leaves)
    for g, e in zip(grads, expected):
        assert_close(g, e, atol=1e-9, rtol=RTOL)
    ref = log_marginal_likelihood(model, *args, **kwargs)  # the reference is differentiable
    ref_grads = torch.autograd.grad(-ref.total, leaves)
    for g, e in zip(ref_grads, expected):
        assert_close(g, e, atol=1e-9, rtol=RTOL)


def test_kernels_low_rank_when_noise_is_diagonal_and_short():
    """PPCA (K = 2 noise dims < 5 tokens, diagonal noise): Woodbury; eight schools (9 noise
    dims > 8 tokens): dense."""
    for name, kind in [("ppca", "LowRankGaussianKernel"), ("eight_schools", "DenseGaussian")]:
        model, args, kwargs, _ = _case(name)
        ref = log_marginal_likelihood(model, *args, **kwargs)
        assert kind in ref.messages[1]


def test_the_check_leaves_the_global_random_stream_alone():
    model, args, kwargs, _ = _case("kalman")
    trace = trace_model(model, args, kwargs)
    layout = read_layout(trace)
    state = torch.get_rng_state()
    compiled = compile_linear_gaussian(model, args, kwargs, layout, trace, 10**6)
    assert torch.equal(state, torch.get_rng_state())
    assert compiled.factor.shape == (3, 8, 16)  # N, T, 2 state dims x 8 steps


def test_too_large_for_a_dense_covariance_is_refused_not_used():
    model, args, kwargs, exact = _case("kalman")
    with pytest.raises(ValueError, match=r"method='gaussian' cannot .* over max_elements=50"):
        log_marginal_likelihood(model, *args, method="gaussian", max_elements=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # prior IS on 8 steps is poor
        ref = log_marginal_likelihood(model, *args, max_elements=50, num_samples=64)
    assert ref.method == "importance"
    assert "Markov-structured route" in ref.messages[0]


# ----------------------------------------------------------------------------------------
# Not linear-Gaussian: not detected, with the reason
# ----------------------------------------------------------------------------------------

X4 = torch.tensor([[0.3, -0.2, 0.1], [1.2, 0.8, 1.0], [-0.5, -0.9, -0.2], [0.0, 0.4, -0.1]])

NEGATIVE = {
    "random_tau": (
        zoo.eight_schools_random_tau,
        (zoo.SCHOOLS_SIGMA, zoo.SCHOOLS_Y),
        {"token_plate": "schools"},
        r"latent site 'tau' is a HalfCauchy, not a Normal",
    ),
    "gamma_scale": (zoo.gamma_scale, (X4,), {}, r"latent site 'prec' is a Gamma, not a Normal"),
    "nonlinear_mean": (zoo.nonlinear_mean, (X4,), {}, r"not affine in the latents"),
    "latent_scale": (zoo.latent_scale, (X4,), {}, r"not affine in the latents"),
    "ar_observations": (
        zoo.ar_observations,
        (X4,),
        {},
        r"depends on the observed value of 'y_0' \(observations that are parents",
    ),
    "poutine_mask": (
        zoo.masked_ppca,
        (X4, torch.tensor([True, False, True, True])),
        {},
        r"observed site 'x' is masked \(poutine.mask or obs_mask\)",
    ),
    "poutine_scale": (zoo.scaled_prior, (X4,), {}, r"latent site 'z' has scale 0.5"),
}


@pytest.mark.parametrize("name", NEGATIVE)
def test_not_linear_gaussian_is_not_detected(name, caplog):
    model, args, kwargs, reason = NEGATIVE[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # importance diagnostics
        ref = log_marginal_likelihood(model, *args, num_samples=200, **kwargs)
    assert ref.method == "importance"
    assert "chose 'importance'" in ref.messages[0]
    assert re.search(reason, ref.messages[0])
    with caplog.at_level(logging.INFO, logger="pyro_mpt"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 16 draws: degenerate-weight warning
        est = MaskedELBO(num_samples=16, **kwargs).estimate(model, None, *args)
    assert est.conditionals == "importance"
    assert any("not linear-Gaussian" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=f"method='gaussian' cannot integrate.*{reason}"):
        log_marginal_likelihood(model, *args, method="gaussian", **kwargs)
    with pytest.raises(ValueError, match=f"conditionals='linear_gaussian' cannot.*{reason}"):
        MaskedELBO(conditionals="linear_gaussian", **kwargs).estimate(model, None, *args)


def test_backend_registry_and_options():
    model, args, kwargs, _ = _case("ppca")
    layout = read_layout(trace_model(model, args, kwargs))
    backend = get_conditionals("linear_gaussian", layout, max_elements=1234)
    assert isinstance(backend, LinearGaussianConditionals) and backend.max_elements == 1234
    with pytest.raises(ValueError, match="max_elements"):
        LinearGaussianConditionals(max_elements=0)


def test_subsampled_rows_are_the_same_in_every_run():
    """The affine map is found from several runs of the model: each must see the rows of
    the trace the estimate is for, scaled N / B as Pyro scales them."""
    X = zoo.ppca_data(N=8)
    offsets = torch.arange(8.0).unsqueeze(-1).expand(8, 5)
    pyro.set_rng_seed(5)
    trace = pyro.poutine.trace(zoo.ppca_subsampled).get_trace(X, offsets)
    idx = trace.nodes["data"]["value"]
    pyro.set_rng_seed(5)
    ref = log_marginal_likelihood(zoo.ppca_subsampled, X, offsets)
    assert ref.method == "gaussian"
    W = pyro.param("W")
    rows = zoo.ppca_log_likelihood(X[idx], W, offsets[idx], torch.tensor(0.7))
    assert_close(ref.per_sequence, rows, atol=0.0, rtol=RTOL)
    assert_close(ref.total, 8 / 3 * rows.sum(), atol=0.0, rtol=RTOL)


def _kernel(model, *args):
    from pyro_mpt.scoring import MPTOptions, prepare

    return prepare(model, args, {}, MPTOptions())[1].kernels[0][1]


def test_one_kernel_for_all_sequences_only_where_the_gradient_allows_it():
    """PPCA's W and sigma enter every row alike: one (T, K) factor serves all rows, with
    gradients still exact. Per-row noise scales with equal values are distinct parameters:
    each row keeps its own, and each gets its own gradient."""
    X = zoo.ppca_data()
    zoo.ppca(X)
    assert _kernel(zoo.ppca, X).W.dim() == 2
    pyro.clear_param_store()
    zoo.ppca_row_noise(X)
    assert _kernel(zoo.ppca_row_noise, X).W.dim() == 4  # (1, N, T, K)
    store = pyro.get_param_store()
    leaves = [store[n].unconstrained() for n in ("W", "sigma")]
    for estimator in ("chain", "stratified"):
        est = MaskedELBO(estimator=estimator, num_masks=2).estimate(zoo.ppca_row_noise, None, X)
        if estimator == "chain":
            grads = torch.autograd.grad(-est.total, leaves)
            W, sigma = store["W"], store["sigma"]
            exact = dist_row_noise(X, W, sigma)
            for g, e in zip(grads, torch.autograd.grad(-exact.sum(), leaves)):
                assert_close(g, e, atol=1e-9, rtol=RTOL)
        else:  # the rows' noise gradients differ, as the rows' data do
            g_sigma = torch.autograd.grad(-est.total, leaves[1])[0]
            assert float(g_sigma.std()) > 1e-3


def dist_row_noise(X, W, sigma):
    """``(N,)`` log N(x_n; 0, W W^T + sigma_n^2 I) without pyro_mpt."""
    T = X.shape[-1]
    cov = W @ W.T + sigma.pow(2)[:, None, None] * torch.eye(T)
    return torch.distributions.MultivariateNormal(torch.zeros(T), cov).log_prob(X)


@pytest.mark.parametrize("name", ["kalman", "eight_schools"])
def test_curve_area_within_four_standard_errors(name):
    """The curve S(m) of the linear-Gaussian backend integrates to log p(x)."""
    from pyro_mpt import mpt_curve

    model, args, kwargs, exact = _case(name)
    curve = mpt_curve(model, *args, num_masks=32, **kwargs)
    assert curve.conditionals == "linear_gaussian"
    gap = float(torch.as_tensor(curve.area).detach() - exact().sum().detach())
    assert abs(gap) < 4 * curve.area_stderr, (gap, curve.area_stderr)


def test_no_latents_and_float32_parameters_on_float64_data():
    """A model without latents (the collapsed PPCA of pyro_mpt.models, a plain Normal) is
    linear-Gaussian with an empty factor; float32 parameters on float64 data are promoted,
    as Pyro's log_prob promotes them. Exact values: the likelihood alone."""
    from pyro_mpt.models import ppca_collapsed, sample_ppca

    X = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def normal_model(x):
        with pyro.plate("n", x.shape[0]):
            pyro.sample("x", pyro.distributions.Normal(0.3, 2.0).expand([4]).to_event(1), obs=x)

    exact = float(torch.distributions.Normal(0.3, 2.0).log_prob(X).sum())
    lml = log_marginal_likelihood(normal_model, X, method="gaussian")
    assert abs(float(lml.total) - exact) < 1e-10
    chain = MaskedELBO(conditionals="linear_gaussian", estimator="chain").estimate(
        normal_model, None, X
    )
    assert abs(float(chain.total) - exact) < 1e-10
    Xp, t = sample_ppca(num_data=5, num_tokens=4, latent_dim=2, noise_scale=0.5)
    args = (Xp, 2, t["W"], t["loc"], t["noise_scale"])
    gaussian = log_marginal_likelihood(ppca_collapsed, *args, method="gaussian")
    dense = log_marginal_likelihood(ppca_collapsed, *args, method="exact")
    assert_close(gaussian.total, dense.total, rtol=RTOL, atol=0.0)


def test_low_rank_models_need_no_dense_budget():
    """PPCA with z (N=6, T=5, K=2, diagonal noise) is served by Woodbury: a budget that
    holds its Jacobian (T x 12 noise dimensions = 60 elements) but not an N x T x T
    covariance (150) still gives the exact value; below the Jacobian it is refused."""
    model, args, kwargs, exact = _case("ppca")
    lml = log_marginal_likelihood(model, *args, method="gaussian", max_elements=100)
    assert_close(lml.per_sequence, exact().reshape(-1), rtol=RTOL, atol=0.0)
    with pytest.raises(ValueError, match=r"need 60 elements .* over max_elements=50"):
        log_marginal_likelihood(model, *args, method="gaussian", max_elements=50)

"""Inputs that used to give a silently wrong or misleading number now give the right one
or say why not: float32 data (with float64 parameters, or an ill-conditioned covariance),
non-finite losses and references, an importance reference from too few draws, a guide
that MaskedELBO ignores, and ``num_masks`` beyond the memory budget."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_mpt import MaskedELBO, log_marginal_likelihood, mpt_curve
from pyro_mpt.models import ppca_collapsed, ppca_latent, ppca_log_marginal, sample_ppca
from pyro_mpt.reference.importance import MIN_SAMPLES
from tests.conftest import assert_close

N, T, K = 12, 5, 2


def _problem(noise=0.5, n=N, t=T, seed=0):
    X, truth = sample_ppca(n, t, K, noise, generator=torch.Generator().manual_seed(seed))
    return X, truth


# ----------------------------------------------------------------------------------------
# float32 data
# ----------------------------------------------------------------------------------------


def test_float32_data_with_float64_parameters_is_scored_in_float64():
    """Used to fail in index_add_ (Float vs Double); now promoted as log_prob promotes:
    the chain estimator with exact Gaussian conditionals equals the float64 closed form of
    the float32 data."""
    X, truth = _problem()
    X32 = X.float()
    exact = ppca_log_marginal(X32.double(), truth["W"], truth["loc"], truth["noise_scale"])
    loss = MaskedELBO(estimator="chain").loss(ppca_collapsed, None, X32, K, **truth)
    assert_close(-loss, exact, atol=1e-9, rtol=1e-12)
    curve = mpt_curve(ppca_collapsed, X32, K, exhaustive=True, **truth)
    assert curve.area.dtype == torch.float64
    assert_close(curve.area, exact, atol=1e-9, rtol=1e-12)


def test_float32_exact_reference_of_ill_conditioned_gaussian_is_computed_in_float64():
    """Noise 1e-3: float32 arithmetic put the exact reference 24 nats off (1386.9 against
    1411.4). It is now computed in float64 and cast back to float32 (error below 1e-3)."""
    X, truth = _problem(noise=1e-3, n=50, t=8)
    exact = ppca_log_marginal(X, truth["W"], truth["loc"], truth["noise_scale"])
    args32 = {k: v.float() for k, v in truth.items()}
    ref = log_marginal_likelihood(ppca_collapsed, X.float(), K, **args32)
    assert ref.total.dtype == torch.float32 and ref.per_sequence.dtype == torch.float32
    assert_close(ref.total, exact, atol=1e-3, rtol=1e-6)
    assert any("computed in float64 from the torch.float32 data" in m for m in ref.messages)


def test_float32_exact_reference_stays_differentiable():
    X, truth = _problem()
    W = truth["W"].float().requires_grad_()
    ref = log_marginal_likelihood(
        ppca_collapsed, X.float(), K, W, truth["loc"].float(), truth["noise_scale"].float()
    )
    ref.total.backward()
    assert W.grad is not None and W.grad.dtype == torch.float32
    assert torch.isfinite(W.grad).all()


def test_float32_exact_reference_says_when_the_model_cannot_run_in_float64():
    """A model with a float32 constant cannot run on float64 data: the value is then the
    float32 one, and the messages say so."""

    def model(x):
        rotate = torch.eye(x.shape[-1], dtype=torch.float32)
        zeros = torch.zeros(x.shape[-1], dtype=torch.float32)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(zeros, zeros + 1).to_event(1), obs=x @ rotate)

    X = _problem()[0].float()
    ref = log_marginal_likelihood(model, X)
    expected = dist.Normal(0.0, 1.0).log_prob(X.double()).sum()
    assert_close(ref.total, expected, atol=1e-3, rtol=1e-6)
    assert any("computed in torch.float32: the model failed in float64" in m for m in ref.messages)


# ----------------------------------------------------------------------------------------
# Non-finite values
# ----------------------------------------------------------------------------------------


def _shifted(x, loc):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0).expand([x.shape[-1]]).to_event(1), obs=x)


@pytest.mark.parametrize("call", ["loss", "estimate"])
def test_nonfinite_loss_warns_naming_the_site(call):
    X = _problem()[0]
    elbo = MaskedELBO()
    with pytest.warns(UserWarning, match=r"is nan: the observed site\(s\) 'x' \(12 of 12"):
        value = getattr(elbo, call)(_shifted, None, X, torch.tensor(math.inf))
    total = value if call == "loss" else float(value.total)
    assert math.isnan(total)


def test_finite_loss_does_not_warn():
    X = _problem()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(MaskedELBO().loss(_shifted, None, X, torch.tensor(0.3)))


def test_nonfinite_exact_reference_is_flagged_naming_the_site():
    X = _problem()[0]
    with pytest.warns(UserWarning, match=r"UNRELIABLE: the exact log p\(X\) is -inf.*'x'"):
        ref = log_marginal_likelihood(_shifted, X, torch.tensor(math.inf))
    assert not ref.trustworthy
    assert "NOT TRUSTWORTHY" in str(ref)


# ----------------------------------------------------------------------------------------
# Importance sampling with too few draws
# ----------------------------------------------------------------------------------------


def _too_few(messages):
    return [m for m in messages if "is below 100" in m]


@pytest.mark.parametrize("S", [1, 2, 10, MIN_SAMPLES - 1])
def test_importance_reference_below_minimum_draws_is_not_trustworthy(S):
    """num_samples=1 was reported trustworthy (the ESS of one draw is 1, its k-hat -inf)
    though it is tens of nats off."""
    X, truth = _problem()
    with pytest.warns(UserWarning) as caught:  # k-hat may fail too
        ref = log_marginal_likelihood(
            ppca_latent, X, K, **truth, num_samples=S, method="importance"
        )
    assert any(f"num_samples={S} is below 100" in str(w.message) for w in caught)
    assert not ref.trustworthy
    assert len(_too_few(ref.messages)) == 1
    assert "NOT TRUSTWORTHY" in str(ref)


def test_importance_reference_at_minimum_draws_is_not_flagged_for_the_count():
    X, truth = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # other diagnostics may still fail
        ref = log_marginal_likelihood(
            ppca_latent, X, K, **truth, num_samples=MIN_SAMPLES, method="importance"
        )
    assert _too_few(ref.messages) == []


# ----------------------------------------------------------------------------------------
# An ignored guide
# ----------------------------------------------------------------------------------------


def _guide(X, *args, **kwargs):
    pyro.param("guide_loc", torch.zeros(3))


def test_guide_passed_to_svi_warns_once_per_elbo():
    X = _problem()[0]
    elbo = MaskedELBO()
    svi = SVI(lambda X: ppca_collapsed(X, K), _guide, Adam({"lr": 0.01}), loss=elbo)
    with pytest.warns(UserWarning) as caught:
        for _ in range(3):
            svi.step(X)
        svi.evaluate_loss(X)
    ignored = [w for w in caught if "MaskedELBO ignores the guide _guide" in str(w.message)]
    assert len(ignored) == 1 and len(caught) == 1
    assert "parameters are never created" in str(ignored[0].message)
    assert "guide_loc" not in pyro.get_param_store().keys()
    with pytest.warns(UserWarning, match="ignores the guide"):
        MaskedELBO().loss(lambda X: ppca_collapsed(X, K), _guide, X)


@pytest.mark.parametrize("guide", [None, lambda *args, **kwargs: None])
def test_inert_guide_does_not_warn(guide):
    X = _problem()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskedELBO().loss(lambda X: ppca_collapsed(X, K), guide, X)


# ----------------------------------------------------------------------------------------
# num_masks and the memory budget
# ----------------------------------------------------------------------------------------


def test_num_masks_at_the_memory_budget_runs_and_above_it_is_refused():
    """The draws are a (num_masks, N) tensor: num_masks * N <= max_elements runs;
    one more draw is refused before anything is allocated."""
    X, truth = _problem()
    budget = 4 * N
    est = MaskedELBO(num_masks=4, max_elements=budget).estimate(ppca_collapsed, None, X, K, **truth)
    assert est.draws.shape == (4, N)
    with pytest.raises(ValueError, match=r"num_masks=5 needs 60 elements .* above max_elements=48"):
        MaskedELBO(num_masks=5, max_elements=budget).estimate(ppca_collapsed, None, X, K, **truth)


def test_huge_num_masks_is_refused_naming_the_memory():
    X, truth = _problem()
    with pytest.raises(ValueError, match=r"num_masks=1000000000 needs 1\.2e\+10 elements \(96 GB"):
        MaskedELBO(num_masks=10**9).loss(ppca_collapsed, None, X, K, **truth)

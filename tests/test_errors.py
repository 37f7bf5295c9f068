"""Bad input gives clear errors, through ``MaskedELBO`` (construction and scoring) and
through ``mpt_curve``: each message names what is wrong (the option and its valid values,
the site, the plate) and, where there is one, the fix."""

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import MaskedELBO, mpt_curve
from pyro_mpt.estimators import MAX_EXHAUSTIVE_TOKENS
from pyro_mpt.models import (
    bayesian_linear_regression_latent,
    bayesian_linear_regression_log_marginal,
    ppca_collapsed,
    ppca_latent,
    sample_ppca,
)
from tests.conftest import assert_close

VALID_ESTIMATORS = ["chain", "exhaustive", "fixed", "stratified", "uniform"]
VALID_CONDITIONALS = ["auto", "enumerate", "gaussian", "importance", "mixed", "quadrature"]


def _X(N=12, T=5):
    X, _ = sample_ppca(N, T, 2, 0.5, generator=torch.Generator().manual_seed(0))
    return X


def _ppca(X):
    ppca_collapsed(X, 2)


def _loss(model, *args, **options):
    return MaskedELBO(**options).loss(model, None, *args)


def _curve(model, *args, **options):
    return mpt_curve(model, *args, **options)


# Both entry points: ``MaskedELBO(**options).loss(model, None, *args)`` and
# ``mpt_curve(model, *args, **options)``.
ENTRY_POINTS = pytest.mark.parametrize("entry", [_loss, _curve], ids=["MaskedELBO", "mpt_curve"])


def _lists_all(names):
    """A regex matching a message that lists every name in ``names``, in any order."""
    return "".join(f"(?=.*'{re.escape(n)}')" for n in names)


# ----------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["foo", "Stratified", "cumulative"])
def test_unknown_estimator_lists_valid_names(name):
    with pytest.raises(ValueError, match=f"unknown estimator '{name}'") as info:
        MaskedELBO(estimator=name)
    assert re.search(_lists_all(VALID_ESTIMATORS), str(info.value)), str(info.value)


@pytest.mark.parametrize("name", [None, 3])
def test_estimator_of_wrong_type(name):
    with pytest.raises((ValueError, TypeError), match="estimator"):
        MaskedELBO(estimator=name)


@ENTRY_POINTS
def test_unknown_conditionals_lists_valid_names(entry):
    with pytest.raises(ValueError, match="unknown conditionals 'exact'") as info:
        entry(_ppca, _X(), conditionals="exact")
    assert re.search(_lists_all(VALID_CONDITIONALS), str(info.value)), str(info.value)


@pytest.mark.parametrize("rate", [0, 0.0, 1.5, -0.1, float("nan"), float("inf")])
def test_mask_rate_outside_unit_interval(rate):
    with pytest.raises(ValueError, match=r"mask_rate must lie in \(0, 1\]"):
        MaskedELBO(estimator="fixed", mask_rate=rate)


@pytest.mark.parametrize("rate", [1e-9, 0.15, 1.0])
def test_mask_rate_inside_unit_interval_is_accepted(rate):
    X = _X()
    loss = MaskedELBO(estimator="fixed", mask_rate=rate).loss(_ppca, None, X)
    assert math.isfinite(loss)


def test_curve_fixed_rate_checks_rate():
    curve = mpt_curve(_ppca, _X())
    for rate in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"mask_rate must lie in \(0, 1\]"):
            curve.fixed_rate_estimate(rate)


@ENTRY_POINTS
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_num_masks_must_be_positive_int(entry, value):
    with pytest.raises((ValueError, TypeError), match="num_masks must be an integer >= 1"):
        entry(_ppca, _X(), num_masks=value)


@ENTRY_POINTS
@pytest.mark.parametrize("name", ["num_samples", "num_particles"])  # new name, deprecated alias
@pytest.mark.parametrize("value", [0, -5, 2.5])
def test_num_samples_must_be_positive_int(entry, name, value):
    with pytest.raises((ValueError, TypeError), match=f"{name} must be an integer >= 1"):
        entry(_ppca, _X(), **{name: value})


@pytest.mark.parametrize("option", ["quadrature_points", "max_elements"])
def test_other_counts_must_be_positive_int(option):
    with pytest.raises(ValueError, match=f"{option} must be an integer >= 1"):
        MaskedELBO(**{option: 0})


def test_quadrature_bounds_must_be_ordered():
    X = _X()
    with pytest.raises(ValueError, match="low < high"):
        MaskedELBO(conditionals="quadrature", quadrature_bounds=(1.0, -1.0)).loss(
            lambda X: ppca_latent(X, 1), None, X
        )


def test_token_plate_must_be_a_name():
    with pytest.raises(TypeError, match="token_plate must be a plate name"):
        MaskedELBO(token_plate=3)


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


@ENTRY_POINTS
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_observations_name_the_site(entry, bad):
    X = _X()
    X[3, 2] = bad
    X[5, 0] = bad
    with pytest.raises(ValueError, match="observed site 'x' holds 2 NaN or infinite"):
        entry(_ppca, X)


def test_non_finite_observations_in_second_site_named():
    X = _X()
    Y = torch.zeros(X.shape[0], 2)
    Y[0, 1] = float("nan")

    def model(X, Y):
        with pyro.plate("data", X.shape[0]):
            pyro.sample("first", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1), obs=X)
            pyro.sample("second", dist.Normal(0.0, 1.0).expand([2]).to_event(1), obs=Y)

    with pytest.raises(ValueError, match="observed site 'second'"):
        MaskedELBO().loss(model, None, X, Y)


# ----------------------------------------------------------------------------------------
# Model structure
# ----------------------------------------------------------------------------------------


def _no_observed(X):
    with pyro.plate("data", X.shape[0]):
        pyro.sample("z", dist.Normal(0.0, 1.0))


@ENTRY_POINTS
def test_model_without_observed_site(entry):
    with pytest.raises(ValueError, match="no observed sample site"):
        entry(_no_observed, _X())


def _dirichlet(X):
    with pyro.plate("data", X.shape[0]):
        pyro.sample("probs", dist.Dirichlet(torch.ones(X.shape[1])), obs=X.softmax(-1))


def _one_hot(X):
    values = torch.nn.functional.one_hot(torch.arange(X.shape[0]) % X.shape[1], X.shape[1])
    with pyro.plate("data", X.shape[0]):
        pyro.sample(
            "onehot", dist.OneHotCategorical(logits=torch.zeros(X.shape[1])), obs=values.double()
        )


@ENTRY_POINTS
@pytest.mark.parametrize(
    "model, site, family",
    [(_dirichlet, "probs", "Dirichlet"), (_one_hot, "onehot", "OneHotCategorical")],
    ids=["Dirichlet", "OneHotCategorical"],
)
def test_unsupported_observed_site_is_named(entry, model, site, family):
    with pytest.raises(ValueError, match=f"observed site '{site}' has a {family}") as info:
        entry(model, _X())
    # ... and says what is supported / how to mask instead
    assert "token_plate" in str(info.value)


def _undeclared_batch(X):
    pyro.sample("x", dist.Normal(0.0, 1.0), obs=X)  # (N, T) batch, no plate


def test_batch_dims_without_plate():
    with pytest.raises(ValueError, match="observed site 'x' has batch shape .* pyro.plate"):
        MaskedELBO().loss(_undeclared_batch, None, _X())


def _two_plates(X):
    with pyro.plate("rows", X.shape[0]):
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1), obs=X)
    with pyro.plate("other", 3):
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.zeros(3))


def test_observed_sites_in_different_plates():
    with pytest.raises(ValueError, match="'x'.*'y'.*different plates"):
        MaskedELBO().loss(_two_plates, None, _X())


def _blr_data(N=10, D=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, generator=g), torch.randn(N, D, generator=g)


@ENTRY_POINTS
def test_global_latent_without_token_plate(entry):
    """A global latent couples the data points: the message names the latent site and the
    plate, and suggests token_plate='data'."""
    y, features = _blr_data()
    with pytest.raises(ValueError, match="latent site 'w' is shared") as info:
        entry(bayesian_linear_regression_latent, y, features)
    message = str(info.value)
    assert "'data'" in message and "token_plate='data'" in message, message


@pytest.mark.parametrize(
    "options, atol",
    [
        (dict(conditionals="importance", num_samples=16384), 0.2),
        (dict(conditionals="quadrature", quadrature_points=80), 1e-4),
    ],
    ids=["importance", "quadrature"],
)
def test_reference_blr_latent_model_with_token_plate(options, atol):
    y, features = _blr_data()
    exact = bayesian_linear_regression_log_marginal(y, features).item()
    loss = MaskedELBO(estimator="chain", token_plate="data", **options).loss(
        bayesian_linear_regression_latent, None, y, features
    )
    assert_close(-loss, exact, atol=atol)


@ENTRY_POINTS
def test_token_plate_not_found_lists_plates(entry):
    with pytest.raises(ValueError, match="token_plate 'tokens' not found") as info:
        entry(_ppca, _X(), token_plate="tokens")
    assert "['data']" in str(info.value), str(info.value)


def test_token_plate_not_found_without_plates():
    y, features = _blr_data()
    from pyro_mpt.models import bayesian_linear_regression_collapsed

    with pytest.raises(ValueError, match=r"token_plate 'data' not found.*\(none\)"):
        MaskedELBO(token_plate="data").loss(bayesian_linear_regression_collapsed, None, y, features)


def test_subsampled_token_plate():
    X = _X()

    def model(X):
        with pyro.plate("data", X.shape[0], subsample_size=4) as i:
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=X[i, 0])

    with pytest.raises(ValueError, match="token_plate 'data' is subsampled"):
        MaskedELBO(token_plate="data").loss(model, None, X)


# ----------------------------------------------------------------------------------------
# Backend / model mismatches
# ----------------------------------------------------------------------------------------


def _ppca_latent2(X):
    ppca_latent(X, 2)


@ENTRY_POINTS
def test_gaussian_conditionals_with_latents(entry):
    with pytest.raises(
        ValueError, match=r"conditionals='gaussian' needs a model without latent.*\['z'\]"
    ):
        entry(_ppca_latent2, _X(), conditionals="gaussian")


@ENTRY_POINTS
def test_enumerate_with_continuous_latent(entry):
    with pytest.raises(ValueError, match=r"conditionals='enumerate'.*\['z'\].*not marked"):
        entry(_ppca_latent2, _X(), conditionals="enumerate")


@ENTRY_POINTS
@pytest.mark.parametrize("latent_dim", [4, 6])
def test_quadrature_with_latent_dim_above_three(entry, latent_dim):
    with pytest.raises(
        ValueError, match=rf"conditionals='quadrature'.*'z': {latent_dim}.*more than 3"
    ):
        entry(lambda X: ppca_latent(X, latent_dim), _X(), conditionals="quadrature")


def test_quadrature_with_three_latent_dims_is_accepted():
    loss = MaskedELBO(conditionals="quadrature", quadrature_points=6).loss(
        lambda X: ppca_latent(X, 3), None, _X()
    )
    assert math.isfinite(loss)


def test_quadrature_without_continuous_latent():
    with pytest.raises(ValueError, match="quadrature' needs a continuous latent"):
        MaskedELBO(conditionals="quadrature").loss(_ppca, None, _X())


def _discrete_latent(X):
    with pyro.plate("data", X.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(0.5))  # not marked for enumeration
        pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).to_event(1), obs=X)


@ENTRY_POINTS
@pytest.mark.parametrize("conditionals", ["importance", "auto", "quadrature"])
def test_non_enumerated_discrete_latent(entry, conditionals):
    with pytest.raises(
        ValueError, match="latent site 'c' \\(Bernoulli\\) cannot be reparameterised"
    ) as info:
        entry(_discrete_latent, _X(), conditionals=conditionals)
    assert "infer={'enumerate': 'parallel'}" in str(info.value)


# ----------------------------------------------------------------------------------------
# Exhaustive enumeration of masks
# ----------------------------------------------------------------------------------------


def test_exhaustive_curve_with_too_many_tokens():
    X = _X(N=3, T=MAX_EXHAUSTIVE_TOKENS + 1)
    with pytest.raises(
        ValueError,
        match=rf"T = {MAX_EXHAUSTIVE_TOKENS + 1} tokens is more than {MAX_EXHAUSTIVE_TOKENS}",
    ) as info:
        mpt_curve(_ppca, X, exhaustive=True)
    assert "stratified" in str(info.value)


def test_exhaustive_estimator_with_too_many_tokens():
    X = _X(N=3, T=MAX_EXHAUSTIVE_TOKENS + 1)
    with pytest.raises(ValueError, match="exhaustive estimator enumerates 2\\^T - 1 masks"):
        MaskedELBO(estimator="exhaustive").loss(_ppca, None, X)


def test_exhaustive_at_the_limit_is_accepted():
    X = _X(N=2, T=10)
    curve = mpt_curve(_ppca, X, exhaustive=True)
    assert curve.exhaustive and curve.area_stderr == 0.0

"""A guide as proposal (issue 13): bad guides and options are refused with errors naming
the site or option, the value and the fix."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals import ImportanceConditionals, SMCConditionals
from tests.test_guide_proposal import K, _data, _model

# ---------------------------------------------------------------------------------------


def _score(model, X, conditionals):
    return MaskedELBO(conditionals=conditionals, num_masks=1).loss(model, None, X)


def test_guide_missing_the_latent_site():
    X, truth, _ = _data()

    def guide(X):
        with pyro.plate("data", X.shape[0]):
            pyro.sample("w", dist.Normal(torch.zeros(K), 1.0).to_event(1))

    with pytest.raises(
        ValueError, match=r"does not sample the model's latent site\(s\) \['z'\].*AutoNormal"
    ):
        _score(_model(truth), X, ImportanceConditionals(16, proposal=guide))


def test_guide_with_the_wrong_event_shape():
    X, truth, _ = _data()

    def guide(X):
        with pyro.plate("data", X.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(K + 1), 1.0).to_event(1))

    with pytest.raises(
        ValueError, match=r"guide site 'z' draws values of shape \(10, 3\).*shape \(10, 2\)"
    ):
        _score(_model(truth), X, SMCConditionals(16, proposal=guide))


def test_guide_outside_the_data_plate():
    X, truth, _ = _data()

    def guide(X):
        pyro.sample("z", dist.Normal(torch.zeros(X.shape[0], K), 1.0).to_event(2))

    with pytest.raises(ValueError, match=r"guide site 'z' is not inside the sequence plate"):
        _score(_model(truth), X, ImportanceConditionals(16, proposal=guide))


def test_guide_with_another_auxiliary_site_needs_prior_fraction_zero():
    X, truth, _ = _data()

    def guide(X):
        with pyro.plate("data", X.shape[0]):
            u = pyro.sample(
                "u", dist.Normal(torch.zeros(K), 1.0).to_event(1), infer={"is_auxiliary": True}
            )
            pyro.sample("z", dist.Normal(u, 0.1).to_event(1))

    with pytest.raises(ValueError, match=r"auxiliary site\(s\) \['u'\].*prior_fraction=0"):
        _score(_model(truth), X, ImportanceConditionals(16, proposal=guide))


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, "half"])
def test_bad_prior_fraction(fraction):
    with pytest.raises(ValueError, match=r"prior_fraction must lie in"):
        ImportanceConditionals(16, proposal=lambda X: None, prior_fraction=fraction)


def test_proposal_must_be_callable():
    with pytest.raises(TypeError, match=r"proposal must be a callable Pyro guide.*'AutoNormal'"):
        SMCConditionals(16, proposal="AutoNormal")


def test_prior_fraction_without_a_guide():
    with pytest.raises(ValueError, match=r"prior_fraction=0.5 applies to a guide"):
        ImportanceConditionals(16, prior_fraction=0.5)


def test_enumerated_model_refuses_a_proposal():
    def model(X):
        with pyro.plate("data", X.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(c, 1.0))
            pyro.sample("x", dist.Normal(z[..., None] * torch.ones(3), 1.0).to_event(1), obs=X)

    def guide(X):
        with pyro.plate("data", X.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(X.shape[0]), 1.0))

    with pytest.raises(ValueError, match=r"site\(s\) \['c'\] are enumerated"):
        _score(model, torch.randn(4, 3), ImportanceConditionals(16, proposal=guide))


def test_guide_over_globals_and_locals_is_refused():
    # the model's global is a parameter (MaskedELBO integrates the locals only); a guide of
    # the Bayesian version also samples the global: refused, naming it
    X = torch.randn(5, 4)

    def bayesian(X):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", X.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z[..., None] * torch.ones(4), 0.5).to_event(1), obs=X)

    def model(X):
        mu = pyro.param("mu", torch.tensor(0.0))
        with pyro.plate("data", X.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z[..., None] * torch.ones(4), 0.5).to_event(1), obs=X)

    guide = AutoNormal(bayesian)
    with pytest.raises(
        ValueError, match=r"samples site\(s\) \['mu'\] that are not latent in the model"
    ):
        _score(model, X, ImportanceConditionals(16, proposal=guide))

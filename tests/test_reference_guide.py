"""Guide checks (pyro_mpt.reference.guide): a guide that cannot be the importance proposal
is refused with the reason, before any particle is drawn."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal

from pyro_mpt.models import gaussian_mixture
from pyro_mpt.reference import log_marginal_likelihood
from pyro_mpt.reference.guide import guide_sites
from tests.reference_data import latent_model, ppca_data


def test_guide_with_wrong_sites():
    X, t = ppca_data()
    N = X.shape[0]

    def guide(X):
        with pyro.plate("data", N):
            pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(
        ValueError,
        match=r"does not sample the model's latent site\(s\) \['z'\]; it samples site\(s\) "
        r"\['w'\] that are not latent in the model",
    ):
        log_marginal_likelihood(latent_model(t), X, guide=guide, method="importance")


def test_guide_shared_by_all_sequences_is_rejected():
    X, t = ppca_data()
    guide = AutoDiagonalNormal(latent_model(t))
    with pytest.raises(
        ValueError,
        match=r"guide site '_AutoDiagonalNormal_latent' is not "
        r"inside the sequence plate\(s\) \['data'\]",
    ):
        log_marginal_likelihood(latent_model(t), X, guide=guide, method="importance")


def test_point_mass_guide_is_rejected():
    X, t = ppca_data()
    guide = AutoDelta(latent_model(t))
    with pytest.raises(ValueError, match=r"guide site 'z' is a point mass \(Delta\)"):
        log_marginal_likelihood(latent_model(t), X, guide=guide, method="importance")


def test_guide_must_not_sample_enumerated_sites():
    weights, locs, scale = torch.tensor([0.4, 0.6]), torch.randn(2, 3), torch.tensor(1.0)
    X = torch.randn(4, 3)

    def guide(X, C, weights, locs, scale):
        with pyro.plate("data", X.shape[0]):
            pyro.sample("c", dist.Categorical(weights))

    with pytest.raises(ValueError, match=r"\['c'\] are enumerated in the model"):
        log_marginal_likelihood(
            gaussian_mixture, X, 2, weights, locs, scale, method="importance", guide=guide
        )


def test_guide_sites_are_the_sampled_ones():
    """AutoNormal samples an auxiliary '_unconstrained' site and the latent itself: both
    are sampled sites of its trace; the observed ones of a model are not."""
    X, t = ppca_data(N=3)
    guide = AutoNormal(latent_model(t))
    tr = pyro.poutine.trace(guide).get_trace(X)
    assert sorted(guide_sites(tr)) == ["z", "z_unconstrained"]
    model_tr = pyro.poutine.trace(latent_model(t)).get_trace(X)
    assert sorted(guide_sites(model_tr)) == ["z"]

"""The last obscure errors of issue 14 made clear: data on the meta device, and a
distribution parameter outside its support (Pyro's validation names the parameter, the
error now also names the site)."""

import pyro
import pytest
import torch

from pyro_mpt import MaskedELBO, log_marginal_likelihood, mpt_curve
from pyro_mpt.models import ppca_collapsed, ppca_latent, sample_ppca


@pytest.fixture
def data():
    return sample_ppca(5, 4, 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "call",
    [
        lambda X: MaskedELBO().estimate(ppca_collapsed, None, X, 2),
        lambda X: mpt_curve(ppca_collapsed, X, 2),
        lambda X: log_marginal_likelihood(ppca_collapsed, X, 2, progress=False),
    ],
    ids=["estimate", "curve", "reference"],
)
def test_meta_data_named(data, call):
    X, _ = data
    with pytest.raises(TypeError, match=r"argument 0 of the model .* 'meta' device.*'cpu'"):
        call(X.to("meta"))
    assert "W" not in pyro.get_param_store()  # a failing call leaves no new parameter


@pytest.mark.parametrize("noise", [0.0, -1.0, float("nan")])
def test_invalid_scale_names_the_site(data, noise):
    X, truth = data
    truth = dict(truth, noise_scale=torch.tensor(noise, dtype=X.dtype))
    with pytest.raises(ValueError, match=r"Normal at site 'x' got an invalid parameter.*scale"):
        log_marginal_likelihood(ppca_latent, X, 2, **truth, progress=False)
    with pytest.raises(ValueError, match=r"Normal at site 'x' got an invalid parameter.*scale"):
        MaskedELBO(conditionals="importance").estimate(ppca_latent, None, X, 2, **truth)

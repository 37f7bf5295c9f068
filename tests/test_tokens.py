r"""Tests of :mod:`pyro_mpt.tokens`: the token layout read off small models (token counts,
offsets, sequence shapes, subsampling scales, kinds) and its errors."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_mpt.models import hmm, ppca_collapsed
from pyro_mpt.tokens import read_layout
from tests.conftest import random_hmm_params


def _layout(model, *args, **kw):
    return read_layout(poutine.trace(model).get_trace(*args), **kw)


def _two_sites(X, Y):
    with pyro.plate("data", X.shape[0]):
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1), obs=X)
        pyro.sample("y", dist.Normal(0.0, 1.0).expand([Y.shape[1]]).to_event(1), obs=Y)


def test_pooled_sites_get_consecutive_offsets():
    X, Y = torch.zeros(5, 3), torch.zeros(5, 4)
    layout = _layout(_two_sites, X, Y)
    assert [(s.name, s.offset, s.num_tokens, s.kind) for s in layout.sites] == [
        ("x", 0, 3, "factorized"),
        ("y", 3, 4, "factorized"),
    ]
    assert layout.num_tokens == 7 and layout.seq_shape == (5,) and layout.num_sequences == 5
    assert layout.site_slice(layout.sites[1]) == slice(3, 7)
    assert layout.latents == [] and layout.max_plate_nesting == 1
    assert layout.dtype == torch.float64 and torch.equal(layout.scale, torch.ones(5))


def test_gaussian_event_is_one_sequence_of_tokens():
    X = torch.randn(4, 6)
    layout = _layout(ppca_collapsed, X, 2)
    assert layout.sites[0].kind == "lowrank" and layout.num_tokens == 6
    assert layout.num_sequences == 4


def test_token_plate_turns_the_data_points_into_tokens():
    def model(y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(w, 1.0), obs=y)

    y = torch.zeros(8)
    layout = _layout(model, y, token_plate="data")
    assert layout.num_tokens == 8 and layout.seq_shape == () and layout.num_sequences == 1
    assert layout.token_dim == -1 and layout.latents == ["w"]
    with pytest.raises(ValueError, match=r"latent site 'w'.*token_plate='data'"):
        _layout(model, y)


def test_subsampling_scale_is_full_size_over_batch_size():
    def model(X):
        with pyro.plate("data", 20, subsample=torch.arange(5)):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([3]).to_event(1), obs=X)

    layout = _layout(model, torch.zeros(5, 3))
    assert torch.equal(layout.scale, torch.full((5,), 4.0))


def test_integer_data_reads_the_log_density_dtype():
    init, trans, emit = random_hmm_params(2, 3)
    X = torch.zeros(3, 4, dtype=torch.long)
    layout = _layout(hmm, X, init, trans, emit)
    assert layout.dtype == torch.float64 and layout.num_tokens == 4 and layout.num_sequences == 3


def test_errors_name_the_site():
    with pytest.raises(ValueError, match="no observed sample site"):
        _layout(lambda: pyro.sample("z", dist.Normal(0.0, 1.0)))
    X = torch.zeros(5, 3)
    X[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"site 'x' holds 1 NaN"):
        _layout(_two_sites, X, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="token_plate 'points' not found"):
        _layout(_two_sites, torch.zeros(5, 3), torch.zeros(5, 2), token_plate="points")

    def subsampled(X):
        with pyro.plate("data", 20, subsample=torch.arange(5)):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=X)

    with pytest.raises(ValueError, match=r"subsampled \(5 of 20\)"):
        _layout(subsampled, torch.zeros(5), token_plate="data")

    def different_plates(X, Y):
        with pyro.plate("a", 5):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=X)
        with pyro.plate("b", 3):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=Y)

    with pytest.raises(ValueError, match="sit in different plates"):
        _layout(different_plates, torch.zeros(5), torch.zeros(3))

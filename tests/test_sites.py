r"""Tests of :mod:`pyro_mpt.conditionals.sites`: each observed site of a particle trace
becomes the kernel of its tokens, with the parameters read off the site's distribution
(compared here with the values the model was given) and flattened to ``(S, N, ...)``."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_mpt.conditionals.kernels import DenseGaussianKernel, LowRankGaussianKernel
from pyro_mpt.conditionals.particles import latent_log_prob, particle_trace
from pyro_mpt.conditionals.sites import build_kernels, site_token_log_probs
from pyro_mpt.tokens import read_layout
from tests.conftest import assert_close
from tests.test_particles import C, N, S, T, _mixture_model

F64 = dict(dtype=torch.float64)


def test_build_kernels_table_is_per_particle_log_density():
    """The factorized kernel's table, row c * S + s, is log N(x_nt; mu_ct + z_sn, 1)."""
    model, X, _, locs, layout = _mixture_model()
    pyro.set_rng_seed(2)
    tr = particle_trace(model, (X,), {}, layout, num_particles=S)
    parts = [(lp, 0) for lp in latent_log_prob(tr, ["c"], layout)]
    kernels, lead = build_kernels(tr, layout, parts)
    ((sl, kernel),) = kernels
    assert sl == slice(0, T) and lead == (C, S)
    z = tr.nodes["z"]["value"]  # (S, N)
    for k in range(C):
        for s in range(S):
            hand = dist.Normal(locs[k] + z[s].unsqueeze(-1), 1.0).log_prob(X)  # (N, T)
            assert_close(kernel.table[k * S + s], hand, atol=1e-12)
    table = site_token_log_probs(tr.nodes["x"], layout)  # (C, S, N, T): tokens last
    assert table.shape == (C, S, N, T)
    assert_close(table.reshape(C * S, N, T), kernel.table, atol=0.0)


def _gaussian_model(kind, a, W, D, cov):
    """z_n ~ N(0, 1), x_n | z_n ~ N(z_n a, W W^T + D) (low rank) or N(z_n a, cov) (dense)."""

    def model(X):
        with pyro.plate("data", X.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), **F64), 1.0))
            loc = z.unsqueeze(-1) * a
            if kind == "lowrank":
                fn = dist.LowRankMultivariateNormal(loc, W, D)
            else:
                fn = dist.MultivariateNormal(loc, cov)
            pyro.sample("x", fn, obs=X)

    return model


@pytest.mark.parametrize("kind", ["lowrank", "dense"])
def test_gaussian_site_keeps_shared_parameters(kind):
    """Parameters shared by particles and sequences stay unexpanded (W: (T, K), D: (T,),
    the covariance (T, T)) and equal the model's; the mean is flattened per particle:
    loc[s, n] = z[s, n] a."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(T, generator=gen, **F64)
    W = torch.randn(T, 2, generator=gen, **F64)
    D = torch.rand(T, generator=gen, **F64) + 0.5
    cov = W @ W.T + torch.diag(D)
    X = torch.randn(N, T, generator=gen, **F64)
    model = _gaussian_model(kind, a, W, D, cov)
    layout = read_layout(poutine.trace(model).get_trace(X))
    pyro.set_rng_seed(5)
    tr = particle_trace(model, (X,), {}, layout, num_particles=S)
    ((_, kernel),) = build_kernels(tr, layout)[0]
    z = tr.nodes["z"]["value"]  # (S, N)
    assert_close(kernel.loc, z.unsqueeze(-1) * a, atol=1e-12)
    assert_close(kernel.x, X, atol=0.0)
    if kind == "lowrank":
        assert type(kernel) is LowRankGaussianKernel and kernel.shared
        assert_close(kernel.W, W, atol=0.0)
        assert_close(kernel.D, D, atol=0.0)
    else:
        assert type(kernel) is DenseGaussianKernel
        assert kernel.cov.shape == (T, T)
        assert_close(kernel.cov, cov, atol=1e-12)


def test_gaussian_site_with_per_particle_covariance_is_flattened():
    """A covariance factor that depends on the particle (W_s = z_s W) is flattened to
    ``(S, N, T, K)``, row s holding z[s, n] W."""
    gen = torch.Generator().manual_seed(6)
    W = torch.randn(T, 2, generator=gen, **F64)
    D = torch.rand(T, generator=gen, **F64) + 0.5
    X = torch.randn(N, T, generator=gen, **F64)

    def model(X):
        with pyro.plate("data", X.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), **F64), 1.0))
            Wz = z.unsqueeze(-1).unsqueeze(-1) * W
            pyro.sample("x", dist.LowRankMultivariateNormal(torch.zeros(T, **F64), Wz, D), obs=X)

    layout = read_layout(poutine.trace(model).get_trace(X))
    tr = particle_trace(model, (X,), {}, layout, num_particles=S)
    ((_, kernel),) = build_kernels(tr, layout)[0]
    z = tr.nodes["z"]["value"]
    assert not kernel.shared and kernel.W.shape == (S, N, T, 2)
    assert_close(kernel.W, z[..., None, None] * W, atol=1e-12)
    assert_close(kernel.D, D.expand(S, N, T), atol=0.0)

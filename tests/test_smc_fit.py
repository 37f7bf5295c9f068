"""Likelihood-tempered SMC fits (pyro_mpt.conditionals.smc_fit) and the proposal draws of
"smc_importance", against closed forms computed without pyro_mpt: the conjugate Normal
posterior, a two-component Student-t mixture's moments."""

import pyro
import pyro.distributions as dist
import torch

from pyro_mpt.conditionals.smc_fit import tempered_fit
from pyro_mpt.conditionals.smc_moves import ParticleModel
from pyro_mpt.reference.smc_importance import DF, _sample
from pyro_mpt.tokens import read_layout
from tests.conftest import assert_close


def normal_means(x):
    """z_n ~ N(0, 1), x_{n,t} ~ N(z_n, 0.5), a plate over the sequences."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = z.unsqueeze(-1).expand(*z.shape, x.shape[-1])  # batched over particles too
        pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=x)


def _particle_model(model, x):
    trace = pyro.poutine.trace(model).get_trace(x)
    layout = read_layout(trace)
    return ParticleModel(model, (x,), {}, layout)


def test_tempered_fit_matches_the_conjugate_posterior():
    """Posterior z_n | x_n: precision 1 + T/0.25, mean (sum_t x_t / 0.25) / precision. 16
    independent runs of 256 particles: their mean within 4 standard errors (the runs'
    spread) of the exact mean, the fitted variances within 15% of the exact (measured:
    errors 0.001-0.005 against standard errors near 0.004; variances within 5%)."""
    x = torch.tensor([[0.3, 0.8, 0.1, 0.5], [3.0, 2.5, 3.5, 2.8], [-1.0, -1.2, -0.6, -0.9]])
    precision = 1 + x.shape[1] / 0.25
    mean, var = (x.sum(1) / 0.25) / precision, 1 / precision
    pm = _particle_model(normal_means, x)
    pyro.set_rng_seed(0)
    fit = tempered_fit(pm, 16, 256, max_elements=2**22)
    assert fit.mean.shape == (16, 1, 3, 1) and fit.chol.shape == (16, 3, 1, 1)
    assert fit.steps >= 2  # x_2 sits 3 prior sd out: one step cannot keep half the ESS
    runs = fit.mean[:, 0, :, 0]  # (16, 3): independent runs
    se = runs.std(0) / 16**0.5
    assert bool((se < var**0.5 / 16).all())  # each run's mean within ~sd/sqrt(P/4)
    assert bool(((runs.mean(0) - mean).abs() < 4 * se).all()), (runs.mean(0), mean, se)
    fitted_var = (fit.chol[..., 0, 0] ** 2).mean(0)
    assert_close(fitted_var, torch.full((3,), var), atol=0.0, rtol=0.15)


def test_tempered_fit_in_chunks_under_max_elements():
    x = torch.zeros(2, 3)
    pm = _particle_model(normal_means, x)
    fit = tempered_fit(pm, 5, 32, max_elements=4 * 32 * 2 * (3 + 8))  # one run a chunk
    assert fit.mean.shape == (5, 1, 2, 1) and torch.isfinite(fit.chol).all()


def test_sample_has_the_mixtures_moments():
    """Two Student-t components (df 10) per sequence, equal weights: the mixture mean is the
    components' mean; the covariance their mean (df / (df - 2)) L L^T plus the spread of
    the locations. 200000 draws: the means within 5 standard errors, covariances within 5%."""
    loc = torch.tensor([[[0.0, 0.0], [4.0, -2.0]], [[1.0, 1.0], [1.0, 1.0]]])  # (N, R, d)
    tril = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[2.0, 0.0], [0.0, 0.1]]])  # (R, d, d)
    tril = tril.expand(2, 2, 2, 2)
    df = torch.tensor(DF)
    q = dist.MixtureSameFamily(
        dist.Categorical(logits=torch.zeros(2, 2)), dist.MultivariateStudentT(df, loc, tril)
    )
    torch.manual_seed(0)
    u = _sample(q, 200_000)
    assert u.shape == (200_000, 2, 2)
    cov_c = DF / (DF - 2) * tril @ tril.mT  # (N, R, d, d)
    centred = loc - loc.mean(1, keepdim=True)
    cov = cov_c.mean(1) + (centred.unsqueeze(-1) @ centred.unsqueeze(-2)).mean(1)
    se = (cov.diagonal(dim1=-2, dim2=-1) / 200_000).sqrt()
    assert_close(u.mean(0), loc.mean(1), atol=float(5 * se.max()))
    r = u - u.mean(0)
    assert_close((r.unsqueeze(-1) @ r.unsqueeze(-2)).mean(0), cov, atol=0.0, rtol=0.05)

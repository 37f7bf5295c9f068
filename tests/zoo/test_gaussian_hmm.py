"""Zoo: ``dist.GaussianHMM`` as a whole-sequence observed site (a linear-Gaussian state space
model written as Pyro's forecasting models write it). Exact: the distribution's own
``log_prob``; the masked conditionals are checked against Gaussian conditioning of the joint
built here from the generative recursion (states as affine maps of standard-normal noise)."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_mpt import MaskedELBO
from pyro_mpt.conditionals import get_conditionals
from pyro_mpt.conditionals.hmm_sites import gaussian_hmm_joint
from pyro_mpt.reference import log_marginal_likelihood
from pyro_mpt.tokens import read_layout

from .common import ZooCase, check_case, run_case

F64 = torch.float64
H, O, N, T = 2, 1, 3, 5
_G = torch.Generator().manual_seed(4)
INIT_LOC = torch.randn(H, generator=_G, dtype=F64)
INIT_TRIL = torch.eye(H, dtype=F64) + 0.3 * torch.randn(H, H, generator=_G, dtype=F64).tril(-1)
TRANS = 0.6 * torch.randn(H, H, generator=_G, dtype=F64)
NOISE_LOC = 0.1 * torch.randn(H, generator=_G, dtype=F64)
OBS = torch.randn(H, O, generator=_G, dtype=F64)
OBS_SCALE = 0.4
SERIES = torch.randn(N, T, O, generator=_G, dtype=F64)


def _hmm():
    return dist.GaussianHMM(
        dist.MultivariateNormal(INIT_LOC, scale_tril=INIT_TRIL),
        TRANS,
        dist.MultivariateNormal(NOISE_LOC, scale_tril=0.5 * torch.eye(H, dtype=F64)),
        OBS,
        dist.Normal(torch.zeros(O, dtype=F64), OBS_SCALE).to_event(1),
    )


def gaussian_hmm(series):
    with pyro.plate("series", series.shape[0]):
        pyro.sample("obs", _hmm(), obs=series)


def joint_by_recursion(num_steps):
    r"""Mean and covariance of the flattened observations, built WITHOUT pyro_mpt: with
    noise :math:`e \sim \mathcal N(0, I)`, :math:`z_{-1} = \mu_0 + e_{-1} L_0^\top`,
    :math:`z_t = z_{t-1} A + b + e_t L_w^\top` (row vectors, Pyro's convention) and
    :math:`x_t = z_t B + \epsilon_t`, each :math:`z_t` is affine in :math:`e`."""
    Lw = 0.5 * torch.eye(H, dtype=F64)
    M = torch.zeros(H * (num_steps + 1), H, dtype=F64)
    M[:H] = INIT_TRIL.T
    mean = INIT_LOC
    means, loads = [], []
    for t in range(num_steps):
        M = M @ TRANS
        M[H * (t + 1) : H * (t + 2)] += Lw.T
        mean = mean @ TRANS + NOISE_LOC
        means.append(mean @ OBS)
        loads.append(M @ OBS)
    K = torch.cat(loads, -1)
    cov = K.T @ K + OBS_SCALE**2 * torch.eye(num_steps * O, dtype=F64)
    return torch.cat(means), cov


CASES = [
    ZooCase(
        "GaussianHMM site",
        gaussian_hmm,
        (SERIES,),
        lambda: float(_hmm().log_prob(SERIES).sum()),
        "exact",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gaussian_hmm_zoo(case):
    check_case(case, run_case(case))


def test_joint_matches_the_recursion_and_pyro_log_prob():
    loc, cov = joint_by_recursion(T)
    joint = gaussian_hmm_joint(_hmm(), T)
    assert torch.allclose(joint.loc, loc, atol=1e-10)
    assert torch.allclose(joint.covariance_matrix, cov, atol=1e-10)
    want = _hmm().log_prob(SERIES)
    got = dist.MultivariateNormal(loc, cov).log_prob(SERIES.reshape(N, -1))
    assert torch.allclose(got, want, atol=1e-9)


def test_masked_conditionals_are_gaussian_conditioning():
    """Every masked conditional of the site equals Gaussian conditioning of the recursion's
    joint, :math:`\\mathcal N(x_j; \\mu_j + \\Sigma_{jO}\\Sigma_{OO}^{-1}(x_O - \\mu_O),
    \\Sigma_{jj} - \\Sigma_{jO}\\Sigma_{OO}^{-1}\\Sigma_{Oj})`, to 1e-9."""
    x = SERIES[:1]
    trace = poutine.trace(gaussian_hmm).get_trace(x)
    layout = read_layout(trace)
    assert layout.num_tokens == T * O and layout.sites[0].kind == "dense"
    scorer = get_conditionals("auto", layout).scorer(gaussian_hmm, (x,), {}, layout, trace)
    masks = torch.tensor(list(itertools.product([False, True], repeat=T)))
    got = scorer(masks.unsqueeze(1), ~masks.unsqueeze(1))[:, 0]
    loc, cov = joint_by_recursion(T)
    v = x.reshape(-1)
    for r, o in enumerate(masks):
        for j in torch.nonzero(~o).flatten().tolist():
            s_jo, s_oo = cov[j, o], cov[o][:, o]
            w = torch.linalg.solve(s_oo, s_jo) if o.any() else s_jo[:0]
            mean = loc[j] + w @ (v[o] - loc[o])
            var = cov[j, j] - w @ s_jo
            want = dist.Normal(mean, var.sqrt()).log_prob(v[j])
            assert float(got[r, j]) == pytest.approx(float(want), abs=1e-9)


def test_latent_noise_scale_is_mixed_over_draws():
    """A per-series LogNormal observation scale: "importance" draws it and scores each draw's
    joint Gaussian; the evidence is logmeanexp of GaussianHMM.log_prob over the same draws."""

    def model(series):
        with pyro.plate("series", series.shape[0]):
            s = pyro.sample("s", dist.LogNormal(torch.tensor(0.0, dtype=F64), 0.3))
            noise = dist.Normal(torch.zeros(O, dtype=F64), s.unsqueeze(-1).unsqueeze(-1))
            hmm = dist.GaussianHMM(
                dist.MultivariateNormal(INIT_LOC, scale_tril=INIT_TRIL),
                TRANS,
                dist.MultivariateNormal(NOISE_LOC, scale_tril=0.5 * torch.eye(H, dtype=F64)),
                OBS,
                noise.to_event(1),
            )
            pyro.sample("obs", hmm, obs=series)

    trace = poutine.trace(model).get_trace(SERIES)
    layout = read_layout(trace)
    backend = get_conditionals("auto", layout, num_samples=5)
    pyro.set_rng_seed(0)
    scorer = backend.scorer(model, (SERIES,), {}, layout, trace)
    pyro.set_rng_seed(0)
    drawn = poutine.trace(pyro.plate("_mpt_particles", 5, dim=-2)(model)).get_trace(SERIES)
    lp = drawn.nodes["obs"]["fn"].log_prob(SERIES)  # (5, N), Pyro's own density per draw
    want = torch.logsumexp(lp, 0) - math.log(5)
    got = scorer.log_evidence(torch.ones(1, N, T * O, dtype=torch.bool))[0]
    assert torch.allclose(got, want, atol=1e-10)


def test_vector_observations_are_element_tokens():
    """With obs_dim 2 the site is read as the dense Gaussian of its ``T x 2`` elements
    (time-major), like a MultivariateNormal site: the exact reference and the chain are
    GaussianHMM.log_prob."""
    obs_matrix = torch.randn(H, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    hmm = dist.GaussianHMM(
        dist.MultivariateNormal(INIT_LOC, scale_tril=INIT_TRIL),
        TRANS,
        dist.MultivariateNormal(NOISE_LOC, scale_tril=0.5 * torch.eye(H, dtype=F64)),
        obs_matrix,
        dist.Normal(torch.zeros(2, dtype=F64), OBS_SCALE).to_event(1),
    )
    series = torch.randn(N, 3, 2, generator=torch.Generator().manual_seed(6), dtype=F64)

    def model(data):
        with pyro.plate("series", data.shape[0]):
            pyro.sample("obs", hmm, obs=data)

    layout = read_layout(poutine.trace(model).get_trace(series))
    assert layout.num_tokens == 6
    exact = float(hmm.log_prob(series).sum())
    assert float(log_marginal_likelihood(model, series).total) == pytest.approx(exact, rel=1e-10)
    chain = MaskedELBO(estimator="chain", num_masks=2).estimate(model, None, series)
    assert float(chain.total) == pytest.approx(exact, rel=1e-10)

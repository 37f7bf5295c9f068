r"""Conditional backends against exact conditionals (acceptance criteria 4 and 5).

- ``"importance"`` (prior draws) on latent-z PPCA converges to the collapsed model's exact
  Gaussian conditionals :math:`\log p(x_j \mid x_O)` as the number of particles grows;
- ``"quadrature"`` (a 60 x 60 midpoint grid on :math:`[-6, 6]^2`) matches them to 1e-6;
- ``"enumerate"`` matches the mixture's conditionals computed here by hand;
- mixed models (the theory page of the docs, section 3): a local enumerated latent whose observed child is a
  ``MultivariateNormal`` / ``LowRankMultivariateNormal`` (a mixture of full-covariance
  Gaussians) has exhaustive area and chain equal to the exact mixture LML to 1e-8; with a
  continuous latent parent, quadrature gives the exact LML to 1e-6 and the importance chain
  telescopes to the importance estimate of its particles.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import MaskedELBO, mpt_curve
from pyro_mpt.estimators import get_estimator
from pyro_mpt.models import (
    gaussian_mixture,
    ppca_collapsed,
    ppca_latent,
    ppca_log_marginal,
    sample_ppca,
)
from pyro_mpt.scoring import MPTOptions, prepare, score
from tests.conftest import assert_close

IDENTITY_ATOL = 1e-8


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _scorer(model, X, **options):
    _, scorer, backend = prepare(model, (X,), {}, MPTOptions(**options))
    return scorer, backend


def _fixed_masks(N, T):
    """Mask rows ``(R, N, T)`` covering the edge cases: nothing observed, one token scored
    with all others observed, and mixed rows that differ between sequences."""
    g = _gen(42)
    rows_obs, rows_sc = [], []
    # nothing observed, everything scored
    rows_obs.append(torch.zeros(N, T, dtype=torch.bool))
    rows_sc.append(torch.ones(N, T, dtype=torch.bool))
    # leave-one-out: token (n % T) scored, the rest observed
    loo = torch.zeros(N, T, dtype=torch.bool)
    loo[torch.arange(N), torch.arange(N) % T] = True
    rows_obs.append(~loo)
    rows_sc.append(loo)
    # random splits per sequence, some tokens neither observed nor scored (as chain rows)
    for _ in range(3):
        u = torch.rand(N, T, generator=g)
        obs = u < 0.4
        sc = u > 0.6
        sc[torch.arange(N), (~obs).to(torch.long).argmax(-1)] |= ~obs.all(-1)
        rows_obs.append(obs)
        rows_sc.append(sc & ~obs)
    return torch.stack(rows_obs), torch.stack(rows_sc)


# ----------------------------------------------------------------------------------------
# 4. Importance and quadrature against the exact Gaussian conditionals
# ----------------------------------------------------------------------------------------


def test_importance_conditionals_converge_to_exact_ppca():
    N, T, K = 3, 5, 2
    X, truth = sample_ppca(N, T, K, 0.7, generator=_gen(0))
    observed, scored = _fixed_masks(N, T)
    exact_scorer, backend = _scorer(
        lambda X: ppca_collapsed(X, K, **truth), X, conditionals="gaussian"
    )
    assert backend.name == "gaussian"
    exact = exact_scorer(observed, scored)
    assert torch.isfinite(exact).all()
    assert (exact[~scored] == 0).all()

    errors = {}
    for S in (100, 10_000, 100_000):
        scorer, backend = _scorer(
            lambda X: ppca_latent(X, K, **truth), X, conditionals="importance", num_samples=S
        )
        assert backend.name == "importance" and scorer.log_w0.shape == (S, N)
        approx = scorer(observed, scored)
        assert (approx[~scored] == 0).all()
        errors[S] = float((approx - exact)[scored].abs().max())
    # self-normalised importance error ~ 1/sqrt(S): the largest error over the scored
    # conditionals is about 1.4 nats at S = 100, 0.07 at 1e4 and 0.02 at 1e5 here (stable
    # across seeds); the stated tolerance at S = 1e5 is 0.05 nats
    assert errors[100_000] < 0.05, errors
    assert errors[100_000] < errors[100] / 4, errors
    assert errors[10_000] < errors[100], errors


def test_quadrature_conditionals_match_exact_ppca():
    """K = 2 latent, 60 points per axis on [-6, 6]: the midpoint rule is exact to far below
    1e-6 for these Gaussian integrands (cell width 0.2 against posterior sd >= 0.2)."""
    N, T, K = 4, 6, 2
    X, truth = sample_ppca(N, T, K, 0.5, generator=_gen(1))
    observed, scored = _fixed_masks(N, T)
    exact_scorer, _ = _scorer(lambda X: ppca_collapsed(X, K, **truth), X, conditionals="gaussian")
    quad_scorer, backend = _scorer(
        lambda X: ppca_latent(X, K, **truth),
        X,
        conditionals="quadrature",
        quadrature_points=60,
        quadrature_bounds=(-6.0, 6.0),
    )
    assert backend.name == "quadrature"
    assert quad_scorer.log_w0.shape == (60 * 60, N)
    # the grid's weights integrate the prior to 1 (up to the mass outside [-6, 6]^2)
    assert_close(quad_scorer.log_w0.exp().sum(0), torch.ones(N), atol=1e-8)
    assert_close(quad_scorer(observed, scored), exact_scorer(observed, scored), atol=1e-6)


def test_quadrature_exhaustive_area_ppca_latent():
    N, T, K = 3, 6, 2
    X, truth = sample_ppca(N, T, K, 0.5, generator=_gen(2))
    curve = mpt_curve(
        lambda X: ppca_latent(X, K, **truth),
        X,
        exhaustive=True,
        conditionals="quadrature",
        quadrature_points=60,
        quadrature_bounds=(-6.0, 6.0),
    )
    assert curve.conditionals == "quadrature"
    assert_close(curve.area, ppca_log_marginal(X, **truth), atol=1e-6)


def test_enumerate_conditionals_match_hand_computation():
    """log p(x_j | x_O) = logsumexp_c(log pi_c + sum_O l_c + l_cj) - logsumexp_c(log pi_c +
    sum_O l_c), with l_ct = log N(x_t; mu_ct, sigma^2), computed here directly."""
    N, T, C = 4, 5, 3
    g = _gen(3)
    weights = torch.softmax(torch.randn(C, generator=g), 0)
    locs = torch.randn(C, T, generator=g)
    scale = torch.tensor(0.7)
    X = torch.randn(N, T, generator=g)
    observed, scored = _fixed_masks(N, T)
    scorer, backend = _scorer(
        lambda X: gaussian_mixture(X, C, weights, locs, scale), X, conditionals="auto"
    )
    assert backend.name == "enumerate"
    l = dist.Normal(locs, scale).log_prob(X.unsqueeze(-2))  # (N, C, T)
    a = weights.log() + torch.einsum("rnt,nct->rnc", observed.to(l.dtype), l)  # (R, N, C)
    hand = torch.logsumexp(a.unsqueeze(-1) + l, -2) - torch.logsumexp(a, -1, keepdim=True)
    hand = torch.where(scored, hand, torch.zeros(()))
    assert_close(scorer(observed, scored), hand, atol=1e-12)


# ----------------------------------------------------------------------------------------
# 5. Mixed backend: enumerated latent, Gaussian child with a full covariance
# ----------------------------------------------------------------------------------------

C, T_MIX, N_MIX = 3, 5, 4


def _mixture_params(seed=4):
    g = _gen(seed)
    weights = torch.softmax(torch.randn(C, generator=g), 0)
    locs = 1.5 * torch.randn(C, T_MIX, generator=g)
    A = torch.randn(C, T_MIX, T_MIX, generator=g)
    covs = A @ A.mT / T_MIX + 0.3 * torch.eye(T_MIX)
    cov_factor = torch.randn(C, T_MIX, 2, generator=g)
    cov_diag = 0.2 + torch.rand(C, T_MIX, generator=g)
    X = torch.randn(N_MIX, T_MIX, generator=g) + locs[1]
    return X, weights, locs, covs, cov_factor, cov_diag


def full_covariance_mixture(X, weights, locs, covs):
    """c_n ~ Categorical(pi) (enumerated), x_n | c_n ~ MVN(mu_c, Sigma_c) (or one shared
    Sigma when ``covs`` is (T, T))."""
    with pyro.plate("data", X.shape[0]):
        c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
        cov = covs[c] if covs.dim() == 3 else covs
        pyro.sample("x", dist.MultivariateNormal(locs[c], cov), obs=X)


def low_rank_mixture(X, weights, locs, cov_factor, cov_diag):
    """As :func:`full_covariance_mixture` with x_n | c_n ~ N(mu_c, W_c W_c^T + D_c) (or a
    shared W, D when they carry no component dim)."""
    with pyro.plate("data", X.shape[0]):
        c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
        W = cov_factor[c] if cov_factor.dim() == 3 else cov_factor
        D = cov_diag[c] if cov_diag.dim() == 2 else cov_diag
        pyro.sample("x", dist.LowRankMultivariateNormal(locs[c], W, D), obs=X)


def _mixture_exact(X, weights, components):
    return torch.logsumexp(components.log_prob(X.unsqueeze(-2)) + weights.log(), -1)  # (N,)


@pytest.mark.parametrize("shared", [False, True], ids=["per-component", "shared"])
def test_mixed_enumerate_dense_gaussian_child(shared):
    X, weights, locs, covs, _, _ = _mixture_params()
    covs = covs[0] if shared else covs
    exact = _mixture_exact(X, weights, dist.MultivariateNormal(locs, covs.expand(C, T_MIX, T_MIX)))
    curve = mpt_curve(full_covariance_mixture, X, weights, locs, covs, exhaustive=True)
    assert curve.conditionals == "enumerate"
    assert_close(curve.area, exact.sum(), atol=IDENTITY_ATOL)
    assert_close(curve.per_sequence.sum(-1), exact, atol=IDENTITY_ATOL)
    est = MaskedELBO(estimator="chain", num_masks=3).estimate(
        full_covariance_mixture, None, X, weights, locs, covs
    )
    assert_close(est.draws, exact.expand(3, N_MIX), atol=IDENTITY_ATOL)


@pytest.mark.parametrize("shared", [False, True], ids=["per-component", "shared"])
def test_mixed_enumerate_low_rank_gaussian_child(shared):
    X, weights, locs, _, cov_factor, cov_diag = _mixture_params()
    if shared:
        cov_factor, cov_diag = cov_factor[0], cov_diag[0]
    components = dist.LowRankMultivariateNormal(
        locs, cov_factor.expand(C, T_MIX, 2), cov_diag.expand(C, T_MIX)
    )
    exact = _mixture_exact(X, weights, components)
    curve = mpt_curve(low_rank_mixture, X, weights, locs, cov_factor, cov_diag, exhaustive=True)
    assert curve.conditionals == "enumerate"
    assert_close(curve.area, exact.sum(), atol=IDENTITY_ATOL)
    est = MaskedELBO(estimator="chain", num_masks=3).estimate(
        low_rank_mixture, None, X, weights, locs, cov_factor, cov_diag
    )
    assert_close(est.draws, exact.expand(3, N_MIX), atol=IDENTITY_ATOL)


def _continuous_parent_model(a, mu, cov):
    """z_n ~ N(0, 1), x_n | z_n ~ MVN(mu + z_n a, Sigma): marginally MVN(mu, Sigma + a a^T)."""

    def model(X):
        with pyro.plate("data", X.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.MultivariateNormal(mu + z.unsqueeze(-1) * a, cov), obs=X)

    return model


def test_mixed_continuous_latent_dense_child_quadrature_and_importance():
    N, T = 4, 5
    g = _gen(5)
    a, mu = torch.randn(T, generator=g), torch.randn(T, generator=g)
    A = torch.randn(T, T, generator=g)
    cov = A @ A.T / T + 0.3 * torch.eye(T)
    marginal = dist.MultivariateNormal(mu, cov + torch.outer(a, a))
    X = mu + torch.randn(N, T, generator=g) @ torch.linalg.cholesky(marginal.covariance_matrix).T
    exact = marginal.log_prob(X)
    model = _continuous_parent_model(a, mu, cov)

    curve = mpt_curve(
        model,
        X,
        exhaustive=True,
        conditionals="quadrature",
        quadrature_points=100,
        quadrature_bounds=(-7.0, 7.0),
    )
    assert_close(curve.area, exact.sum(), atol=1e-6)

    # importance: per particle the Gaussian child is conditioned exactly, so the chain
    # telescopes to logmeanexp_s log N(x_n; mu + z_s a, Sigma) of the scorer's particles
    S = 500
    layout, scorer, backend = prepare(
        model, (X,), {}, MPTOptions(conditionals="importance", num_samples=S)
    )
    kernel = scorer.kernels[0][1]
    assert kernel.loc.shape == (S, N, T)
    per_particle = dist.MultivariateNormal(kernel.loc, cov).log_prob(X)  # (S, N)
    expected = torch.logsumexp(scorer.log_w0 + per_particle, 0)
    draws, _ = score(layout, scorer, get_estimator("chain"), 2, max_elements=2**20)
    assert_close(draws, expected.expand(2, N), atol=IDENTITY_ATOL)


# ----------------------------------------------------------------------------------------
# Backend choice and refusals
# ----------------------------------------------------------------------------------------


def test_backends_refuse_models_they_cannot_score():
    N, T, K = 3, 4, 2
    X, truth = sample_ppca(N, T, K, 0.5, generator=_gen(6))

    def latent(X):
        ppca_latent(X, K, **truth)

    with pytest.raises(ValueError, match="'z'"):
        _scorer(latent, X, conditionals="gaussian")
    with pytest.raises(ValueError, match="enumerate"):
        _scorer(latent, X, conditionals="enumerate")
    _, backend = _scorer(latent, X, conditionals="auto", num_samples=10)
    assert backend.name == "linear_gaussian"  # latent-z PPCA is linear-Gaussian

    def laplace(X):  # continuous latents, not linear-Gaussian: importance
        with pyro.plate("data", X.shape[0]):
            z = pyro.sample("z", dist.Laplace(torch.zeros(K), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ truth["W"].T, 0.5).to_event(1), obs=X)

    _, backend = _scorer(laplace, X, conditionals="auto", num_samples=10)
    assert backend.name == "importance"
    _, backend = _scorer(lambda X: ppca_collapsed(X, K, **truth), X, conditionals="auto")
    assert backend.name == "gaussian"

    def latent4(X):  # four latent dims per sequence: no grid
        ppca_latent(X, 4, torch.randn(T, 4), truth["loc"], truth["noise_scale"])

    with pytest.raises(ValueError, match="quadrature"):
        _scorer(latent4, X, conditionals="quadrature")
    with pytest.raises(ValueError, match="unknown conditionals"):
        MPTOptions(conditionals="laplace")


def test_mask_chunk_budget_defaults_by_device():
    """``max_elements=None`` means the device's default budget: small chunks on the CPU,
    large ones on a GPU (launch-bound otherwise); an explicit budget is kept."""
    from pyro_mpt.conditionals.base import (
        DEFAULT_CUDA_MAX_ELEMENTS,
        DEFAULT_MAX_ELEMENTS,
        resolve_max_elements,
    )

    assert resolve_max_elements(None, torch.device("cpu")) == DEFAULT_MAX_ELEMENTS == 2**24
    assert resolve_max_elements(None, torch.device("cuda", 0)) == DEFAULT_CUDA_MAX_ELEMENTS
    assert DEFAULT_CUDA_MAX_ELEMENTS == 2**28
    assert resolve_max_elements(5000, torch.device("cuda")) == 5000
    assert MPTOptions().max_elements is None  # resolved once the data's device is known
    with pytest.raises(ValueError, match="max_elements must be an integer >= 1"):
        MPTOptions(max_elements=0)

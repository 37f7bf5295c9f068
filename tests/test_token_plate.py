r"""Masking along a plate (acceptance criterion 7): Bayesian linear regression with a global
latent weight vector :math:`w` (``D = 2`` features, ``N = 8`` points). The data points are
the tokens of one sequence (``token_plate="data"``); the collapsed model gives the exact LML
:math:`\log \mathcal N(y; 0, \alpha^2 \Phi\Phi^\top + \sigma^2 I)`.

- importance conditionals (prior draws of ``w``): the chain estimate converges to the
  exact LML as particles grow;
- quadrature (a 120 x 120 grid on :math:`[-6, 6]^2`): exact to 1e-6;
- without ``token_plate`` the model is refused with a ``ValueError`` naming ``'w'``.

Every particle test first probes the particle shapes at a tiny ``S`` so that a model which
multiplies the particles (``S^2`` rows, as a mean that does not broadcast over the particle
dims of ``w`` would) fails fast instead of exhausting memory at ``S = 200_000``.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mpt import MaskedELBO, mpt_curve
from pyro_mpt.engine import MPTOptions, prepare, score
from pyro_mpt.estimators import get_estimator
from pyro_mpt.models import (
    bayesian_linear_regression_latent,
    bayesian_linear_regression_log_marginal,
)
from pyro_mpt.tokens import read_layout
from tests.conftest import assert_close

N, D = 8, 2

#: tiny particle counts for the shape probe
_PROBE_SAMPLES, _PROBE_POINTS = 7, 3


def _probe_particle_shapes(model, y, features):
    """Fails fast (before any large particle count) unless the model's particles come out
    one row per particle: tables ``(S, 1, N)`` and weights ``(S, 1)``."""
    for opts, S in (
        (dict(conditionals="importance", num_samples=_PROBE_SAMPLES), _PROBE_SAMPLES),
        (dict(conditionals="quadrature", quadrature_points=_PROBE_POINTS), _PROBE_POINTS**D),
    ):
        _, scorer, _ = prepare(model, (y, features), {}, MPTOptions(token_plate="data", **opts))
        table = scorer.kernels[0][1].table
        assert table.shape == (S, 1, y.shape[-1]), (opts, tuple(table.shape))
        assert scorer.log_w0.shape == (S, 1), (opts, tuple(scorer.log_w0.shape))


MODELS = [pytest.param(bayesian_linear_regression_latent, id="blr-latent")]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(N, D, generator=g)
    w = torch.randn(D, generator=g)
    y = features @ w + 0.5 * torch.randn(N, generator=g)
    return y, features


# ----------------------------------------------------------------------------------------
# Layout and refusal (these only trace the model once, without particles)
# ----------------------------------------------------------------------------------------


def test_token_plate_layout_one_sequence_of_data_points():
    y, features = _data()
    # the library model traces fine without particles
    trace = pyro.poutine.trace(bayesian_linear_regression_latent).get_trace(y, features)
    layout = read_layout(trace, token_plate="data")
    assert layout.num_sequences == 1 and layout.num_tokens == N
    assert layout.latents == ["w"] and layout.token_plate == "data"


@pytest.mark.parametrize("model", MODELS)
def test_particles_broadcast_through_the_model(model):
    """One table row per particle: the model's mean broadcasts over leading dims of w."""
    _probe_particle_shapes(model, *_data())


def test_without_token_plate_raises_naming_w():
    y, features = _data()
    with pytest.raises(ValueError, match=r"latent site 'w'.*token_plate"):
        MaskedELBO().estimate(bayesian_linear_regression_latent, None, y, features)
    with pytest.raises(ValueError, match=r"latent site 'w'.*token_plate"):
        mpt_curve(bayesian_linear_regression_latent, y, features, exhaustive=True)


def test_unknown_token_plate_raises():
    y, features = _data()
    with pytest.raises(ValueError, match="token_plate 'points' not found"):
        MaskedELBO(token_plate="points").estimate(
            bayesian_linear_regression_latent, None, y, features
        )


# ----------------------------------------------------------------------------------------
# Convergence to the collapsed model's exact LML
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_importance_chain_converges_to_exact_lml(model):
    y, features = _data()
    _probe_particle_shapes(model, y, features)
    exact = bayesian_linear_regression_log_marginal(y, features)
    errors, ses = {}, {}
    for S in (100, 200_000):
        layout, scorer, backend = prepare(
            model,
            (y, features),
            {},
            MPTOptions(conditionals="importance", num_samples=S, token_plate="data"),
        )
        assert backend.name == "importance"
        assert layout.num_sequences == 1 and layout.num_tokens == N
        table = scorer.kernels[0][1].table  # (S, 1, N): log p(y_i | w_s)
        assert table.shape == (S, 1, N)
        draws, _ = score(layout, scorer, get_estimator("chain"), 2, max_elements=2**24)
        # the chain telescopes to the importance estimate of these particles ...
        log_w = table.sum(-1)[:, 0]  # (S,)
        importance = torch.logsumexp(log_w, 0) - math.log(S)
        assert_close(draws, importance.expand(2, 1), atol=1e-8)
        errors[S] = abs(float(draws[0, 0] - exact))
        # ... whose delta-method standard error is sd(w) / (mean(w) sqrt(S))
        w = (log_w - log_w.max()).exp()
        ses[S] = float(w.std() / w.mean()) / math.sqrt(S)
    # stated: at S = 200_000 the error is below 0.06 nats (about 0.02 here; the
    # standard error is about 0.01) and within 4 standard errors; at S = 100 it is larger
    assert errors[200_000] < 0.06, (errors, ses)
    assert errors[200_000] < 4 * ses[200_000] + 1e-3, (errors, ses)
    assert errors[200_000] < errors[100], (errors, ses)


@pytest.mark.parametrize("model", MODELS)
def test_importance_masked_elbo_with_token_plate(model):
    """The public path: stratified masks along the data plate, one sequence per draw."""
    y, features = _data()
    _probe_particle_shapes(model, y, features)
    exact = bayesian_linear_regression_log_marginal(y, features)
    est = MaskedELBO(
        estimator="stratified",
        num_masks=8,
        conditionals="importance",
        num_samples=20_000,
        token_plate="data",
    ).estimate(model, None, y, features)
    assert est.draws.shape == (8, 1)
    # stratified + importance: consistent, not exact. One sequence: the s.e. rests on the
    # 8 draws (about 7 dof), and P(|t_7| > 4) = 0.005, so 4 s.e. are allowed (measured over 60
    # seeds: mean error -0.06 +- 0.04 nats, sd 0.34 at 4 draws)
    assert est.dof >= 7  # Satterthwaite: the particle groups add a little
    assert abs(float(est.total) - float(exact)) < 4 * float(est.stderr)


@pytest.mark.parametrize("model", MODELS)
def test_quadrature_matches_exact_lml(model):
    """120 x 120 midpoint grid on [-6, 6]^2 (cell width 0.1 against a posterior sd of
    about 0.18; prior mass outside the box ~4e-9): exact to 1e-6, exhaustive area and
    chain alike."""
    y, features = _data()
    _probe_particle_shapes(model, y, features)
    exact = bayesian_linear_regression_log_marginal(y, features)
    options = dict(
        conditionals="quadrature",
        quadrature_points=120,
        quadrature_bounds=(-6.0, 6.0),
        token_plate="data",
    )
    est = MaskedELBO(estimator="chain", num_masks=2, **options).estimate(model, None, y, features)
    assert_close(est.draws, exact.expand(2, 1), atol=1e-6)
    curve = mpt_curve(model, y, features, exhaustive=True, **options)
    assert curve.conditionals == "quadrature"
    assert_close(curve.area, exact, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Several sequences along an outer plate, and an enumerated global latent
# ----------------------------------------------------------------------------------------


def grouped_blr(Y, features):
    """Independent regressions per group: the groups are the sequences, the data points of
    a group its tokens. w_g ~ N(0, I_D) per group, y_gi ~ N(phi_gi . w_g, 0.5^2)."""
    G, n = Y.shape
    with pyro.plate("groups", G, dim=-2):
        w = pyro.sample("w", dist.Normal(torch.zeros(features.shape[-1]), 1.0).to_event(1))
        with pyro.plate("data", n, dim=-1):
            pyro.sample("y", dist.Normal((features * w).sum(-1), 0.5), obs=Y)


def test_token_plate_with_an_outer_sequence_plate():
    g = torch.Generator().manual_seed(1)
    G, n = 3, 6
    features = torch.randn(G, n, D, generator=g)
    Y = (features * torch.randn(G, 1, D, generator=g)).sum(-1) + 0.5 * torch.randn(
        G, n, generator=g
    )
    exact = torch.stack(
        [bayesian_linear_regression_log_marginal(Y[i], features[i]) for i in range(G)]
    )
    curve = mpt_curve(
        grouped_blr,
        Y,
        features,
        exhaustive=True,
        conditionals="quadrature",
        quadrature_points=120,
        quadrature_bounds=(-6.0, 6.0),
        token_plate="data",
    )
    assert curve.per_sequence.shape == (G, n)
    assert_close(curve.per_sequence.sum(-1), exact, atol=1e-6)


def test_token_plate_with_an_enumerated_global_latent():
    """A global cluster c ~ Categorical(pi) shared by all points (enumerated): exact."""
    locs = torch.tensor([-1.0, 0.5, 2.0])
    weights = torch.tensor([0.2, 0.3, 0.5])

    def model(y):
        c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
        with pyro.plate("data", y.shape[-1]):
            pyro.sample("y", dist.Normal(locs[c], 1.0), obs=y)

    y = torch.randn(6, generator=torch.Generator().manual_seed(2)) + 0.5
    exact = torch.logsumexp(
        weights.log() + dist.Normal(locs.unsqueeze(-1), 1.0).log_prob(y).sum(-1), 0
    )
    curve = mpt_curve(model, y, exhaustive=True, token_plate="data")
    assert curve.conditionals == "enumerate"
    assert_close(curve.area, exact, atol=1e-8)
    est = MaskedELBO(estimator="chain", num_masks=3, token_plate="data").estimate(model, None, y)
    assert_close(est.draws, exact.expand(3, 1), atol=1e-8)

r"""Tests of :mod:`pyro_mpt.engine`: the one scoring loop against brute force (exhaustive
masks give the exact LML; bins by size sum to the draws; chunking changes nothing), the
estimate's statistics against a direct computation, and :class:`MPTOptions`'s validation."""

import itertools
import math

import numpy as np
import pytest
import torch

import pyro_mpt.scoring
from pyro_mpt import MaskedELBO
from pyro_mpt.engine import MPTEstimate, MPTOptions, prepare, score, score_masks, summarize
from pyro_mpt.estimators import (
    ChainEstimator,
    ExhaustiveEstimator,
    StratifiedEstimator,
    UniformEstimator,
    get_estimator,
)
from pyro_mpt.models import ppca_collapsed, ppca_log_marginal, sample_ppca
from tests.conftest import assert_close

N, T, K = 5, 4, 2


def _ppca():
    X, truth = sample_ppca(N, T, K, 0.5, generator=torch.Generator().manual_seed(0))
    args = (X, K, truth["W"], truth["loc"], truth["noise_scale"])
    per_sequence = torch.stack(
        [ppca_log_marginal(x[None], truth["W"], truth["loc"], truth["noise_scale"]) for x in X]
    )
    return args, per_sequence


class _IndependentScorer:
    r"""Tokens independent of each other: :math:`\log p(x_{n,j} \mid x_O) = c_{n,j}` whatever
    :math:`O`, so :math:`\log p(x_n) = \sum_j c_{n,j}`."""

    def __init__(self, c):
        self.c = c

    def row_cost(self, shared=False):
        return self.c.numel()

    def row_scores(self, observed, scored):
        return (scored * self.c).sum(-1)


def _score(scorer, estimator, K, **kw):
    n, t = scorer.c.shape
    return score_masks(
        scorer, estimator, K, num_sequences=n, num_tokens=t, dtype=torch.float64, device="cpu", **kw
    )


def test_exhaustive_masks_give_the_exact_lml_of_a_gaussian_model():
    args, exact = _ppca()
    options = MPTOptions(estimator="exhaustive")
    layout, scorer, backend = prepare(ppca_collapsed, args, {}, options)
    draws, bins = score(layout, scorer, options.estimator, 1, max_elements=None, by_size=True)
    assert draws.shape == (1, N) and bins.shape == (1, N, T + 1)
    assert_close(draws[0], exact, atol=1e-10)
    assert_close(bins.sum(-1), draws, atol=1e-12)
    assert_close(bins[..., 0], torch.zeros(1, N), atol=0.0)  # no mask has size 0


def test_exhaustive_brute_force_sum_over_all_masks():
    """The exhaustive draw is :math:`\\sum_M \\frac{1}{m\\binom{T}{m}} \\sum_{j\\in M} c_j`,
    enumerated here by itertools; for independent tokens it is :math:`\\sum_j c_j`."""
    c = torch.randn(3, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws, _ = _score(_IndependentScorer(c), ExhaustiveEstimator(), 1)
    brute = torch.zeros(3, dtype=torch.float64)
    for m in range(1, T + 1):
        for subset in itertools.combinations(range(T), m):
            brute += c[:, list(subset)].sum(-1) / (m * math.comb(T, m))
    assert_close(draws[0], brute, atol=1e-12)
    assert_close(draws[0], c.sum(-1), atol=1e-12)


@pytest.mark.parametrize("estimator", ["stratified", "uniform", "chain", "fixed"])
def test_bins_by_size_sum_to_the_draws(estimator):
    c = torch.randn(N, T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    draws, bins = _score(
        _IndependentScorer(c), get_estimator(estimator), 3, by_size=True, generator=g
    )
    assert draws.shape == (3, N) and bins.shape == (3, N, T + 1)
    assert_close(bins.sum(-1), draws, atol=1e-12)


def test_chain_is_exact_for_independent_tokens():
    c = torch.randn(N, T, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    draws, _ = _score(_IndependentScorer(c), ChainEstimator(), 4)
    assert_close(draws, c.sum(-1).expand(4, N), atol=1e-12)


def test_draws_match_a_manual_loop_over_the_estimators_batches():
    c = torch.randn(N, T, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scorer = _IndependentScorer(c)
    draws, _ = _score(scorer, StratifiedEstimator(), 2, generator=torch.Generator().manual_seed(6))
    manual = torch.zeros(2, N, dtype=torch.float64)
    for batch in StratifiedEstimator().batches(
        N,
        T,
        2,
        device="cpu",
        dtype=torch.float64,
        max_rows=10**6,
        generator=torch.Generator().manual_seed(6),
    ):
        for r in range(batch.draw.shape[0]):
            manual[batch.draw[r]] += batch.weight[r] * (batch.scored[r] * c).sum(-1)
    assert_close(draws, manual, atol=1e-12)


def test_chunking_does_not_change_deterministic_draws():
    c = torch.randn(N, T, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    scorer = _IndependentScorer(c)
    big, _ = _score(scorer, ExhaustiveEstimator(), 1)
    small, _ = _score(scorer, ExhaustiveEstimator(), 1, max_elements=c.numel() * 2)  # 2 rows
    assert_close(small, big, atol=1e-12)


def test_shared_masks_score_one_mask_for_all_sequences():
    """With ``c[n] = (n + 1) * base`` a shared mask gives ``draws[:, n] = (n + 1) *
    draws[:, 0]``; masks drawn per sequence do not."""
    base = torch.randn(T, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    c = torch.arange(1.0, N + 1, dtype=torch.float64).unsqueeze(-1) * base
    g = torch.Generator().manual_seed(9)
    shared, _ = _score(_IndependentScorer(c), UniformEstimator(), 50, share_masks=True, generator=g)
    assert_close(shared, shared[:, :1] * torch.arange(1.0, N + 1), atol=1e-12)
    g = torch.Generator().manual_seed(9)
    own, _ = _score(_IndependentScorer(c), UniformEstimator(), 50, generator=g)
    assert not torch.allclose(own, own[:, :1] * torch.arange(1.0, N + 1))


def test_exhaustive_estimator_with_several_draws_is_exact_in_each():
    args, exact = _ppca()
    est = MaskedELBO(estimator="exhaustive", num_masks=3).estimate(ppca_collapsed, None, *args)
    assert est.draws.shape == (3, N)
    assert_close(est.draws, exact.expand(3, N), atol=1e-10)
    assert_close(est.total, exact.sum(), atol=1e-10)
    assert est.stderr == pytest.approx(0.0, abs=1e-10)


def test_estimate_statistics_against_a_direct_computation():
    draws = torch.tensor([[1.0, 2.0, 4.0], [3.0, 1.0, 5.0]], dtype=torch.float64)
    scale = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    est = MPTEstimate.from_draws(draws, StratifiedEstimator(), "gaussian", scale=scale)
    d = draws.numpy()
    s = scale.numpy()
    assert float(est.total) == pytest.approx((s * d.mean(0)).sum())
    var = (s**2 * d.var(0, ddof=1)).sum() / 2
    assert est.stderr == pytest.approx(math.sqrt(var))
    shared = MPTEstimate.from_draws(
        draws, StratifiedEstimator(), "gaussian", scale=scale, share_masks=True
    )
    assert shared.stderr == pytest.approx(math.sqrt((d * s).sum(-1).var(ddof=1) / 2))
    one = MPTEstimate.from_draws(draws[:1], UniformEstimator(), "mlm")
    assert float(one.total) == pytest.approx(7.0) and math.isnan(one.stderr)
    assert (one.estimator, one.conditionals, one.unbiased) == ("uniform", "mlm", True)


def test_summarize_applies_the_layouts_scale():
    args, _ = _ppca()
    layout, _, backend = prepare(ppca_collapsed, args, {}, MPTOptions())
    draws = torch.arange(2.0 * N, dtype=torch.float64).reshape(2, N)
    est = summarize(draws, layout, StratifiedEstimator(), backend)
    assert float(est.total) == pytest.approx(float((layout.scale * draws.mean(0)).sum()))
    assert est.conditionals == backend.name == "gaussian"


def test_options_accept_numpy_integers():
    opts = MPTOptions(num_masks=np.int64(3), num_samples=np.int32(7), max_elements=np.int64(99))
    assert (opts.num_masks, opts.num_samples, opts.max_elements) == (3, 7, 99)
    assert type(opts.num_masks) is int and type(opts.num_samples) is int


@pytest.mark.parametrize("value", ["no", 0, None, "False"])
def test_share_masks_must_be_a_real_bool(value):
    with pytest.raises(TypeError, match="share_masks must be True or False"):
        MPTOptions(share_masks=value)
    with pytest.raises(TypeError, match="share_masks must be True or False"):
        MaskedELBO(share_masks=value)


def test_options_num_particles_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="num_particles= is deprecated"):
        opts = MPTOptions(num_particles=12)
    assert opts.num_samples == 12
    with pytest.raises(TypeError, match="pass num_samples= only"):
        MPTOptions(num_particles=12, num_samples=13)
    with pytest.raises(ValueError, match="num_particles must be an integer >= 1, got 0"):
        MPTOptions(num_particles=0)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_samples=0), "num_samples must be an integer >= 1, got 0"),
        (dict(num_masks=True), "num_masks must be an integer >= 1, got True"),
        (dict(quadrature_points=2.0), "quadrature_points must be an integer >= 1"),
        (dict(max_elements=-1), "max_elements must be an integer >= 1 or None, got -1"),
        (dict(mask_rate=1.5), r"mask_rate must lie in \(0, 1\]"),
        (dict(conditionals="laplace"), "unknown conditionals 'laplace'"),
    ],
)
def test_options_errors_name_the_argument_and_value(options, message):
    with pytest.raises(ValueError, match=message):
        MPTOptions(**options)


def test_scoring_module_is_a_shim_of_the_engine():
    assert pyro_mpt.scoring.score is score
    assert pyro_mpt.scoring.MPTOptions is MPTOptions
    assert pyro_mpt.scoring.MPTEstimate is MPTEstimate

r"""Nested and affine stratified masks (``StratifiedEstimator(masks="nested" | "affine")``):
the ``T`` masks of a draw come from ONE random order (its last ``m`` tokens, or its ranks
through a random affine map of Z_T per mask). Each size's mask is still uniform (counted over
many draws), the estimate is still unbiased (mean of many draws within 4 SE of the exact LML),
nested masks are nested, and the scorer sees ``observed`` and ``scored`` disjoint and
complementary."""

import math
from itertools import combinations

import pytest
import torch

from pyro_mpt.engine import MPTOptions, prepare, score, score_masks
from pyro_mpt.estimators import StratifiedEstimator, UniformEstimator
from pyro_mpt.models import ppca_collapsed, ppca_log_marginal, sample_ppca
from tests.conftest import assert_close

NESTED = StratifiedEstimator(masks="nested")
AFFINE = StratifiedEstimator(masks="affine")
ONE_ORDER = pytest.mark.parametrize("estimator", [NESTED, AFFINE], ids=lambda e: e.masks)


def _rows(estimator, N, T, num_draws, max_rows=10_000, seed=0):
    batches = list(
        estimator.batches(
            N,
            T,
            num_draws,
            device="cpu",
            dtype=torch.float64,
            max_rows=max_rows,
            generator=torch.Generator().manual_seed(seed),
        )
    )
    return {
        k: torch.cat([getattr(b, k) for b in batches])
        for k in ("observed", "scored", "weight", "size", "draw")
    }


@ONE_ORDER
@pytest.mark.parametrize("T", [5, 6])  # 6: a composite T, whose units are 1 and 5
def test_each_sizes_mask_is_uniform_over_subsets(estimator, T):
    r"""20000 draws of 2 sequences: the counts of each size's ``C(T, m)`` subsets pass a chi-square test, :math:`\chi^2 < \nu + 5\sqrt{2\nu}` with
    :math:`\nu = C(5, m) - 1` (the statistic has mean :math:`\nu` and sd
    :math:`\sqrt{2\nu}` under uniformity; the seed is fixed, so the test is deterministic)."""
    N, K = 2, 20_000
    rows = _rows(estimator, N, T, K, max_rows=7_919)
    scored = rows["scored"].view(K, T, N, T)  # (draw, size - 1, sequence, token)
    code = (scored.long() * (2 ** torch.arange(T))).sum(-1)  # subset as a bit pattern
    for m in range(1, T + 1):
        subsets = [sum(2**t for t in c) for c in combinations(range(T), m)]
        counts = torch.stack([(code[:, m - 1] == s).sum() for s in subsets]).double()
        assert counts.sum() == K * N  # every mask of size m is one of these subsets
        expected = K * N / len(subsets)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        dof = len(subsets) - 1
        assert chi2 <= dof + 5 * math.sqrt(2 * dof) + 1e-12, (m, chi2, dof)


def test_masks_of_a_draw_are_nested_and_sized():
    N, T, K = 3, 7, 4
    rows = _rows(NESTED, N, T, K, max_rows=5)  # chunks split draws
    scored = rows["scored"].view(K, T, N, T)
    assert torch.equal(
        rows["size"].view(K, T, N), torch.arange(1, T + 1).view(1, T, 1).expand(K, T, N)
    )
    assert torch.equal(scored.sum(-1), rows["size"].view(K, T, N))
    # M_m is a subset of M_{m+1}: one order per draw and sequence
    assert (scored[:, :-1] <= scored[:, 1:]).all()
    assert_close(rows["weight"], 1.0 / rows["size"].double(), atol=0.0)
    # the orders differ between draws and sequences
    order = scored.sum(1)  # (K, N, T): T - position of each token in its order
    assert len({tuple(order[k, n].tolist()) for k in range(K) for n in range(N)}) > 1


def test_one_order_of_keys_per_draw_and_sequence():
    """The nested masks consume ``(num_draws, N, T)`` random keys in all (the independent
    ones ``(num_draws T, N, T)``); the affine ones add two integers per mask and sequence."""
    N, T, K = 3, 6, 4
    kw = dict(device="cpu", dtype=torch.float64, max_rows=10**6)
    g = torch.Generator().manual_seed(1)
    list(NESTED.batches(N, T, K, generator=g, **kw))
    expected = torch.Generator().manual_seed(1)
    torch.rand(K, N, T, generator=expected)
    assert torch.equal(g.get_state(), expected.get_state())
    g = torch.Generator().manual_seed(1)
    list(AFFINE.batches(N, T, K, generator=g, **kw))
    expected = torch.Generator().manual_seed(1)
    torch.rand(K, N, T, generator=expected)
    torch.randint(2, (K * T, N, 1), generator=expected)
    torch.randint(T, (K * T, N, 1), generator=expected)
    assert torch.equal(g.get_state(), expected.get_state())


def test_affine_masks_are_less_dependent_than_nested():
    """Nested masks of one draw always overlap (the smaller inside the larger); the affine
    masks of sizes ``m`` and ``m'`` share on average :math:`m m' / T` tokens, as independent
    masks do (T = 7 prime: the affine maps act 2-transitively)."""
    N, T, K = 1, 7, 4000
    scored = _rows(AFFINE, N, T, K)["scored"].view(K, T, T).double()
    overlap = torch.einsum("kat,kbt->ab", scored, scored) / K  # mean |M_a & M_b|
    m = torch.arange(1, T + 1, dtype=torch.float64)
    off = ~torch.eye(T, dtype=torch.bool)
    assert_close(overlap[off], (m.outer(m) / T)[off], atol=0.1)


class _Spy:
    """Independent tokens, :math:`\\log p(x_j \\mid x_O) = c_j`; checks every row it sees."""

    telescopes = False

    def __init__(self, c):
        self.c, self.seen = c, 0

    def row_cost(self, shared=False):
        return self.c.numel()

    def row_scores(self, observed, scored):
        assert not (observed & scored).any()  # disjoint
        assert (observed | scored).all()  # complementary: nothing marginalised
        self.seen += observed.shape[0]
        return (scored * self.c).sum(-1)


@ONE_ORDER
@pytest.mark.parametrize("share_masks", [False, True])
def test_scorer_sees_disjoint_complementary_rows(estimator, share_masks):
    N, T, K = 4, 5, 3
    c = torch.randn(N, T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    spy = _Spy(c)
    kw = dict(num_sequences=N, num_tokens=T, dtype=torch.float64, device="cpu")
    g = torch.Generator().manual_seed(0)
    draws, _ = score_masks(
        spy, estimator, K, max_elements=3 * c.numel(), share_masks=share_masks, generator=g, **kw
    )
    assert spy.seen == K * T
    # the draws are the weighted row sums of the very masks the estimator makes
    rows = _rows(estimator, 1 if share_masks else N, T, K, seed=0)
    expected = (rows["weight"] * (rows["scored"] * c).sum(-1)).view(K, T, -1).sum(1)
    assert_close(draws, expected.expand(K, N), atol=1e-12)


@pytest.mark.parametrize("masks", ["nested", "affine"])
def test_draws_are_unbiased_for_the_exact_lml(masks):
    """Mean of 400 draws of collapsed PPCA within 4 SE of the exact LML."""
    N, T, K, num = 4, 6, 2, 400
    X, truth = sample_ppca(N, T, K, 0.5, generator=torch.Generator().manual_seed(1))
    args = (X, K, truth["W"], truth["loc"], truth["noise_scale"])
    exact = float(ppca_log_marginal(X, truth["W"], truth["loc"], truth["noise_scale"]))
    options = MPTOptions(masks=masks, num_masks=num)
    layout, scorer, _ = prepare(ppca_collapsed, args, {}, options)
    with torch.no_grad():
        draws, _ = score(layout, scorer, options.estimator, num, max_elements=None)
    totals = draws.sum(-1)
    se = float(totals.std()) / math.sqrt(num)
    assert se > 1e-3  # random, so the check below can fail
    assert abs(float(totals.mean()) - exact) < 4 * se, (float(totals.mean()), exact, se)


def test_default_masks_are_affine_where_every_token_is_present():
    """``masks="auto"`` (the default) draws exactly the affine masks from the same stream;
    ragged sequences take independent masks (tests/test_pyro_semantics.py)."""
    default = StratifiedEstimator()
    assert default.masks == "auto" and default.resolved_masks == "affine"
    assert MPTOptions().estimator.masks == "auto"
    for key in ("observed", "scored", "weight", "size", "draw"):
        assert torch.equal(_rows(default, 3, 7, 4)[key], _rows(AFFINE, 3, 7, 4)[key])
    assert not torch.equal(
        _rows(default, 3, 7, 4)["scored"],
        _rows(StratifiedEstimator(masks="independent"), 3, 7, 4)["scored"],
    )


def test_options_choose_the_masks():
    assert MPTOptions().estimator.nested is False
    assert MPTOptions(masks="nested").estimator.nested is True
    assert MPTOptions(masks="independent").estimator.nested is False
    assert MPTOptions(estimator=NESTED, masks="nested").estimator is NESTED
    assert repr(NESTED) == "StratifiedEstimator(masks='nested')"
    assert MPTOptions(masks="affine").estimator.masks == "affine"


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"masks": "sorted"}, ValueError, "unknown masks 'sorted'"),
        ({"masks": "nested", "estimator": "uniform"}, ValueError, "masks='nested' applies to"),
        ({"masks": "nested", "estimator": UniformEstimator()}, ValueError, "masks='nested'"),
        ({"masks": "independent", "estimator": NESTED}, ValueError, "contradicts"),
    ],
)
def test_bad_masks_options_raise(options, error, match):
    with pytest.raises(error, match=match):
        MPTOptions(**options)


def test_unknown_masks_raise():
    with pytest.raises(ValueError, match="unknown masks 'yes'"):
        StratifiedEstimator(masks="yes")

r"""Mask estimators: the masks they draw and the weights they attach (acceptance criterion 8),
and the statistical claims about them (criteria 3 and 6):

- ``"uniform"`` and ``"stratified"`` are unbiased for :math:`\log p(X)`, and so are their
  gradients, with exact conditionals (collapsed PPCA, checked against the closed form);
- ``"fixed"`` is biased: its expectation is :math:`T\,S(\mathrm{round}(rT))`, which the
  exhaustive curve computes exactly, and which differs from :math:`\log p(X)`.

Statistical checks use 400 independent draws and allow 4 Monte Carlo standard errors
(seeded, so deterministic; a two-sided 4-SE band has a false-alarm rate of about 6e-5 per
compared quantity for a normal mean).
"""

import math
from itertools import combinations

import pytest
import torch

from pyro_mpt import MaskedELBO
from pyro_mpt.estimators import (
    ESTIMATORS,
    MAX_EXHAUSTIVE_TOKENS,
    ChainEstimator,
    ExhaustiveEstimator,
    FixedRateEstimator,
    MaskEstimator,
    StratifiedEstimator,
    UniformEstimator,
    check_mask_rate,
    get_estimator,
)
from pyro_mpt.models import ppca_collapsed, ppca_log_marginal, sample_ppca
from tests.conftest import assert_close

NUM_SE = 4.0


def _collect(estimator, N, T, num_draws, max_rows=10_000, generator=None):
    """All mask rows of ``num_draws`` draws, concatenated over chunks."""
    batches = list(
        estimator.batches(
            N,
            T,
            num_draws,
            device=torch.device("cpu"),
            dtype=torch.float64,
            max_rows=max_rows,
            generator=generator,
        )
    )
    assert all(b.observed.shape[0] <= max_rows for b in batches)
    cat = {
        k: torch.cat([getattr(b, k) for b in batches])
        for k in ("observed", "scored", "weight", "size", "draw")
    }
    return cat, batches


ALL_ESTIMATORS = [
    UniformEstimator(),
    StratifiedEstimator(),
    StratifiedEstimator(masks="nested"),
    StratifiedEstimator(masks="affine"),
    ChainEstimator(),
    FixedRateEstimator(0.3),
    ExhaustiveEstimator(),
]


# ----------------------------------------------------------------------------------------
# Properties shared by every estimator
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ALL_ESTIMATORS, ids=lambda e: e.name)
@pytest.mark.parametrize("max_rows", [3, 10_000])
def test_masks_are_well_formed(estimator, max_rows):
    N, T = 3, 5
    num_draws = 1 if estimator.name == "exhaustive" else 7
    rows, batches = _collect(estimator, N, T, num_draws, max_rows=max_rows)
    observed, scored = rows["observed"], rows["scored"]
    R = num_draws * estimator.rows_per_draw(T)
    assert observed.shape == scored.shape == (R, N, T)
    assert observed.dtype == scored.dtype == torch.bool
    assert rows["weight"].shape == rows["size"].shape == (R, N)
    assert rows["draw"].shape == (R,)
    assert rows["weight"].dtype == torch.float64
    # the conditioning set and the scored tokens are disjoint; every row scores something
    assert not (observed & scored).any()
    assert (scored.sum(-1) >= 1).all()
    # size is the mask size m = T - |O| that the row stands for
    assert torch.equal(rows["size"], T - observed.sum(-1))
    assert ((rows["size"] >= 1) & (rows["size"] <= T)).all()
    # every draw gets rows_per_draw rows, and draws are numbered 0..num_draws-1
    counts = torch.bincount(rows["draw"], minlength=num_draws)
    assert counts.tolist() == [estimator.rows_per_draw(T)] * num_draws
    assert (torch.diff(rows["draw"]) >= 0).all()
    assert (rows["weight"] > 0).all()


@pytest.mark.parametrize("estimator", ALL_ESTIMATORS, ids=lambda e: e.name)
def test_weights_as_documented(estimator):
    N, T = 4, 6
    num_draws = 1 if estimator.name == "exhaustive" else 5
    rows, _ = _collect(estimator, N, T, num_draws)
    m = rows["size"].to(torch.float64)
    n_scored = rows["scored"].sum(-1).to(torch.float64)
    if estimator.name in ("uniform", "fixed"):
        # T * s(M) = (T / m) * sum_{j in M} log p(x_j | x_O)
        assert torch.equal(n_scored, m)
        assert_close(rows["weight"], T / m, atol=1e-15)
    elif estimator.name == "stratified":
        # sum_m s(M_m): weight 1/m on each of the m scored tokens
        assert torch.equal(n_scored, m)
        assert_close(rows["weight"], 1.0 / m, atol=1e-15)
    elif estimator.name == "chain":
        # one token per row, weight 1: sum_i log p(x_{pi_i} | x_{pi_<i})
        assert (n_scored == 1).all()
        assert_close(rows["weight"], torch.ones_like(m), atol=0.0)
    elif estimator.name == "exhaustive":
        assert torch.equal(n_scored, m)
        binom = torch.tensor([float(math.comb(T, int(k))) for k in rows["size"].flatten()])
        assert_close(rows["weight"], 1.0 / (m * binom.view_as(m)), atol=1e-15)
    else:  # pragma: no cover
        raise AssertionError(estimator.name)


@pytest.mark.parametrize("estimator", ALL_ESTIMATORS, ids=lambda e: e.name)
def test_total_weight_of_a_draw_is_T(estimator):
    """Summed over a draw's rows, weight times the number of scored tokens is ``T`` for
    every estimator: sum over m = 1..T of (1/m) * m (stratified, chain, exhaustive:
    sum_m C(T,m) (1/(m C(T,m))) m) or (T/m) * m (uniform, fixed). A log-density that is
    the same constant c for every token and mask thus scores T c, as log p(x) would."""
    N, T = 2, 4
    num_draws = 1 if estimator.name == "exhaustive" else 3
    rows, _ = _collect(estimator, N, T, num_draws)
    per_draw = torch.zeros(num_draws, N, dtype=torch.float64)
    per_draw.index_add_(0, rows["draw"], rows["weight"] * rows["scored"].sum(-1))
    assert_close(per_draw, torch.full_like(per_draw, float(T)), atol=1e-12)


# ----------------------------------------------------------------------------------------
# Estimator-specific structure
# ----------------------------------------------------------------------------------------


def test_stratified_rows_have_every_size_once():
    N, T, K = 3, 6, 5
    rows, _ = _collect(StratifiedEstimator(), N, T, K, max_rows=4)
    size = rows["size"].view(K, T, N)
    expected = torch.arange(1, T + 1).view(1, T, 1).expand(K, T, N)
    assert torch.equal(size, expected)
    assert torch.equal(rows["scored"].sum(-1).view(K, T, N), expected)
    assert torch.equal(rows["observed"], ~rows["scored"])


@pytest.mark.parametrize("max_rows", [1, 4, 10_000])
def test_chain_rows_follow_one_order_per_draw(max_rows):
    """Row i of a draw scores the i-th token of one random order and observes exactly the
    tokens scored by the rows before it; the order is shared by the draw's T rows even when
    the rows are split over chunks, and differs between draws and between sequences."""
    N, T, K = 4, 5, 6
    rows, batches = _collect(ChainEstimator(), N, T, K, max_rows=max_rows)
    if max_rows < K * T:
        assert len(batches) > 1
    observed = rows["observed"].view(K, T, N, T)
    scored = rows["scored"].view(K, T, N, T)
    assert torch.equal(rows["draw"].view(K, T), torch.arange(K).unsqueeze(-1).expand(K, T))
    # each row scores exactly one token; over a draw's rows each token exactly once
    assert (scored.sum(-1) == 1).all()
    assert (scored.sum(1) == 1).all()
    # row i observes the union of the tokens scored by rows 0..i-1 (the chain's prefix)
    prefix = torch.cumsum(scored.to(torch.long), dim=1) - scored.to(torch.long)
    assert torch.equal(observed, prefix.bool())
    assert torch.equal(observed.sum(-1), torch.arange(T).view(1, T, 1).expand(K, T, N))
    assert torch.equal(
        rows["size"].view(K, T, N), (T - torch.arange(T)).view(1, T, 1).expand(K, T, N)
    )
    # the orders are random: not all equal across draws or sequences
    order = scored.to(torch.long).argmax(-1)  # (K, T, N): token scored at step i
    flat = order.permute(0, 2, 1).reshape(K * N, T)
    assert len({tuple(r.tolist()) for r in flat}) > 1


def test_exhaustive_enumerates_every_nonempty_mask_once():
    N, T = 2, 5
    rows, _ = _collect(ExhaustiveEstimator(), N, T, 1, max_rows=7)
    scored = rows["scored"]
    assert scored.shape[0] == 2**T - 1
    # the same masks for every sequence
    assert torch.equal(scored[:, 0], scored[:, 1])
    masks = {tuple(r.tolist()) for r in scored[:, 0]}
    assert len(masks) == 2**T - 1
    expected = {
        tuple(t in subset for t in range(T))
        for m in range(1, T + 1)
        for subset in combinations(range(T), m)
    }
    assert masks == expected
    assert torch.equal(rows["observed"], ~scored)
    assert (rows["draw"] == 0).all()


def test_exhaustive_refuses_long_sequences():
    est = ExhaustiveEstimator()
    with pytest.raises(ValueError, match="stratified"):
        next(
            est.batches(
                1,
                MAX_EXHAUSTIVE_TOKENS + 1,
                1,
                device=torch.device("cpu"),
                dtype=torch.float64,
                max_rows=10,
            )
        )


def test_uniform_sizes_and_tokens_are_uniform():
    """Chi-square goodness of fit (seeded) of the sizes m ~ U{1..T} and, given the size, of
    which tokens are masked (each token in M with probability m/T)."""
    N, T, K = 4, 5, 2000
    rows, _ = _collect(UniformEstimator(), N, T, K)
    size = rows["size"].flatten()
    counts = torch.bincount(size, minlength=T + 1)[1:].to(torch.float64)
    expected = size.numel() / T
    chi2 = ((counts - expected) ** 2 / expected).sum()
    # df = T - 1 = 4; the 0.999 quantile of chi2(4) is 18.47
    assert chi2 < 18.47, (counts, chi2)
    # token inclusion given the size, pooled over sizes: E[#masks containing t] = sum m/T
    scored = rows["scored"].reshape(-1, T).to(torch.float64)
    incl = scored.sum(0)
    exp_incl = (size.to(torch.float64) / T).sum()
    # binomial-ish counts; 5 cells, allow 4 SE each with SE = sqrt(exp * (1 - E[m]/T))
    se = (exp_incl * (1 - (T + 1) / (2 * T))).sqrt()
    assert ((incl - exp_incl).abs() < NUM_SE * se).all(), (incl, exp_incl, se)


def test_stratified_and_fixed_masks_are_uniform_over_tokens():
    N, T, K = 3, 6, 1500
    for est in (StratifiedEstimator(), FixedRateEstimator(0.5)):
        rows, _ = _collect(est, N, T, K)
        scored = rows["scored"].to(torch.float64)
        size = rows["size"]
        for m in (1, 3):
            sel = (size == m).flatten()
            if not sel.any():
                continue
            hits = scored.reshape(-1, T)[sel]
            n = hits.shape[0]
            p = m / T
            se = math.sqrt(n * p * (1 - p))
            assert ((hits.sum(0) - n * p).abs() < NUM_SE * se).all(), (est.name, m, hits.sum(0))


def test_generator_makes_masks_reproducible():
    for est in (UniformEstimator(), StratifiedEstimator(), ChainEstimator(), FixedRateEstimator()):
        a, _ = _collect(est, 2, 5, 4, generator=torch.Generator().manual_seed(3))
        b, _ = _collect(est, 2, 5, 4, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a["scored"], b["scored"]) and torch.equal(a["observed"], b["observed"])


# ----------------------------------------------------------------------------------------
# The registry and the fixed rate
# ----------------------------------------------------------------------------------------


def test_registry_and_flags():
    assert set(ESTIMATORS) == {"uniform", "stratified", "chain", "fixed", "exhaustive"}
    for name in ESTIMATORS:
        est = get_estimator(name)
        assert isinstance(est, MaskEstimator) and est.name == name
        assert est.unbiased == (name != "fixed")
    inst = StratifiedEstimator()
    assert get_estimator(inst) is inst
    assert get_estimator("fixed", 0.4).mask_rate == 0.4
    assert get_estimator("fixed").mask_rate == 0.15
    with pytest.raises(ValueError, match="unknown estimator"):
        get_estimator("bert")
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_rate"):
            FixedRateEstimator(bad)


@pytest.mark.parametrize(
    "rate, T, m",
    [
        (0.15, 10, 2),  # 1.5 (float 0.15 * 10 == 1.5) rounds to 2
        (0.15, 5, 1),  # 0.75 -> 1
        (0.1, 3, 1),  # 0.3 rounds to 0, clamped to 1
        (0.01, 50, 1),  # 0.5 rounds (half to even) to 0, clamped to 1
        (0.15, 20, 3),
        (0.8, 10, 8),
        (0.8, 7, 6),  # 5.6 -> 6
        (0.34, 10, 3),  # 3.4 -> 3
        (1.0, 9, 9),
        (0.99, 9, 9),  # 8.91 -> 9
    ],
)
def test_fixed_rate_mask_size_rounding(rate, T, m):
    est = FixedRateEstimator(rate)
    assert est.mask_size(T) == m
    rows, _ = _collect(est, 2, T, 3)
    assert (rows["size"] == m).all() and (rows["scored"].sum(-1) == m).all()


# ----------------------------------------------------------------------------------------
# Unbiasedness of uniform and stratified (criterion 3)
# ----------------------------------------------------------------------------------------


def _per_draw_jacobian(draw_totals, param):
    """``(K, param.numel())``: the gradient of every draw w.r.t. ``param``, by the
    double-backward trick (``J = d/du grad_param(u . d)``, one pass per parameter element)."""
    K = draw_totals.shape[0]
    u = torch.zeros(K, dtype=draw_totals.dtype, requires_grad=True)
    (g,) = torch.autograd.grad((draw_totals * u).sum(), param, create_graph=True)
    g = g.reshape(-1)
    cols = [torch.autograd.grad(g[i], u, retain_graph=True)[0] for i in range(g.numel())]
    return torch.stack(cols, -1)


@pytest.mark.parametrize(
    "estimator, share_masks",
    [("uniform", False), ("stratified", False), ("stratified", True)],
)
def test_unbiased_estimators_mean_and_gradient(estimator, share_masks):
    N, T, K, num = 4, 6, 2, 400
    X, truth = sample_ppca(N, T, K, 0.5, generator=torch.Generator().manual_seed(1))
    W = truth["W"].clone().requires_grad_(True)
    loc, sigma = truth["loc"], truth["noise_scale"]
    exact = ppca_log_marginal(X, W, loc, sigma)
    (exact_grad,) = torch.autograd.grad(exact, W)

    def model(X):
        ppca_collapsed(X, K, W, loc, sigma)

    est = MaskedELBO(estimator=estimator, num_masks=num, share_masks=share_masks).estimate(
        model, None, X
    )
    assert est.draws.shape == (num, N)
    assert est.unbiased and est.estimator == estimator and est.conditionals == "gaussian"
    totals = est.draws.sum(-1)  # (num,) one estimate of log p(X) per draw
    assert_close(est.total, totals.mean(), atol=1e-10)
    se = totals.detach().std() / math.sqrt(num)
    assert se > 1e-3  # the estimator is random (otherwise the check below is vacuous)
    mean, exact_value = float(totals.detach().mean()), float(exact.detach())
    assert abs(mean - exact_value) < NUM_SE * float(se), (mean, exact_value, float(se))
    # the reported stderr estimates the same quantity (independent masks per sequence add
    # variances; shared masks use the spread of the totals)
    assert 0.7 < est.stderr / float(se) < 1.4, (est.stderr, float(se))

    # gradients: elementwise |mean - exact| < 4 SE, SE of the mean of the 400 per-draw
    # gradients (T * K = 12 elements)
    J = _per_draw_jacobian(totals, W)  # (num, T*K)
    g_mean = J.mean(0)
    g_se = J.std(0) / math.sqrt(num)
    assert (g_se > 1e-6).all()
    err = (g_mean - exact_grad.reshape(-1)).abs()
    assert (err < NUM_SE * g_se).all(), err / g_se
    # the mean gradient also equals the gradient of the mean (autograd is linear)
    (g_total,) = torch.autograd.grad(est.total, W)
    assert_close(g_total.reshape(-1), g_mean, atol=1e-10)


def test_exhaustive_with_several_draws_enumerates_every_mask_in_each():
    """Each of ``num_draws`` draws gets all ``2^T - 1`` masks (each draw is exact); one
    chunk never spans two draws."""
    N, T = 2, 4
    rows, batches = _collect(ExhaustiveEstimator(), N, T, 3, max_rows=6)
    assert rows["scored"].shape[0] == 3 * (2**T - 1)
    assert all(len(set(b.draw.tolist())) == 1 for b in batches)
    counts = torch.bincount(rows["draw"], minlength=3)
    assert counts.tolist() == [2**T - 1] * 3
    for d in range(3):
        weights = rows["weight"][rows["draw"] == d][:, 0]
        sizes = rows["scored"][rows["draw"] == d][:, 0].sum(-1)
        # total weight of a draw: sum_m C(T, m) m / (m C(T, m)) = T
        assert_close((weights * sizes).sum(), float(T), atol=1e-12)


def test_mask_rate_checks_are_options_checks():
    assert check_mask_rate(0.25) == 0.25
    for bad in (True, "x", float("nan")):
        with pytest.raises(ValueError, match=r"mask_rate must lie in \(0, 1\]"):
            check_mask_rate(bad)

r"""Tests of :mod:`pyro_mpt.mlm`: MPT curves, areas and pseudo-log-likelihoods of masked
predictors, against the exact HMM posterior predictive (the ideal masked language model)."""

import pytest
import torch

from pyro_mpt import MPTCurve, MPTEstimate, models
from pyro_mpt.engine import MPTOptions, prepare
from pyro_mpt.mlm import (
    MLMCurve,
    hmm_predictor,
    mlm_curve,
    mlm_estimate,
    pseudo_log_likelihood,
)
from tests.conftest import assert_close, random_hmm_params, sample_hmm_data

C, V = 3, 5


def _hmm_params(seed=0):
    return random_hmm_params(C, V, seed)


def _hmm_data(N, T, seed=0):
    return sample_hmm_data(N, T, C, V, seed)


def _recording(predictor):
    """Wraps a predictor, recording every call's ``B * T * V``."""
    calls = []

    def wrapped(tokens, mask):
        out = predictor(tokens, mask)
        calls.append(out.numel())
        return out

    return wrapped, calls


# ----------------------------------------------------------------------------------------
# The ground-truth predictor
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_hmm_predictor_matches_variable_elimination(seed):
    N, T = 3, 6
    X, init, trans, emit = _hmm_data(N, T, seed=seed)
    _, scorer, _ = prepare(
        lambda X: models.hmm(X, init, trans, emit), (X,), {}, MPTOptions(conditionals="enumerate")
    )
    R = 12
    g = torch.Generator().manual_seed(10 + seed)
    u = torch.rand(R, N, T, generator=g)
    observed = u < 0.4
    scored = u > 0.6  # disjoint; the rest is marginalised (hidden but not scored)
    scored[..., 0] |= ~scored.any(-1)  # at least one scored token per row
    observed &= ~scored
    expected = scorer(observed, scored)  # (R, N, T)

    predictor = hmm_predictor(init, trans, emit)
    toks = X.unsqueeze(0).expand(R, N, T).reshape(R * N, T)
    logp = predictor(toks, (~observed).reshape(R * N, T))
    assert logp.shape == (R * N, T, V)
    got = logp.gather(-1, toks.unsqueeze(-1)).squeeze(-1).reshape(R, N, T)
    got = torch.where(scored, got, torch.zeros(()))
    assert_close(got, expected, atol=1e-8)
    # log-probabilities normalise over the vocabulary
    assert_close(logp.exp().sum(-1), torch.ones(R * N, T), atol=1e-12)


# ----------------------------------------------------------------------------------------
# Areas against the forward algorithm
# ----------------------------------------------------------------------------------------


def test_exhaustive_area_is_forward_lml():
    X, init, trans, emit = _hmm_data(3, 8)
    curve = mlm_curve(hmm_predictor(init, trans, emit), X, exhaustive=True)
    assert isinstance(curve, MPTCurve) and isinstance(curve, MLMCurve)
    assert curve.exhaustive and curve.conditionals == "mlm"
    assert curve.scores.shape == (8,) and curve.per_sequence.shape == (3, 8)
    assert_close(curve.area, models.hmm_log_marginal(X, init, trans, emit), atol=1e-8)
    assert_close(curve.stderr, torch.zeros(8), atol=0.0)
    # the last size masks everything: S(T) is the mean unconditional log-probability
    init_marg = [init]
    for _ in range(7):
        init_marg.append(init_marg[-1] @ trans)
    marg = torch.stack(init_marg) @ emit  # (T, V)
    s_T = marg.log().gather(-1, X.T).sum() / 8
    assert_close(curve.scores[-1], s_T, atol=1e-10)


def test_stratified_area_within_monte_carlo_error():
    X, init, trans, emit = _hmm_data(4, 8, seed=2)
    curve = mlm_curve(hmm_predictor(init, trans, emit), X, num_masks=64)
    exact = models.hmm_log_marginal(X, init, trans, emit)
    assert curve.area_stderr > 0 and not curve.exhaustive
    assert abs(float(curve.area - exact)) < 4 * curve.area_stderr
    ref = mlm_curve(hmm_predictor(init, trans, emit), X, exhaustive=True)
    assert torch.all((curve.scores - ref.scores).abs() <= 5 * curve.stderr + 1e-10)
    # the uniform estimator's bins, weighted T / m, are unbiased for S(m) too
    uni = mlm_curve(hmm_predictor(init, trans, emit), X, estimator="uniform", num_masks=400)
    assert abs(float(uni.area - exact)) < 4 * uni.area_stderr


@pytest.mark.parametrize("seed", [0, 3])
def test_chain_is_forward_lml(seed):
    X, init, trans, emit = _hmm_data(3, 10, seed=seed)
    exact = models.hmm_log_marginal(X, init, trans, emit)
    predictor = hmm_predictor(init, trans, emit)
    est = mlm_estimate(predictor, X, estimator="chain", num_masks=3)
    assert isinstance(est, MPTEstimate) and est.estimator == "chain" and est.unbiased
    assert_close(est.total, exact, atol=1e-8)
    assert_close(est.draws.sum(-1), exact.expand(3), atol=1e-8)  # zero variance
    curve = mlm_curve(predictor, X, estimator="chain", num_masks=2)
    assert_close(curve.area, exact, atol=1e-8)


def test_uniform_and_stratified_estimates_unbiased():
    X, init, trans, emit = _hmm_data(3, 8, seed=5)
    exact = models.hmm_log_marginal(X, init, trans, emit)
    predictor = hmm_predictor(init, trans, emit)
    for name, K in (("uniform", 400), ("stratified", 32)):
        est = mlm_estimate(predictor, X, estimator=name, num_masks=K)
        assert est.draws.shape == (K, 3)
        assert abs(float(est.total - exact)) < 4 * est.stderr, name


def test_fixed_rate_estimate():
    X, init, trans, emit = _hmm_data(3, 8, seed=1)
    predictor = hmm_predictor(init, trans, emit)
    curve = mlm_curve(predictor, X, exhaustive=True)
    # 0.25 * 8 = 2 tokens masked
    assert_close(curve.fixed_rate_estimate(0.25), 8 * curve.scores[1], atol=1e-12)
    est = mlm_estimate(predictor, X, estimator="fixed", mask_rate=0.25, num_masks=400)
    assert not est.unbiased and est.estimator == "fixed"
    assert abs(float(est.total - curve.fixed_rate_estimate(0.25))) < 4 * est.stderr


def test_chain_gradients_match_forward_algorithm():
    X, _, _, _ = _hmm_data(2, 6, seed=7)
    logits = [
        torch.randn(C, requires_grad=True),
        torch.randn(C, C, requires_grad=True),
        torch.randn(C, V, requires_grad=True),
    ]
    params = [p.softmax(-1) for p in logits]
    est = mlm_estimate(hmm_predictor(*params), X, estimator="chain")
    grads = torch.autograd.grad(est.total, logits)
    params = [p.softmax(-1) for p in logits]
    expected = torch.autograd.grad(models.hmm_log_marginal(X, *params), logits)
    for g, e in zip(grads, expected):
        assert_close(g, e, atol=1e-8)


# ----------------------------------------------------------------------------------------
# Pseudo-log-likelihood
# ----------------------------------------------------------------------------------------


def test_pll_equals_brute_force_leave_one_out():
    N, T = 4, 7
    X, init, trans, emit = _hmm_data(N, T, seed=3)
    predictor = hmm_predictor(init, trans, emit)
    brute = torch.zeros(N)
    for j in range(T):  # one predictor call per position
        mask = torch.zeros(N, T, dtype=torch.bool)
        mask[:, j] = True
        logp = predictor(X, mask)
        brute = brute + logp[:, j].gather(-1, X[:, j : j + 1]).squeeze(-1)
    small, calls = _recording(predictor)
    pll = pseudo_log_likelihood(small, X, max_elements=3 * T * V)
    assert pll.shape == (N,)
    assert_close(pll, brute, atol=1e-10)
    assert max(calls) <= 3 * T * V
    curve = mlm_curve(predictor, X, exhaustive=True)
    assert_close(pll.sum(), T * curve.scores[0], atol=1e-10)


# ----------------------------------------------------------------------------------------
# Memory, padding
# ----------------------------------------------------------------------------------------


def test_long_sequence_stays_under_budget():
    T, Vb = 512, 11
    emb = torch.randn(Vb + 1, Vb)  # row Vb: the mask token

    def predictor(tokens, mask):  # a cheap context-dependent predictor
        ids = torch.where(mask, torch.full_like(tokens, Vb), tokens)
        h = emb[ids]
        h = h + 0.5 * h.roll(1, dims=1) + 0.25 * h.mean(1, keepdim=True)
        return h.log_softmax(-1)

    tokens = torch.randint(0, Vb, (1, T))
    budget = 40 * T * Vb
    rec, calls = _recording(predictor)
    curve = mlm_curve(rec, tokens, num_masks=1, max_elements=budget)
    assert max(calls) <= budget
    assert len(calls) >= T // 40  # the T masks really were split into batches
    assert curve.scores.shape == (T,) and torch.isfinite(curve.area)
    rec, calls = _recording(predictor)
    pll = pseudo_log_likelihood(rec, tokens, max_elements=budget)
    assert max(calls) <= budget
    assert len(calls) >= 1 + T // 40
    # reference: all T leave-one-out rows in one unbudgeted call
    logp = predictor(tokens.expand(T, T), torch.eye(T, dtype=torch.bool))
    ref = logp.diagonal(dim1=0, dim2=1).T.gather(-1, tokens.T).sum()
    assert_close(pll.sum(), ref, atol=1e-8)


def test_padding_equals_separate_sequences():
    init, trans, emit = _hmm_params(4)
    predictor = hmm_predictor(init, trans, emit)
    lengths = [5, 8, 3, 8]
    T = max(lengths)
    X = models.sample_hmm(4, T, init, trans, emit, generator=torch.Generator().manual_seed(9))
    pad = torch.arange(T) >= torch.tensor(lengths).unsqueeze(-1)
    pad[2] = pad[2].flip(-1)  # left padding for one sequence
    tokens = torch.where(pad, torch.zeros_like(X), X)
    curve = mlm_curve(predictor, tokens, exhaustive=True, pad_mask=pad)
    pll = pseudo_log_likelihood(predictor, tokens, pad_mask=pad)
    exact, pll_sep, fixed = [], [], 0.0
    for n, L in enumerate(lengths):
        x = tokens[n][~pad[n]].unsqueeze(0)
        exact.append(models.hmm_log_marginal(x, init, trans, emit))
        pll_sep.append(pseudo_log_likelihood(predictor, x)[0])
        c = mlm_curve(predictor, x, exhaustive=True)
        assert_close(curve.per_sequence[n, :L], c.per_sequence[0], atol=1e-10)
        assert_close(curve.per_sequence[n, L:], torch.zeros(T - L), atol=0.0)
        fixed = fixed + c.fixed_rate_estimate(0.3)
    assert_close(curve.area, torch.stack(exact).sum(), atol=1e-8)
    assert_close(pll, torch.stack(pll_sep), atol=1e-10)
    assert_close(curve.fixed_rate_estimate(0.3), fixed, atol=1e-10)
    assert curve.lengths.tolist() == lengths
    strat = mlm_curve(predictor, tokens, num_masks=16, pad_mask=pad)
    assert abs(float(strat.area - curve.area)) < 4 * strat.area_stderr


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    X, init, trans, emit = _hmm_data(2, 5)
    predictor = hmm_predictor(init, trans, emit)
    with pytest.raises(ValueError, match="torch.long"):
        mlm_curve(predictor, X.double())
    with pytest.raises(ValueError, match=r"shape \(N, T\)"):
        mlm_curve(predictor, X[0])
    with pytest.raises(ValueError, match="pad_mask shape"):
        mlm_curve(predictor, X, pad_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="every token"):
        mlm_curve(predictor, X, pad_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask shape"):
        predictor(X, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"predictor returned shape \(1, 5\) for tokens"):
        mlm_curve(lambda t, m: torch.zeros(t.shape), X)
    with pytest.raises(ValueError, match="predictor returned shape"):
        mlm_curve(lambda t, m: torch.zeros(t.shape[0], t.shape[1] + 1, V), X)
    with pytest.raises(ValueError, match="vocabulary has V = 2"):
        mlm_curve(lambda t, m: torch.zeros(*t.shape, 2), X + 2)
    with pytest.raises(ValueError, match="max_elements"):
        mlm_curve(predictor, X, max_elements=5 * V - 1)
    with pytest.raises(ValueError, match="num_masks"):
        mlm_curve(predictor, X, num_masks=0)
    with pytest.raises(ValueError, match="estimator"):
        mlm_curve(predictor, X, estimator="fixed")
    with pytest.raises(ValueError, match="unknown estimator"):
        mlm_estimate(predictor, X, estimator="nope")
    with pytest.raises(ValueError, match="exhaustive estimator"):
        mlm_curve(predictor, torch.zeros(1, 17, dtype=torch.long), exhaustive=True)


def test_options_are_checked_before_the_predictor_is_called():
    X, init, trans, emit = _hmm_data(2, 5)
    rec, calls = _recording(hmm_predictor(init, trans, emit))
    with pytest.raises(ValueError, match="max_elements must be an integer >= 1 or None, got 0"):
        mlm_curve(rec, X, max_elements=0)
    with pytest.raises(TypeError, match="exhaustive must be True or False, got 'no'"):
        mlm_curve(rec, X, exhaustive="no")
    with pytest.raises(ValueError, match="num_masks must be an integer >= 1, got 1.0"):
        mlm_estimate(rec, X, num_masks=1.0)
    with pytest.raises(ValueError, match="max_elements must be an integer >= 1 or None"):
        pseudo_log_likelihood(rec, X, max_elements=-3)
    assert calls == []


def test_default_budget_is_the_devices_and_numpy_counts_are_accepted():
    import numpy as np

    from pyro_mpt.options import DEFAULT_MAX_ELEMENTS

    X, init, trans, emit = _hmm_data(3, 6)
    predictor = hmm_predictor(init, trans, emit)
    g = torch.Generator().manual_seed(0)
    default = mlm_curve(predictor, X, num_masks=np.int64(2), generator=g)
    g = torch.Generator().manual_seed(0)
    explicit = mlm_curve(predictor, X, num_masks=2, max_elements=DEFAULT_MAX_ELEMENTS, generator=g)
    assert_close(default.scores, explicit.scores, atol=0.0)


def test_exhaustive_estimate_with_several_draws_is_exact_in_each():
    X, init, trans, emit = _hmm_data(3, 6)
    est = mlm_estimate(hmm_predictor(init, trans, emit), X, estimator="exhaustive", num_masks=3)
    exact = torch.stack([models.hmm_log_marginal(x[None], init, trans, emit) for x in X])
    assert_close(est.draws, exact.expand(3, 3), atol=1e-10)
    assert_close(est.total, exact.sum(), atol=1e-10)
    assert est.stderr == pytest.approx(0.0, abs=1e-10)

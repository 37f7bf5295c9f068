r"""Tests of :mod:`pyro_mpt.mlm.scorer`: a masked predictor as a scorer of the engine, against
direct predictor calls (brute force) and the exact HMM marginal likelihood."""

import pytest
import torch

from pyro_mpt.engine import score_masks
from pyro_mpt.estimators import ChainEstimator, ExhaustiveEstimator
from pyro_mpt.mlm import hmm_predictor
from pyro_mpt.mlm.scorer import PredictedSequences, PredictorScorer, score_sequences
from pyro_mpt.models import hmm_log_marginal
from tests.conftest import assert_close, sample_hmm_data

C, V = 3, 5


def _rows(R, N, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(R, N, T, generator=g)
    scored = u > 0.6
    scored[..., 0] |= ~scored.any(-1)
    observed = (u < 0.4) & ~scored
    return observed, scored


@pytest.mark.parametrize("budget_rows", [1, 3, 1000])
def test_row_scores_equal_one_predictor_call_per_row(budget_rows):
    N, T, R = 3, 6, 5
    X, init, trans, emit = sample_hmm_data(N, T, C, V, seed=1)
    predictor = hmm_predictor(init, trans, emit)
    scorer = PredictorScorer(predictor, X, V, max_elements=budget_rows * T * V)
    observed, scored = _rows(R, N, T)
    rows = scorer.row_scores(observed, scored)
    per_token = scorer(observed, scored)
    assert rows.shape == (R, N) and per_token.shape == (R, N, T)
    brute = torch.zeros(R, N)
    for r in range(R):
        for n in range(N):
            logp = predictor(X[n : n + 1], ~observed[r, n : n + 1])[0]  # (T, V)
            brute[r, n] = logp[scored[r, n]].gather(-1, X[n][scored[r, n]].unsqueeze(-1)).sum()
    assert_close(rows, brute, atol=1e-12)
    assert_close(per_token.sum(-1), brute, atol=1e-12)
    assert_close(per_token[~scored], torch.zeros(int((~scored).sum())), atol=0.0)
    assert scorer.row_cost() == N * T * V


def test_shared_mask_rows_are_expanded_to_every_sequence():
    N, T = 4, 5
    X, init, trans, emit = sample_hmm_data(N, T, C, V, seed=2)
    scorer = PredictorScorer(hmm_predictor(init, trans, emit), X, V, max_elements=2**16)
    observed, scored = _rows(3, 1, T, seed=3)
    shared = scorer.row_scores(observed, scored)
    full = scorer.row_scores(observed.expand(3, N, T), scored.expand(3, N, T))
    assert_close(shared, full, atol=0.0)


@pytest.mark.parametrize("estimator", [ExhaustiveEstimator(), ChainEstimator()])
def test_engine_with_a_predictor_scorer_gives_the_exact_lml(estimator):
    N, T = 4, 5
    X, init, trans, emit = sample_hmm_data(N, T, C, V, seed=4)
    scorer = PredictorScorer(hmm_predictor(init, trans, emit), X, V, max_elements=7 * T * V)
    draws, bins = score_masks(
        scorer,
        estimator,
        2,
        num_sequences=N,
        num_tokens=T,
        dtype=torch.float64,
        device="cpu",
        max_elements=7 * T * V,
        by_size=True,
    )
    exact = torch.stack([hmm_log_marginal(X[n : n + 1], init, trans, emit) for n in range(N)])
    assert_close(draws, exact.expand(2, N), atol=1e-10)
    assert_close(bins.sum(-1), draws, atol=1e-12)


def test_length_groups_pack_the_real_tokens_left():
    N, T = 3, 6
    X, init, trans, emit = sample_hmm_data(N, T, C, V, seed=5)
    pad = torch.zeros(N, T, dtype=torch.bool)
    pad[0, :2] = True  # left padding: length 4
    pad[2, 5] = True  # right padding: length 5
    seqs = PredictedSequences(hmm_predictor(init, trans, emit), X, pad, max_elements=2**16)
    assert seqs.lengths.tolist() == [4, 6, 5] and seqs.V == V and seqs.dtype == torch.float64
    groups = {tuple(i.tolist()): t for i, t in seqs.groups()}
    assert torch.equal(groups[(0,)], X[0:1, 2:]) and torch.equal(groups[(2,)], X[2:3, :5])
    draws, bins = score_sequences(seqs, ExhaustiveEstimator(), 1, by_size=True)
    assert bins.shape == (1, N, T + 1)
    assert_close(bins[0, 0, 5:], torch.zeros(2), atol=0.0)  # sizes beyond the length
    for n, toks in ((0, X[0:1, 2:]), (1, X[1:2]), (2, X[2:3, :5])):
        assert_close(draws[0, n], hmm_log_marginal(toks, init, trans, emit), atol=1e-10)

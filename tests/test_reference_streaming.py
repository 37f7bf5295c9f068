"""Streaming over particles (pyro_mpt.reference.streaming): chunked runs equal unchunked
ones, the running statistics equal those of all the weights, and the chunk plan."""

import math

import pyro
import pytest
import torch

from pyro_mpt.diagnostics import pareto_khat, tail_size
from pyro_mpt.reference import importance, log_marginal_likelihood
from pyro_mpt.reference.streaming import REFERENCE_CHUNK_FACTOR, plan_chunks, run_chunks
from tests.conftest import assert_close
from tests.reference_data import latent_model, ppca_data, quiet


def test_chunked_equals_unchunked():
    """The same draws in chunks or at once give the same log-weights and diagnostics. Chunk
    sizes are multiples of 16 draws per row: torch's CPU normal_ fills blocks of 16, so then
    the random stream splits exactly."""
    X, t = ppca_data()
    pyro.set_rng_seed(3)
    one = log_marginal_likelihood(latent_model(t), X, num_samples=1024, method="importance")
    pyro.set_rng_seed(3)
    many = log_marginal_likelihood(
        latent_model(t), X, num_samples=1024, chunk_size=128, method="importance"
    )
    assert_close(many.log_weights, one.log_weights, atol=1e-12)
    assert_close(many.total, one.total, atol=1e-10)
    assert_close(many.ess, one.ess, atol=1e-8)
    assert_close(many.khat, one.khat, atol=1e-10)
    assert_close(many.stderr, one.stderr, atol=1e-12)


def test_streaming_khat_equals_kept_weights_khat(monkeypatch):
    """Without the log-weights kept (S N too large), k-hat and the ESS come from a running
    top-(M+1) and running sums across chunks; they equal ArviZ's psislw k-hat and the ESS of
    all the weights, kept in the other run, to 1e-10."""
    X, t = ppca_data()
    pyro.set_rng_seed(4)
    kept = log_marginal_likelihood(latent_model(t), X, num_samples=2048, method="importance")
    monkeypatch.setattr(importance, "KEEP_LOG_WEIGHTS", 0)
    pyro.set_rng_seed(4)
    streamed = log_marginal_likelihood(
        latent_model(t), X, num_samples=2048, chunk_size=256, method="importance"
    )
    assert streamed.log_weights is None
    assert any("largest weights per sequence" in m for m in streamed.messages)
    assert_close(streamed.khat, pareto_khat(kept.log_weights), atol=1e-10)
    assert_close(streamed.ess, kept.ess, atol=1e-8)
    assert_close(streamed.total, kept.total, atol=1e-10)


class _Fixed:
    """A sampler replaying fixed log-weights ``(S, N)`` in order, chunk by chunk."""

    def __init__(self, lw):
        self.lw, self.pos, self.layout = lw, 0, None

    def inputs(self, start, size):
        return ()

    def __call__(self, size):
        out = self.lw[self.pos : self.pos + size]
        self.pos += size
        return out


def test_run_chunks_statistics_equal_those_of_all_weights():
    """Running log-sum-exps, minimum, top-k and edge mass across uneven chunks (7 + 7 + 6)
    equal the same statistics of all 20 x 3 weights at once."""
    lw = torch.randn(20, 3, dtype=torch.float64)
    edge = torch.arange(20) % 4 == 0
    k = tail_size(20) + 1
    stats = run_chunks(_Fixed(lw), 20, 7, False, False, keep=True, tail_k=k, edge=edge, messages=[])
    assert stats.num_chunks == 3 and stats.chunk_size == 7
    assert_close(stats.lse1, torch.logsumexp(lw, 0), atol=1e-12)
    assert_close(stats.lse2, torch.logsumexp(2 * lw, 0), atol=1e-12)
    assert_close(stats.low, lw.amin(0), atol=0.0)
    assert_close(stats.log_weights, lw, atol=0.0)
    assert_close(stats.tail.sort(0).values, lw.topk(k, 0).values.sort(0).values, atol=0.0)
    assert_close(stats.lse_edge, torch.logsumexp(lw[edge], 0), atol=1e-12)


@pytest.mark.parametrize(
    "S, chunk_size, budget, cost, expected",
    [
        (1000, None, 2**20, 4096, (256, 4)),  # 2**20 // 4096 = 256 per chunk
        (100, None, 2**20, 4096, (100, 1)),  # never more than S
        (1000, None, 10, 4096, (1, 1000)),  # at least one particle
        (1000, 300, 2**20, 4096, (300, 4)),  # given: ceil(1000 / 300) chunks
        (50, 300, 2**20, 4096, (50, 1)),
    ],
)
def test_plan_chunks(S, chunk_size, budget, cost, expected):
    assert plan_chunks(S, chunk_size, budget, cost) == expected
    size, n = expected
    assert (n - 1) * size < S <= n * size and n == math.ceil(S / size)


def test_default_chunks_follow_the_device_budget():
    """No chunk_size: the CPU budget (2**24 elements) over REFERENCE_CHUNK_FACTOR times the
    largest per-particle tensor (N T = 40 elements here) allows 104857 particles per chunk,
    so 1000 draws run in one; max_elements=400 * REFERENCE_CHUNK_FACTOR allows 10."""
    X, t = ppca_data()
    est, _ = quiet(
        log_marginal_likelihood,
        latent_model(t),
        X,
        num_samples=100,
        max_elements=400 * REFERENCE_CHUNK_FACTOR,
        method="importance",
    )
    assert any("10 chunk(s) of up to 10;" in m for m in est.messages)
    est = log_marginal_likelihood(latent_model(t), X, num_samples=1000, method="importance")
    assert any("1 chunk(s) of up to 1000;" in m for m in est.messages)

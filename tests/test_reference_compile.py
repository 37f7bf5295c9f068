"""Compiled chunks (pyro_mpt.reference.compile): the small-matmul rewrite keeps the
function, the compile mode rule, and compiled estimates against the exact value."""

import pytest
import torch

from pyro_mpt.models import ppca_latent, ppca_log_marginal
from pyro_mpt.reference import log_marginal_likelihood
from pyro_mpt.reference.compile import (
    COMPILE_MIN_EVALUATIONS,
    SMALL_MATMUL,
    check_compile,
    resolve_compile_mode,
    unroll_small_matmuls,
)
from tests.conftest import assert_close, requires_cuda
from tests.reference_data import latent_model, ppca_data


@pytest.mark.parametrize("K", [2, SMALL_MATMUL, SMALL_MATMUL + 1])
def test_unroll_small_matmuls_keeps_the_function(K):
    """z @ W.T (mm) and a batched product (bmm) with inner dimension K: rewritten as a
    broadcast product summed over K when K <= SMALL_MATMUL, left alone above; the graph
    computes the same values either way."""
    from torch.fx.experimental.proxy_tensor import make_fx

    z, W = torch.randn(6, K), torch.randn(5, K)
    a, b = torch.randn(3, 4, K), torch.randn(3, K, 2)

    def f(z, W, a, b):
        return (z @ W.T).sum(), torch.bmm(a, b)

    gm = make_fx(f)(z, W, a, b)
    expected = f(z, W, a, b)
    changed = unroll_small_matmuls(gm)
    assert changed == (2 if K <= SMALL_MATMUL else 0)
    got = gm(z, W, a, b)
    assert_close(got[0], expected[0], atol=1e-12)
    assert_close(got[1], expected[1], atol=1e-12)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    mm = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default}
    assert bool(targets & mm) == (K > SMALL_MATMUL)


def test_compile_mode_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile_mode(None, 10 * COMPILE_MIN_EVALUATIONS, cpu) is False
    assert resolve_compile_mode(None, COMPILE_MIN_EVALUATIONS - 1, cuda) is False
    assert resolve_compile_mode(None, COMPILE_MIN_EVALUATIONS, cuda) == "graph"
    assert resolve_compile_mode(True, 1, cpu) == "graph"
    assert resolve_compile_mode("log_prob", 1, cpu) == "log_prob"
    assert resolve_compile_mode(False, 10 * COMPILE_MIN_EVALUATIONS, cuda) is False


@pytest.mark.parametrize("value", ["fast", 1, 0, "Graph"])
def test_check_compile_refuses(value):
    with pytest.raises(ValueError, match=r"unknown compile=.*; valid values are None, False"):
        check_compile(value)


def test_single_chunk_runs_eagerly():
    """With one chunk nothing is compiled (the compile cost would not pay off): no compile
    message, the eager estimate."""
    X, t = ppca_data()
    est = log_marginal_likelihood(
        latent_model(t), X, method="importance", num_samples=256, compile="graph"
    )
    assert not any(m.startswith("compile=") for m in est.messages)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["graph", "log_prob"])
def test_compiled_chunks_agree_with_exact(mode):
    """torch.compile of the chunks (CPU inductor here): statistically the same estimate."""
    X, t = ppca_data()
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    est = log_marginal_likelihood(
        latent_model(t), X, method="importance", num_samples=40_000, chunk_size=8192, compile=mode
    )
    assert any(m.startswith(f"compile='{mode}':") for m in est.messages), est.messages
    assert abs(float(est.total - exact)) < 4 * est.stderr + est.stderr**2 / 2


@pytest.mark.slow
def test_compiled_graph_is_reused_only_while_it_reproduces_the_model():
    """A captured chunk graph holds the model's tensors by reference: a second call reuses
    it (also with another number of particles), also after a parameter changed in place
    (and stays right), and a parameter rebound to another tensor makes it fail the
    fresh-draw check, so the chunk is captured anew."""
    X, t = ppca_data()
    params = {"W": t["W"].clone()}

    def model(X):
        ppca_latent(X, 2, params["W"], t["loc"], t["noise_scale"])

    def run(num_samples=4096):
        est = log_marginal_likelihood(
            model, X, method="importance", num_samples=num_samples, chunk_size=1024, compile="graph"
        )
        exact = ppca_log_marginal(X, params["W"], t["loc"], t["noise_scale"])
        assert abs(float(est.total - exact)) < 4 * est.stderr + est.stderr**2 / 2
        return [m for m in est.messages if m.startswith("compile=")][-1]

    assert "captured by make_fx" in run()
    assert "reused from an earlier call" in run()
    # another particle count, same chunk shape: the graph (and the compiled code) carries over
    assert "reused from an earlier call" in run(num_samples=6144)
    params["W"].mul_(1.5)
    assert "reused from an earlier call" in run()
    params["W"] = params["W"] / 2
    assert "captured by make_fx" in run()


@pytest.mark.gpu
@requires_cuda
def test_importance_on_cuda():
    X, t = ppca_data()
    X = X.cuda()
    t = {k: v.cuda() for k, v in t.items()}
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    est = log_marginal_likelihood(
        latent_model(t), X, method="importance", num_samples=2**16, chunk_size=2**14
    )
    assert est.device.type == "cuda"
    for value in (est.total, est.per_sequence, est.per_sequence_stderr, est.ess, est.khat):
        assert value.device.type == "cuda"
    assert est.log_weights.device.type == "cuda"
    assert abs(float(est.total - exact)) < 4 * est.stderr + est.stderr**2 / 2


@pytest.mark.gpu
@requires_cuda
def test_compiled_graph_on_cuda():
    """compile='graph' on CUDA: captured, checked against the eager chunk on a fresh draw,
    compiled (the latent matrix product unrolled into the likelihood reduction), and the
    estimate within its standard error of the exact value."""
    X, t = ppca_data()
    X = X.cuda()
    t = {k: v.cuda() for k, v in t.items()}
    exact = ppca_log_marginal(X, t["W"], t["loc"], t["noise_scale"])
    est = log_marginal_likelihood(
        latent_model(t),
        X,
        method="importance",
        num_samples=2**16,
        chunk_size=2**13,
        compile="graph",
    )
    how = [m for m in est.messages if m.startswith("compile=")][-1]
    assert "captured by make_fx" in how and "unrolled" in how, how
    assert est.total.device.type == "cuda" and est.khat.device.type == "cuda"
    assert abs(float(est.total - exact)) < 4 * est.stderr + est.stderr**2 / 2


@pytest.mark.slow
def test_compiled_quadrature_equals_eager():
    """The grid rows are the chunk's inputs of the captured graph: the compiled sum over
    the grid equals the eager one (float64, to rounding)."""
    X, t = ppca_data(N=4)
    kw = dict(method="quadrature", quadrature_points=40, chunk_size=400)
    eager = log_marginal_likelihood(latent_model(t), X, **kw)
    fast = log_marginal_likelihood(latent_model(t), X, compile="graph", **kw)
    assert any(m.startswith("compile='graph': each chunk") for m in fast.messages), fast.messages
    assert_close(fast.per_sequence, eager.per_sequence, atol=1e-10)

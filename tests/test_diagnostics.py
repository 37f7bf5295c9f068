"""ESS, Pareto k-hat and the streaming tail fit against their definitions and ArviZ."""

import math

import numpy as np
import pytest
import torch

from pyro_mpt.compat import generalized_pareto_fit, import_arviz
from pyro_mpt.diagnostics import (
    effective_sample_size,
    gpdfit,
    khat_threshold,
    merge_tail,
    pareto_khat,
    pareto_khat_from_tail,
    tail_size,
)
from tests.conftest import assert_close


def test_khat_threshold_is_arviz_rule():
    # min(1 - 1/log10(S), 0.7): 0.5 at S = 100, 0.7 from S = 2154 on
    assert_close(khat_threshold(100), 0.5, atol=1e-15)
    assert_close(khat_threshold(1000), 1 - 1 / 3, atol=1e-15)
    assert khat_threshold(10**6) == 0.7
    assert khat_threshold(1) == -math.inf
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        khat_threshold(0)


def test_effective_sample_size_matches_definition():
    lw = torch.randn(500, 3) * torch.tensor([0.1, 1.0, 3.0])
    w = lw.exp()
    expected = w.sum(0) ** 2 / (w**2).sum(0)
    assert_close(effective_sample_size(lw), expected, atol=1e-9, rtol=1e-12)
    # invariant to the scale of the weights, no overflow far from 0
    assert_close(effective_sample_size(lw + 1e4), expected, atol=1e-9, rtol=1e-9)
    assert_close(effective_sample_size(lw.T, dim=1), expected, atol=1e-9, rtol=1e-12)
    # equal weights: ESS = S
    assert_close(effective_sample_size(torch.zeros(64, 2)), [64.0, 64.0], atol=1e-9)


def test_pareto_khat_is_arviz_psislw():
    lw = torch.randn(1000, 4) * torch.tensor([0.2, 1.0, 2.0, 4.0])
    _, expected = import_arviz().psislw(lw.T.numpy().copy())
    khat = pareto_khat(lw)
    assert isinstance(khat, torch.Tensor) and khat.shape == (4,)
    assert_close(khat, expected, atol=1e-12)
    # heavier tails, larger k-hat
    assert (khat.diff() > 0).all()
    # numpy in, numpy out; the draws along another dim
    out = pareto_khat(lw.T.numpy(), dim=-1)
    assert isinstance(out, np.ndarray)
    assert_close(out, expected, atol=1e-12)


def test_pareto_khat_of_constant_weights_is_minus_inf():
    # ArviZ returns inf for a tail of ties; equal weights are bounded (an exact estimate)
    lw = torch.cat([torch.zeros(200, 1), torch.randn(200, 1)], 1)
    khat = pareto_khat(lw)
    assert khat[0] == -math.inf and math.isfinite(khat[1])
    assert pareto_khat_from_tail(torch.zeros(200, 1), 200)[0] == -math.inf


def test_tail_size_is_arviz_cutoff():
    # arviz.psislw: cutoff_ind = -ceil(min(S / 5, 3 sqrt(S))) - 1
    assert tail_size(100) == 20
    assert tail_size(10_000) == 300
    assert tail_size(10**6) == 3000


@pytest.mark.parametrize("scale", [0.3, 1.5, 3.0])
def test_streaming_tail_khat_equals_arviz_on_all_weights(scale):
    """The running top-(M+1) merged over chunks gives ArviZ's k-hat of all S weights: the
    GPD is fitted to the exceedances over the (M+1)-th largest weight only. Tolerance 1e-10
    (the same float64 operations on the same numbers, up to summation order)."""
    S, N = 5000, 3
    lw = torch.randn(S, N) * scale + torch.randn(N) * 50
    M1 = tail_size(S) + 1
    tail = None
    for chunk in lw.split(777):  # uneven chunks
        tail = merge_tail(tail, chunk, M1)
    assert tail.shape == (M1, N)
    from_tail = pareto_khat_from_tail(tail, S)
    _, expected = import_arviz().psislw(lw.T.numpy().copy())
    assert_close(from_tail, expected, atol=1e-10)


def test_streaming_tail_with_ties_and_minus_inf():
    """Ties at the cutoff and zero weights: the tail fit follows ArviZ exactly."""
    S = 2000
    lw = torch.randn(S, 2).round(decimals=1)  # many ties
    lw[:1500, 1] = -math.inf  # most weights zero
    tail = merge_tail(None, lw, tail_size(S) + 1)
    _, expected = import_arviz().psislw(lw.T.numpy().copy())
    assert_close(pareto_khat_from_tail(tail, S), expected, atol=1e-10)


def test_batched_gpdfit_equals_arviz_gpdfit():
    """The batched torch port of ArviZ's private _gpdfit (compat.generalized_pareto_fit) gives ArviZ's (k, sigma) row by
    row, for light, moderate and heavy tails (1e-10: the same float64 formulas, summed in
    another order)."""
    gpd = generalized_pareto_fit
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in (-0.3, 0.2, 0.6, 1.2):  # generalized Pareto draws by inversion
        u = torch.rand(300, generator=g, dtype=torch.float64)
        rows.append(((1 - u) ** (-k) - 1) / k)
    x = torch.stack(rows).sort(-1).values
    k, sigma = gpdfit(x)
    expected = [gpd(row.numpy()) for row in x]
    assert_close(k, [e[0] for e in expected], atol=1e-10)
    assert_close(sigma, [e[1] for e in expected], atol=1e-10, rtol=1e-10)
    assert (k.diff() > 0).all()  # ordered as the true shapes


def test_tail_khat_numpy_in_numpy_out():
    lw = np.random.default_rng(0).normal(size=(400, 2))
    tail = -np.sort(-lw, axis=0)[: tail_size(400) + 1]
    out = pareto_khat_from_tail(tail, 400)
    assert isinstance(out, np.ndarray) and out.shape == (2,)
    assert_close(out, import_arviz().psislw(lw.T.copy())[1], atol=1e-10)

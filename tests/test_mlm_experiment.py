"""TinyMLM (a transformer masked predictor), its training by fixed and uniform mask rates, and
the HMM ground-truth experiment at a tiny size."""

import math

import pytest
import torch

from pyro_mpt.mlm import hmm_predictor, mlm_curve, mlm_estimate
from pyro_mpt.mlm.experiment import MLMExperimentResult, mlm_experiment, random_hmm
from pyro_mpt.mlm.transformer import TinyMLM, train_mlm
from pyro_mpt.models import hmm_log_marginal, sample_hmm
from tests.conftest import assert_close


def _hmm_data(N=300, T=8, C=3, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = random_hmm(C, V, generator=g)
    return params, sample_hmm(N, T, *params, generator=g)


def test_tiny_mlm_predictor_protocol():
    V, T = 7, 9
    model = TinyMLM(V, T, d_model=16, nhead=2, num_layers=1, dim_feedforward=32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(V, (4, T), generator=g)
    mask = torch.rand(4, T, generator=g) < 0.4
    mask[:, 3] = True
    with torch.no_grad():
        out = model(tokens, mask)
        assert out.shape == (4, T, V) and out.dtype == torch.float32
        assert_close(out.logsumexp(-1), torch.zeros(4, T), atol=1e-5)
        # hidden tokens really are hidden: any value at masked positions, same outputs
        changed = torch.where(mask, torch.randint(V, (4, T), generator=g), tokens)
        changed[:, 3] = (tokens[:, 3] + 1) % V
        assert torch.equal(model(changed, mask), out)
        # visible tokens are read
        unmasked = torch.zeros_like(mask)
        assert not torch.equal(model(changed, unmasked), model(tokens, unmasked))
        # shorter sequences use the first positions; no mask hides nothing
        assert model(tokens[:, :5], None).shape == (4, 5, V)
        assert torch.equal(model(tokens, None), model(tokens, unmasked))
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, T + 1, dtype=torch.long), None)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, T), V), None)
    with pytest.raises(ValueError, match="divisible"):
        TinyMLM(V, T, d_model=10, nhead=4)


def test_tiny_mlm_with_mlm_functions():
    (params, data) = _hmm_data(N=5, T=6, V=6)
    model = TinyMLM(6, 6, d_model=16, nhead=2, num_layers=1, dim_feedforward=32)
    curve = mlm_curve(model, data, num_masks=2, generator=torch.Generator().manual_seed(0))
    assert curve.scores.shape == (6,) and torch.isfinite(curve.area)
    est = mlm_estimate(model, data, estimator="uniform", generator=torch.Generator().manual_seed(0))
    est.total.backward()
    assert model.head.weight.grad is not None and torch.isfinite(model.head.weight.grad).all()


@pytest.mark.parametrize("objective", ["fixed", "uniform"])
def test_train_mlm_reduces_loss(objective):
    _, data = _hmm_data(N=400, T=8, V=6)
    model = TinyMLM(6, 8, d_model=32, nhead=2, num_layers=1, dim_feedforward=64)
    history = train_mlm(
        model,
        data,
        objective=objective,
        steps=60,
        batch_size=32,
        lr=1e-2,
        seed=0,
        progress=False,
        threads=1,
    )
    assert len(history) == 60 and all(math.isfinite(h) for h in history)
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < first - 0.05, (first, last)
    assert first == pytest.approx(math.log(6), abs=0.3)  # near uniform at initialisation


def test_train_mlm_fixed_loss_is_bert_loss():
    """One step's loss is -mlm_estimate(fixed) / (B T): the mean masked-token NLL."""
    _, data = _hmm_data(N=50, T=10, V=6)
    model = TinyMLM(6, 10, d_model=16, nhead=2, num_layers=1, dim_feedforward=32)
    # lr tiny: the loss is the initial model's
    g = torch.Generator().manual_seed(5)
    (loss,) = train_mlm(
        model, data, objective="fixed", steps=1, batch_size=50, lr=1e-12, generator=g
    )
    g = torch.Generator().manual_seed(5)
    index = torch.randint(50, (50,), generator=g)
    est = mlm_estimate(model, data[index], estimator="fixed", mask_rate=0.15, generator=g)
    assert loss == pytest.approx(-float(est.total.detach()) / (50 * 10), rel=1e-5)
    # two masked tokens per sequence (round(0.15 * 10) = 2): the mean masked NLL
    assert est.estimator == "fixed"


def test_train_mlm_errors_and_progress():
    _, data = _hmm_data(N=20, T=5, V=6)
    model = TinyMLM(6, 5, d_model=8, nhead=2, num_layers=1, dim_feedforward=8)
    with pytest.raises(ValueError, match="objective"):
        train_mlm(model, data, objective="chain", steps=1)
    with pytest.raises(ValueError, match="steps"):
        train_mlm(model, data, steps=0)
    with pytest.raises(ValueError, match="long tensor"):
        train_mlm(model, data.double(), steps=1)
    assert len(train_mlm(model, data, steps=2, batch_size=4, seed=0, progress=True)) == 2
    before = torch.get_num_threads()
    train_mlm(model, data, steps=1, batch_size=4, seed=0, threads=1)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        train_mlm(model, data, steps=1, threads=0)


def test_mlm_experiment_tiny(tmp_path):
    result = mlm_experiment(
        num_states=3,
        vocab_size=5,
        seq_len=6,
        num_train=200,
        num_test=30,
        steps=15,
        num_masks=2,
        batch_size=16,
        seed=3,
    )
    assert isinstance(result, MLMExperimentResult)
    keys = {"exact", "fixed", "uniform", "untrained"}
    assert set(result.curves) == set(result.areas) == keys
    for d in (result.areas, result.area_stderr, result.fixed_rate, result.pll):
        assert all(math.isfinite(v) for v in d.values())
    assert len(result.losses["fixed"]) == len(result.losses["uniform"]) == 15
    # ground truth: the forward algorithm, the exact predictor's chain and exhaustive areas
    assert result.exact_exhaustive_area is not None
    assert abs(result.exact_chain_area - result.exact_lml) < 1e-6
    assert abs(result.exact_exhaustive_area - result.exact_lml) < 1e-6
    # the exact predictor's stratified curve: within Monte Carlo error of the LML
    gap = result.areas["exact"] - result.exact_lml
    assert abs(gap) < 5 * result.area_stderr["exact"] + 1e-9
    # recompute the LML independently from the same seed
    g = torch.Generator().manual_seed(3)
    params = random_hmm(3, 5, generator=g)
    sample_hmm(200, 6, *params, generator=g)
    test = sample_hmm(30, 6, *params, generator=g)
    assert_close(result.exact_lml, hmm_log_marginal(test, *params) / (30 * 6), atol=1e-12)
    exact_curve = mlm_curve(hmm_predictor(*params), test, exhaustive=True)
    assert_close(result.exact_lml, exact_curve.area / (30 * 6), atol=1e-10)
    # text summary and figure
    text = result.headline()
    assert "exact held-out LML" in text and "(b) closer" in text
    pytest.importorskip("matplotlib")
    ax = result.figure()
    assert len(ax.lines) >= 4 + 2
    assert ax.get_xlabel() == "mask rate m / T"
    ax.figure.savefig(tmp_path / "mlm.png")
    assert (tmp_path / "mlm.png").stat().st_size > 0


def test_mlm_experiment_errors_and_global_rng():
    with pytest.raises(ValueError, match="seq_len"):
        mlm_experiment(seq_len=0)
    state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    mlm_experiment(
        num_states=2, vocab_size=3, seq_len=4, num_train=20, num_test=5, steps=2, num_masks=1
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.get_num_threads() == threads

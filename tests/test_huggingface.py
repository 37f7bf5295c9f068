"""The Hugging Face adapter on a tiny randomly initialised BertForMaskedLM (nothing downloaded)."""

import sys

import pytest
import torch

from pyro_mpt.mlm import mlm_curve, pseudo_log_likelihood
from pyro_mpt.mlm.huggingface import huggingface_predictor
from tests.conftest import assert_close

VOCAB = 30
MASK_ID = 3
CLS_ID, SEP_ID = 1, 2


@pytest.fixture
def bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    return model.to(torch.float32).eval()


def _tokens(N, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (N, T), generator=g)


def test_predictor_protocol(bert):
    predictor = huggingface_predictor(bert, MASK_ID, prefix=[CLS_ID], suffix=[SEP_ID])
    tokens = _tokens(3, 7)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[:, 2] = True
    with torch.no_grad():
        out = predictor(tokens, mask)
        assert out.shape == (3, 7, VOCAB)
        assert out.dtype == torch.float32
        assert_close(out.exp().sum(-1), torch.ones(3, 7), atol=1e-5)
        # a hidden token's value is never seen
        changed = tokens.clone()
        changed[:, 2] = (changed[:, 2] + 1 - 4) % (VOCAB - 4) + 4
        assert torch.equal(predictor(changed, mask), out)
        # a visible token's value is
        assert not torch.equal(
            predictor(changed, torch.zeros_like(mask)), predictor(tokens, torch.zeros_like(mask))
        )
    # float64 output and a broadcast attention mask
    p64 = huggingface_predictor(bert, MASK_ID, attention_mask=torch.ones(7), dtype=torch.float64)
    with torch.no_grad():
        assert p64(tokens, mask).dtype == torch.float64


def test_curve_and_pll(bert):
    N, T = 4, 6
    tokens = _tokens(N, T)
    predictor = huggingface_predictor(
        bert, MASK_ID, prefix=[CLS_ID], suffix=[SEP_ID], dtype=torch.float64
    )
    curve = mlm_curve(predictor, tokens, num_masks=2, generator=torch.Generator().manual_seed(0))
    assert curve.scores.shape == (T,)
    assert curve.per_sequence.shape == (N, T)
    assert torch.isfinite(curve.scores).all() and torch.isfinite(curve.area)
    assert float(curve.area) < 0
    with torch.no_grad():
        pll = pseudo_log_likelihood(predictor, tokens)
        assert pll.shape == (N,)
        # brute force: one call per position, that token hidden
        brute = torch.zeros(N, dtype=torch.float64)
        for j in range(T):
            mask = torch.zeros(N, T, dtype=torch.bool)
            mask[:, j] = True
            logp = predictor(tokens, mask)
            brute += logp[torch.arange(N), j, tokens[:, j]]
    assert_close(pll, brute, atol=1e-10)
    # the exhaustive curve's size-1 score is PLL / T summed over sequences
    ex = mlm_curve(predictor, tokens, exhaustive=True)
    assert_close(ex.scores[0] * T, pll.sum(), atol=1e-8)


def test_padding_through_pad_mask(bert):
    """Variable lengths via pad_mask: the model never sees padding, each group is scored at
    its own length."""
    tokens = _tokens(3, 5)
    pad = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    predictor = huggingface_predictor(bert, MASK_ID, dtype=torch.float64)
    with torch.no_grad():
        pll = pseudo_log_likelihood(predictor, tokens, pad_mask=pad)
        alone = pseudo_log_likelihood(predictor, tokens[1:2, :3])
    assert_close(pll[1], alone[0], atol=1e-10)


def test_errors(bert):
    with pytest.raises(ValueError, match="mask_token_id"):
        huggingface_predictor(bert, -1)
    predictor = huggingface_predictor(bert, MASK_ID, attention_mask=torch.ones(4))
    with pytest.raises(ValueError, match="attention_mask"):
        predictor(_tokens(2, 5), torch.zeros(2, 5, dtype=torch.bool))


def test_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"pyro-mpt\[hf\]"):
        huggingface_predictor(lambda **kw: None, MASK_ID)

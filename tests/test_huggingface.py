"""The Hugging Face adapter on a tiny randomly initialised BertForMaskedLM (built from a
BertConfig: 2 layers, hidden size 32, seeded weights; nothing downloaded). ``transformers``
is in the ``test`` extra, so these run in the test command."""

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
        num_hidden_layers=2,
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


class _Recorder(torch.nn.Module):
    """The BERT model, recording the input ids and attention mask of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, input_ids, attention_mask):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_masking_as_the_model_sees_it(bert):
    """The ids reaching BERT: [CLS], the tokens with the hidden ones replaced by [MASK],
    [SEP]; attention everywhere."""
    rec = _Recorder(bert)
    predictor = huggingface_predictor(rec, MASK_ID, prefix=[CLS_ID], suffix=[SEP_ID])
    tokens = _tokens(2, 5)
    mask = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        predictor(tokens, mask)
    ((ids, attn),) = rec.calls
    expected = torch.cat(
        [
            torch.full((2, 1), CLS_ID),
            torch.where(mask, MASK_ID, tokens),
            torch.full((2, 1), SEP_ID),
        ],
        dim=1,
    )
    assert torch.equal(ids, expected)
    assert torch.equal(attn, torch.ones(2, 7, dtype=torch.long))


def test_pll_against_bert_called_directly(bert):
    """PLL from the adapter and mlm's batching equals BERT called by hand, one position
    hidden at a time: sum_j log softmax(logits)[j, x_j]."""
    N, T = 3, 5
    tokens = _tokens(N, T, seed=4)
    predictor = huggingface_predictor(
        bert, MASK_ID, prefix=[CLS_ID], suffix=[SEP_ID], dtype=torch.float64
    )
    with torch.no_grad():
        pll = pseudo_log_likelihood(predictor, tokens)
        direct = torch.zeros(N, dtype=torch.float64)
        for j in range(T):
            ids = tokens.clone()
            ids[:, j] = MASK_ID
            ids = torch.cat([torch.full((N, 1), CLS_ID), ids, torch.full((N, 1), SEP_ID)], 1)
            logits = bert(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            logp = logits[:, 1 + j].double().log_softmax(-1)
            direct += logp[torch.arange(N), tokens[:, j]]
    # float32 BERT: the two paths batch differently, hence a float32-sized tolerance
    assert_close(pll, direct, atol=1e-4)


def test_batching_under_the_memory_budget(bert):
    """With max_elements = 3 rows of T * V, no call to BERT is larger than the budget and
    the results equal those of one unbounded batch."""
    N, T = 4, 6
    tokens = _tokens(N, T, seed=5)
    budget = 3 * T * VOCAB
    rec = _Recorder(bert)
    predictor = huggingface_predictor(rec, MASK_ID, dtype=torch.float64)
    with torch.no_grad():
        small = pseudo_log_likelihood(predictor, tokens, max_elements=budget)
        sizes = [ids.shape[0] for ids, _ in rec.calls]
        rec.calls.clear()
        big = pseudo_log_likelihood(predictor, tokens, max_elements=10**9)
        big_sizes = [ids.shape[0] for ids, _ in rec.calls]
    assert max(sizes) * T * VOCAB <= budget and len(sizes) > len(big_sizes)
    assert sum(b for b in sizes if b) >= N * T  # every (sequence, position) row was scored
    assert_close(small, big, atol=1e-6)
    with pytest.raises(ValueError, match="max_elements"):
        pseudo_log_likelihood(predictor, tokens, max_elements=0)

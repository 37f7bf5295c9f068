r"""An adapter from Hugging Face masked language models to the masked-predictor protocol of
:mod:`pyro_mpt.mlm` (optional: ``pip install pyro-mpt[hf]``, i.e. ``transformers``).

Example (a pretrained model; nothing here downloads by itself)::

    from transformers import AutoModelForMaskedLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained("bert-base-uncased")
    model = AutoModelForMaskedLM.from_pretrained("bert-base-uncased").eval()
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    predictor = huggingface_predictor(
        model, tok.mask_token_id, prefix=[tok.cls_token_id], suffix=[tok.sep_token_id]
    )
    curve = mlm_curve(predictor, enc["input_ids"], pad_mask=enc["attention_mask"] == 0,
                      num_masks=4)

Padding is best handled by ``mlm_curve(..., pad_mask=...)``: the sequences are then grouped by
length and the model never sees padding, so no attention mask is needed. Special tokens that
must be shown to the model but never masked or scored (BERT's ``[CLS]`` and ``[SEP]``) go in
``prefix`` and ``suffix``.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["huggingface_predictor"]


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "huggingface_predictor needs the `transformers` package; install it with "
            "`pip install pyro-mpt[hf]` (or `pip install transformers`)"
        ) from None
    return transformers


def _id_tensor(name, ids):
    if ids is None:
        return torch.zeros(0, dtype=torch.long)
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"huggingface_predictor: {name} must hold non-negative token ids")
    return ids


def _model_device(model):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def huggingface_predictor(
    model: Callable[..., Any],
    mask_token_id: int,
    *,
    attention_mask: torch.Tensor | Sequence[int] | None = None,
    prefix: torch.Tensor | Sequence[int] | None = None,
    suffix: torch.Tensor | Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""Wraps a ``transformers`` ``*ForMaskedLM`` (BERT, RoBERTa, DistilBERT, ...) into a
    masked predictor ``predictor(tokens, mask) -> log_probs``.

    Each call replaces the hidden tokens (``mask`` True) by ``mask_token_id``, adds the
    ``prefix`` and ``suffix`` ids (never hidden), runs the model on its own device and returns
    ``log_softmax`` of its logits at the ``T`` token positions, ``(B, T, V)`` on the tokens'
    device (``V`` = the model's output vocabulary). Gradients flow (for fine-tuning with
    :func:`~pyro_mpt.mlm.mlm_estimate`); put the model in ``eval()`` mode to score it.

    :param model: a ``transformers`` masked LM; any callable
        ``model(input_ids=..., attention_mask=...)`` returning an object with ``.logits``
        ``(B, T', V)`` (or a tuple whose first item is the logits) also works.
    :param int mask_token_id: the tokenizer's mask id (``tokenizer.mask_token_id``).
    :param attention_mask: optional ``(T,)`` or ``(1, T)`` or ``(B, T)`` 0/1 mask over the
        ``T`` tokens, broadcast over the batch; ``None`` attends to every token. (Prefer
        ``mlm_curve(..., pad_mask=...)`` for padding.)
    :param prefix: token ids shown before every sequence (e.g. ``[tokenizer.cls_token_id]``).
    :param suffix: token ids shown after every sequence (e.g. ``[tokenizer.sep_token_id]``).
    :param dtype: optional dtype of the returned log-probabilities (e.g. ``torch.float64``).
    :returns: the predictor.
    :raises ImportError: when ``transformers`` is not installed.

    Its scores plug into :func:`~pyro_mpt.mlm.mlm_curve`, whose area
    :math:`\sum_m S(m)` estimates :math:`\sum_n \log p(x_n)` under the model's conditionals.

    Example::

        tok = AutoTokenizer.from_pretrained("bert-base-uncased")
        mlm = AutoModelForMaskedLM.from_pretrained("bert-base-uncased").eval()
        predictor = huggingface_predictor(mlm, tok.mask_token_id, prefix=[tok.cls_token_id],
                                          suffix=[tok.sep_token_id])
        curve = mlm_curve(predictor, ids)                       # ids: long (N, T)
    """
    _require_transformers()
    if not callable(model):
        raise ValueError("huggingface_predictor: model must be a callable masked LM")
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
        raise ValueError(
            f"huggingface_predictor: mask_token_id must be a non-negative int (the tokenizer's "
            f"mask_token_id), got {mask_token_id!r}"
        )
    prefix = _id_tensor("prefix", prefix)
    suffix = _id_tensor("suffix", suffix)
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if attention_mask.dim() != 2:
            raise ValueError(
                "huggingface_predictor: attention_mask must have shape (T,), (1, T) or (B, T), "
                f"got {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.to(torch.long)
    P, S = prefix.numel(), suffix.numel()

    def predictor(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(tokens) or tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError("huggingface_predictor: tokens must be a long tensor (B, T)")
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.shape != tokens.shape:
            raise ValueError("huggingface_predictor: mask must be a bool tensor like tokens")
        B, T = tokens.shape
        device = _model_device(model)
        ids = tokens.masked_fill(mask, mask_token_id).to(device)
        ids = torch.cat(
            [prefix.to(device).expand(B, P), ids, suffix.to(device).expand(B, S)], dim=-1
        )
        if attention_mask is None:
            attn = torch.ones_like(ids)
        else:
            if attention_mask.shape[-1] != T or attention_mask.shape[0] not in (1, B):
                raise ValueError(
                    f"huggingface_predictor: attention_mask of shape "
                    f"{tuple(attention_mask.shape)} does not fit tokens of shape {(B, T)}"
                )
            core = attention_mask.to(device).expand(B, T)
            attn = torch.cat([core.new_ones(B, P), core, core.new_ones(B, S)], dim=-1)
        out = model(input_ids=ids, attention_mask=attn)
        logits = out.logits if hasattr(out, "logits") else out[0]
        logits = logits[:, P : P + T]
        if dtype is not None:
            logits = logits.to(dtype)
        return logits.log_softmax(-1).to(tokens.device)

    return predictor

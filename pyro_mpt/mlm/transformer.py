r"""A tiny transformer masked language model and its training by a fixed mask rate (BERT) or
by the cumulative MPT objective (uniformly random mask rates).

:class:`TinyMLM` is a masked predictor in the sense of :mod:`pyro_mpt.mlm`:
``model(tokens (B, T) long, mask (B, T) bool) -> (B, T, V)`` log-probabilities, with the
hidden tokens replaced by an extra ``[MASK]`` id (``vocab_size``) before anything else reads
them. It is built from PyTorch's own :class:`torch.nn.TransformerEncoderLayer`.

:func:`train_mlm` minimises, with Adam, per token,

- ``objective="fixed"``: BERT's loss, the mean negative log-probability of the masked tokens
  at a fixed rate :math:`r` (:math:`m = \max(1, \mathrm{round}(rT))` tokens per sequence),
  i.e. :math:`-\frac{1}{NT}` ``mlm_estimate(..., estimator="fixed")``;
- ``objective="uniform"``: the cumulative MPT objective
  :math:`-\frac{1}{NT}` ``mlm_estimate(..., estimator="uniform")``: per sequence a size
  :math:`m \sim U\{1..T\}`, a uniform mask of that size, weight :math:`T/m`. Its expectation
  is :math:`-\frac{1}{NT}\sum_n \sum_m S_n(m)`, the negative LML per token wherever the
  conditionals are exact (Moreno-Muñoz et al. 2023).

Parameters are float32 whatever torch's default dtype.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from ..options import check_choice, check_positive_int
from ..progress import progress_bar
from .curve import mlm_estimate

__all__ = ["TinyMLM", "num_threads", "train_mlm"]

OBJECTIVES = ("uniform", "fixed")


class TinyMLM(nn.Module):
    r"""A small bidirectional transformer encoder for masked language modelling.

    Token embeddings over ``vocab_size + 1`` ids (the last, ``vocab_size``, is ``[MASK]``),
    learned position embeddings for up to ``seq_len`` positions, ``num_layers`` pre-norm
    :class:`torch.nn.TransformerEncoderLayer` (``batch_first=True``), a final LayerNorm and a
    linear head to the ``vocab_size`` real tokens (never ``[MASK]``), then ``log_softmax``.

    Calling ``model(tokens, mask)`` follows the masked-predictor protocol of
    :mod:`pyro_mpt.mlm`: ``tokens`` long ``(B, T)`` with ``T <= seq_len``, ``mask`` bool
    ``(B, T)`` (True = hidden; ``None`` hides nothing); returns float32 ``(B, T, V)``.

    :param int vocab_size: the number ``V`` of real tokens.
    :param int seq_len: the longest sequence (number of position embeddings).

    Example::

        model = TinyMLM(vocab_size=8, seq_len=12)
        log_probs = model(tokens, tokens == 0)                  # tokens: long (B, 12) -> (B, 12, 8)
        losses = train_mlm(model, tokens, objective="uniform", steps=200)
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        dropout: float = 0.0,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("seq_len", seq_len),
            ("d_model", d_model),
            ("nhead", nhead),
            ("num_layers", num_layers),
            ("dim_feedforward", dim_feedforward),
        ):
            check_positive_int(name, value)
        if d_model % nhead:
            raise ValueError(f"TinyMLM: d_model = {d_model} must be divisible by nhead = {nhead}")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.mask_token_id = vocab_size
        kw = {"dtype": dtype}
        self.token_embedding = nn.Embedding(vocab_size + 1, d_model, **kw)
        self.position_embedding = nn.Embedding(seq_len, d_model, **kw)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                nhead,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                batch_first=True,
                norm_first=True,
                **kw,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model, **kw)
        self.head = nn.Linear(d_model, vocab_size, **kw)
        with torch.no_grad():
            nn.init.normal_(self.token_embedding.weight, std=0.02 * math.sqrt(d_model))
            nn.init.normal_(self.position_embedding.weight, std=0.02 * math.sqrt(d_model))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_tensor(tokens) or tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError("TinyMLM: tokens must be a long tensor of shape (B, T)")
        B, T = tokens.shape
        if T > self.seq_len:
            raise ValueError(f"TinyMLM: sequences of {T} tokens exceed seq_len = {self.seq_len}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"TinyMLM: token ids must lie in [0, {self.vocab_size})")
        if mask is not None:
            if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.shape != tokens.shape:
                raise ValueError("TinyMLM: mask must be a bool tensor shaped like tokens")
            tokens = tokens.masked_fill(mask, self.mask_token_id)
        positions = torch.arange(T, device=tokens.device)
        h = self.token_embedding(tokens) + self.position_embedding(positions)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h)).log_softmax(-1)


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily sets ``torch.set_num_threads(n)`` (``None``: leaves it), restoring it on
    exit. A tiny model on a CPU shared with other work trains many times faster on one thread
    than with intra-op parallelism."""
    if n is None:
        yield
        return
    n = check_positive_int("num_threads", n)
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_mlm(
    model: nn.Module,
    sequences: torch.Tensor,
    *,
    objective: str = "uniform",
    mask_rate: float = 0.15,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 1e-3,
    num_masks: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    threads: int | None = None,
) -> list[float]:
    r"""Trains a masked predictor (e.g. :class:`TinyMLM`) on token sequences with Adam.

    Each step draws ``batch_size`` sequences uniformly with replacement and ``num_masks``
    masks per sequence, and takes one Adam step on the loss

    - ``"fixed"``: :math:`-\frac{1}{BT}` ``mlm_estimate(model, batch, estimator="fixed",
      mask_rate=mask_rate).total``, the mean masked-token negative log-probability (BERT);
    - ``"uniform"``: :math:`-\frac{1}{BT}` ``mlm_estimate(model, batch,
      estimator="uniform").total``, the cumulative objective per token (unbiased for
      :math:`-\log p(x)/T` with exact conditionals).

    :param model: an :class:`torch.nn.Module` masked predictor (its parameters are trained).
    :param torch.Tensor sequences: long ``(N, T)`` training token ids.
    :param str objective: ``"uniform"`` or ``"fixed"``.
    :param float mask_rate: the rate of ``"fixed"`` (ignored by ``"uniform"``).
    :param int steps: optimiser steps.
    :param int batch_size: sequences per step.
    :param float lr: Adam's learning rate.
    :param int num_masks: masks per sequence per step (averaged).
    :param int seed: seeds a fresh generator (batches and masks) when ``generator`` is None.
    :param torch.Generator generator: the random generator (on the sequences' device).
    :param progress: show a tqdm bar: True, False, or None (only when stderr is a terminal).
    :param int threads: torch's CPU threads while training (restored after); None leaves the
        setting. ``threads=1`` is much faster for tiny models on a busy CPU.
    :returns: list of the ``steps`` losses (floats, nats per token).

    Example::

        model = TinyMLM(vocab_size=8, seq_len=12)
        losses = train_mlm(model, train_tokens, objective="uniform", steps=500, seed=0)
        curve = mlm_curve(model.eval(), test_tokens, num_masks=4)
    """
    check_choice("objective", objective, OBJECTIVES)
    if not torch.is_tensor(sequences) or sequences.dtype != torch.long or sequences.dim() != 2:
        raise ValueError("train_mlm: sequences must be a long tensor of shape (N, T)")
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    num_masks = check_positive_int("num_masks", num_masks)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"train_mlm: lr must be a positive number, got {lr!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_mlm: the model has no trainable parameters")
    N, T = sequences.shape
    device = sequences.device
    if generator is None:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
    optimizer = torch.optim.Adam(params, lr=lr)
    was_training = model.training
    model.train()
    history = []
    bar = progress_bar(steps, progress, desc="train_mlm", unit="step")
    try:
        with num_threads(threads):
            for _ in range(steps):
                index = torch.randint(N, (batch_size,), device=device, generator=generator)
                batch = sequences[index]
                estimate = mlm_estimate(
                    model,
                    batch,
                    estimator=objective,
                    num_masks=num_masks,
                    mask_rate=mask_rate,
                    generator=generator,
                )
                loss = -estimate.total / (batch_size * T)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                history.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    return history

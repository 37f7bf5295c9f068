r"""A ground-truth masked predictor: the exact posterior predictive of a discrete HMM (and
:func:`random_hmm`, random parameters for one).

For a hidden Markov model (:func:`pyro_mpt.models.hmm`) the ideal masked language model is
the posterior predictive :math:`p(x_j \mid x_{\text{visible}})`. It is computed here by a
batched forward-backward pass in which the hidden (masked) positions carry emission
likelihood 1, i.e. their evidence is marginalised (the theory page of the docs, section 2b).
Plugged into :func:`pyro_mpt.mlm.mlm_curve`, its area is the exact log marginal likelihood (up to Monte
Carlo error; exactly for the exhaustive and chain estimators).

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["hmm_predictor", "random_hmm"]


def _check_hmm(initial, transition, emission):
    for name, value in (("initial", initial), ("transition", transition), ("emission", emission)):
        if not torch.is_tensor(value) or not value.is_floating_point():
            raise ValueError(f"hmm_predictor: {name} must be a floating-point tensor")
    if initial.dim() != 1:
        raise ValueError(f"hmm_predictor: initial must have shape (C,), got {tuple(initial.shape)}")
    C = initial.shape[0]
    if tuple(transition.shape) != (C, C):
        raise ValueError(
            f"hmm_predictor: transition must have shape (C, C) = ({C}, {C}), "
            f"got {tuple(transition.shape)}"
        )
    if emission.dim() != 2 or emission.shape[0] != C:
        raise ValueError(
            f"hmm_predictor: emission must have shape (C, V) with C = {C}, "
            f"got {tuple(emission.shape)}"
        )


def hmm_predictor(
    initial: torch.Tensor, transition: torch.Tensor, emission: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""A masked predictor whose log-probabilities are the exact HMM posterior predictive.

    ``predictor(tokens, mask)`` with ``tokens`` long ``(B, T)`` and ``mask`` bool ``(B, T)``
    (True = hidden) returns ``(B, T, V)`` with, at every position :math:`t`,
    :math:`\log p(x_t = v \mid x_{\{s \ne t:\ \neg\mathrm{mask}_s\}})`: the predictive given
    the visible tokens other than :math:`t` itself. At hidden positions this is what an ideal
    masked language model outputs (the only positions :mod:`pyro_mpt.mlm` reads); at visible
    positions it is the leave-one-out predictive.

    Batched forward-backward with per-step normalisation (stable for long sequences),
    vectorised over the batch; the loop is over ``T`` only. Differentiable in the HMM's
    parameters.

    :param initial: ``(C,)`` initial state probabilities.
    :param transition: ``(C, C)`` row-stochastic transition matrix.
    :param emission: ``(C, V)`` row-stochastic emission matrix.

    Example::

        predictor = hmm_predictor(*random_hmm(4, 8))          # C = 4 states, V = 8 symbols
        curve = mlm_curve(predictor, tokens, exhaustive=True)  # tokens: long (N, T), T <= 16
        curve.area                                             # = exact log p(X)
    """
    _check_hmm(initial, transition, emission)
    V = emission.shape[-1]

    def _normalize(p):
        return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)

    def predictor(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(tokens) or tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError("hmm_predictor: tokens must be a long tensor of shape (B, T)")
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            raise ValueError("hmm_predictor: mask must be a bool tensor")
        if mask.shape != tokens.shape:
            raise ValueError(
                f"hmm_predictor: mask shape {tuple(mask.shape)} does not match tokens shape "
                f"{tuple(tokens.shape)}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise ValueError(f"hmm_predictor: token ids must lie in [0, {V})")
        B, T = tokens.shape
        # evidence e[b, t, c] = p(x_t | z_t = c) where visible, 1 where hidden
        e = emission.T[tokens]  # (B, T, C)
        e = torch.where(mask.unsqueeze(-1), torch.ones_like(e), e)
        # forward: pred[t] = p(z_t | x_visible<t) (normalised)
        pred = []
        a = initial.expand(B, -1)
        for t in range(T):
            pred.append(a)
            a = _normalize(a * e[:, t]) @ transition
        # backward: beta[t] ∝ p(x_visible>t | z_t)
        beta = [None] * T
        b = torch.ones_like(initial).expand(B, -1)
        for t in range(T - 1, -1, -1):
            beta[t] = b
            b = _normalize((e[:, t] * b) @ transition.T)
        post = _normalize(torch.stack(pred, 1) * torch.stack(beta, 1))  # (B, T, C)
        return (post @ emission).log()

    return predictor


def random_hmm(
    num_states: int,
    vocab_size: int,
    *,
    generator: torch.Generator | None = None,
    stickiness: float = 2.5,
    peakedness: float = 1.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""A random HMM with moderately peaked rows (float64):
    ``transition = softmax(stickiness * I + randn)``, ``emission = softmax(peakedness * randn)``,
    uniform initial distribution.

    :param int num_states: :math:`C`.
    :param int vocab_size: :math:`V`.
    :param torch.Generator generator: optional random generator.
    :param float stickiness: added to the diagonal of the transition logits.
    :param float peakedness: scale of the emission logits.
    :returns: ``(initial (C,), transition (C, C), emission (C, V))``.

    Example::

        initial, transition, emission = random_hmm(4, 8, generator=torch.Generator().manual_seed(0))
        tokens = sample_hmm(200, 12, initial, transition, emission)   # (200, 12), from models
    """
    C, V = num_states, vocab_size
    dtype = torch.float64
    noise = torch.randn(C, C, generator=generator, dtype=dtype)
    transition = (stickiness * torch.eye(C, dtype=dtype) + noise).softmax(-1)
    emission = (peakedness * torch.randn(C, V, generator=generator, dtype=dtype)).softmax(-1)
    initial = torch.full((C,), 1.0 / C, dtype=dtype)
    return initial, transition, emission

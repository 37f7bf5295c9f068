"""A discrete hidden Markov model under ``pyro.markov``, its forward-algorithm log marginal
likelihood and a sampler.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

__all__ = ["hmm", "hmm_log_marginal", "sample_hmm"]


def hmm(
    data: torch.Tensor,
    initial: torch.Tensor,
    transition: torch.Tensor,
    emission: torch.Tensor,
) -> None:
    r"""A discrete HMM, one sequence per row of ``data`` (N, T) of integer symbols:
    :math:`z_1 \sim \pi`, :math:`z_t \mid z_{t-1} \sim A_{z_{t-1}}`,
    :math:`x_t \mid z_t \sim B_{z_t}`. The hidden chain is enumerated under
    :func:`pyro.markov`; the ``T`` observed sites ``x_0 .. x_{T-1}`` are the tokens.

    :param torch.Tensor data: long ``(N, T)`` symbols in ``0..V-1``.
    :param initial: (C,) initial state probabilities.
    :param transition: (C, C) row-stochastic transition matrix.
    :param emission: (C, V) row-stochastic emission matrix.

    Example::

        initial, transition, emission = random_hmm(3, 5)  # from pyro_mpt.mlm
        X = sample_hmm(100, 8, initial, transition, emission)      # (100, 8)
        mpt_curve(hmm, X, initial, transition, emission).area      # ~ hmm_log_marginal(X, ...)
    """
    N, T = data.shape
    with pyro.plate("sequences", N, dim=-1):
        z = None
        for t in pyro.markov(range(T)):
            probs = initial if z is None else Vindex(transition)[z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Categorical(Vindex(emission)[z]), obs=data[:, t])


def hmm_log_marginal(
    data: torch.Tensor,
    initial: torch.Tensor,
    transition: torch.Tensor,
    emission: torch.Tensor,
) -> torch.Tensor:
    r"""The forward algorithm: exact :math:`\sum_n \log p(x_n)` of :func:`hmm`, per sequence
    summed. ``data`` is (N, T) of integer symbols.

    :math:`\log p(x_n) = \log \sum_{z_T} \alpha_T(z_T)` with
    :math:`\alpha_1(z) = \pi_z B_{z, x_1}` and
    :math:`\alpha_t(z) = B_{z, x_t} \sum_{z'} \alpha_{t-1}(z') A_{z' z}`.

    :param initial: :math:`\pi`, ``(C,)``.
    :param transition: :math:`A`, ``(C, C)``.
    :param emission: :math:`B`, ``(C, V)``.
    :returns: a scalar tensor.

    Example::

        hmm_log_marginal(X, initial, transition, emission)         # X: long (N, T)
    """
    log_A = transition.log()
    log_B = emission.log()
    alpha = initial.log() + log_B[:, data[:, 0]].T  # (N, C)
    for t in range(1, data.shape[1]):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + log_A, -2) + log_B[:, data[:, t]].T
    return torch.logsumexp(alpha, -1).sum()


def sample_hmm(
    num_data: int,
    num_tokens: int,
    initial: torch.Tensor,
    transition: torch.Tensor,
    emission: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draws ``num_data`` sequences of ``num_tokens`` symbols from :func:`hmm`.

    :param int num_data: :math:`N`.
    :param int num_tokens: :math:`T`.
    :param initial: ``(C,)``; ``transition``: ``(C, C)``; ``emission``: ``(C, V)``.
    :param torch.Generator generator: optional random generator.
    :returns: a long tensor of shape (N, T).

    Example::

        X = sample_hmm(100, 8, *random_hmm(3, 5))                 # long (100, 8), in 0..4
    """
    N, T = num_data, num_tokens
    z = torch.multinomial(initial.expand(N, -1), 1, generator=generator).squeeze(-1)
    xs = []
    for t in range(T):
        if t > 0:
            z = torch.multinomial(transition[z], 1, generator=generator).squeeze(-1)
        xs.append(torch.multinomial(emission[z], 1, generator=generator).squeeze(-1))
    return torch.stack(xs, -1)

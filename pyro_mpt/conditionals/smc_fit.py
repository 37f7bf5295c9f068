r"""Likelihood-tempered SMC: weighted particles of every sequence's posterior
:math:`p(u \mid x_n)` on the unconstrained space, for a proposal to be fitted to
(:mod:`pyro_mpt.reference.smc_importance`).

From ``P`` prior draws, the whole likelihood enters in powers :math:`0 = \beta_0 < \beta_1 <
\dots < \beta_J = 1`, each increment the largest that keeps the ESS at ``P / 2``
(the bisection of :mod:`~pyro_mpt.conditionals.smc`), then systematic resampling and
random-walk Metropolis moves that leave :math:`\pi_\beta(u) \propto p_U(u)\,
p(x_n \mid T(u))^\beta` invariant (:func:`~pyro_mpt.conditionals.smc_moves.random_walk_move`).

Only the final cloud is wanted, not the evidence along an order, so the tokens need not
enter one at a time: revealing them one by one takes at least one tempering step (and its
moves) per token, while tempering the whole likelihood takes as many as the information
the data carry needs. Measured on PPCA in the hard regime of issue 13 (N=50, T=8, two
latents, 4 fits of 32 particles): 7 steps against 29, with the same effective sample size
of the importance draws that follow.

Reference: P. Del Moral, A. Doucet, A. Jasra, "Sequential Monte Carlo samplers", JRSS B
68(3), 2006, section 3.3.2 (tempering).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..progress import progress_bar
from .smc import DEFAULT_MOVES, _ess, _next_temperature, _resample
from .smc_moves import ParticleModel, fit_gaussian, random_walk_move

__all__ = ["TemperedFit", "tempered_fit"]


class TemperedFit(NamedTuple):
    """The weighted mean ``(R, 1, N, d)`` and covariance Cholesky factor ``(R, N, d, d)`` of
    ``R`` final clouds (the latents concatenated, unconstrained), and the most tempering
    steps a chunk took."""

    mean: torch.Tensor
    chol: torch.Tensor
    steps: int


def _temper(pm: ParticleModel, R: int, P: int, num_moves: int):
    """One chunk of ``R`` independent tempered runs: ``(mean, chol, steps)``."""
    N, T = pm.layout.num_sequences, pm.layout.num_tokens
    u, log_prior, table = pm.draw(R, P)
    state = {"u": u, "log_prior": log_prior, "table": table}
    log_w = torch.zeros_like(log_prior)  # (R, P, N)
    beta = log_w.new_zeros(R, N)
    steps = 0
    while bool((beta < 1).any()):
        lik = state["table"].sum(-1)  # (R, P, N)
        delta = _next_temperature(log_w, lik, 1 - beta, P / 2)
        # a finished sequence takes no step (0 * -inf would be NaN for an impossible particle)
        log_w = log_w + torch.where(delta.unsqueeze(1) > 0, delta.unsqueeze(1) * lik, 0.0)
        beta = torch.where(1 - (beta + delta) < 1e-9, 1.0, beta + delta)
        log_w = _resample(state, log_w, _ess(log_w) < P / 2 + 1e-6)
        steps += 1
        if num_moves and bool((beta < 1).any()):
            power = beta.unsqueeze(-1).expand(R, N, T)  # every token at the same power
            random_walk_move(pm, state, power, log_w, num_moves)
    x = torch.cat(list(state["u"].values()), -1)
    mean, chol = fit_gaussian(x, torch.softmax(log_w, 1).unsqueeze(-1).to(x.dtype))
    return mean, chol, steps


def tempered_fit(
    pm: ParticleModel,
    num_fits: int,
    num_particles: int,
    max_elements: int,
    num_moves: int = DEFAULT_MOVES,
    progress: bool = False,
) -> TemperedFit:
    r"""``num_fits`` independent likelihood-tempered SMC runs of ``num_particles`` per
    sequence (the module docstring), in chunks of runs whose ``(chunk, P, N, T)`` tables
    (a few of them at once) stay under ``max_elements``; the final clouds' weighted means
    and covariance factors
    :math:`\bar u = \sum_s W_s u_s`, :math:`\Sigma = \sum_s W_s (u_s - \bar u)(u_s - \bar
    u)^\top` (:func:`~pyro_mpt.conditionals.smc_moves.fit_gaussian`).

    :param pm: the :class:`~pyro_mpt.conditionals.smc_moves.ParticleModel`.
    :param int num_fits: ``R``, the independent runs.
    :param int num_particles: ``P`` per run and sequence.
    :param int max_elements: the memory budget of one chunk.
    :param int num_moves: Metropolis steps after each tempering step (times ``max(1, d -
        1)``).
    :param bool progress: a progress bar over the chunks.
    """
    N, T = pm.layout.num_sequences, pm.layout.num_tokens
    chunk = max(1, max_elements // (4 * num_particles * N * (T + 8)))
    starts = range(0, num_fits, chunk)
    parts = []
    with torch.no_grad(), progress_bar(len(starts), progress, "SMC fits", unit="chunk") as bar:
        for start in starts:
            R = min(chunk, num_fits - start)
            parts.append(_temper(pm, R, num_particles, num_moves))
            bar.update(1)
    return TemperedFit(
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        max(p[2] for p in parts),
    )

r"""Experiment 1 of the paper: the stratified MPT estimate converges to the exact log
marginal likelihood as the number of permutations (masks) per mask size grows.

PPCA with its true parameters, :math:`T \in \{5, 10, 20, 50\}` tokens, :math:`K = 2`,
:math:`N = 100` sequences, noise precision 5. For each :math:`T` and each number :math:`p`
of masks per size, the area of the curve :math:`\sum_m S(m)` (each :math:`S(m)` averaged over
:math:`p` uniform masks of size :math:`m` per sequence) is compared with the exact
:math:`\log p(X)` of :func:`~pyro_mpt.models.ppca_log_marginal`. The error per sequence
shrinks like :math:`1/\sqrt{p}`.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520 (Section 4, convergence figure).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyro
import torch

from ..curve import mpt_curve
from ..models import ppca_collapsed, ppca_log_marginal, sample_ppca
from ..plotting import bare_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ConvergenceResult", "convergence"]


@dataclass
class ConvergenceResult:
    r"""Numbers of :func:`convergence`.

    :ivar tuple T_values: the sequence lengths.
    :ivar tuple permutations: masks per size :math:`p`.
    :ivar torch.Tensor errors: ``(len(T_values), len(permutations), repeats)`` signed
        :math:`(\widehat{\log p(X)} - \log p(X)) / N`, nats per sequence, one per
        independent repeat of the masks (same data).
    :ivar torch.Tensor stderr: same shape, the estimate's standard error per sequence
        (NaN for :math:`p = 1`).
    :ivar torch.Tensor exact: ``(len(T_values),)`` exact :math:`\log p(X) / N`.
    :ivar int num_data: :math:`N`.

    Example::

        res = convergence(T_values=(5, 10), N=50, permutations=(1, 10, 100))
        res.errors.shape                         # (2, 3, 1)
        res.abs_errors, res.final_abs_error
    """

    T_values: tuple[int, ...]
    permutations: tuple[int, ...]
    errors: torch.Tensor
    stderr: torch.Tensor
    exact: torch.Tensor
    num_data: int

    @property
    def repeats(self) -> int:
        return int(self.errors.shape[-1])

    @property
    def abs_errors(self) -> torch.Tensor:
        """``(len(T_values), len(permutations))``: ``|MPT - LML|`` per sequence, averaged
        over the repeats."""
        return self.errors.abs().mean(-1)

    @property
    def final_abs_error(self) -> torch.Tensor:
        """``(len(T_values),)``: ``|MPT - LML|`` per sequence at the largest ``p``."""
        return self.abs_errors[:, -1]

    def headline(self) -> str:
        """One line: the final error per sequence for every ``T``."""
        parts = ", ".join(
            f"T={T}: {float(e):.3g}" for T, e in zip(self.T_values, self.final_abs_error)
        )
        return (
            f"|MPT - LML| per sequence at {self.permutations[-1]} permutations/size "
            f"(mean of {self.repeats} repeats): {parts}"
        )

    def figure(self, ax: Axes | None = None) -> Figure:
        """``|MPT - LML|`` per sequence against permutations per size (log-log), one line per
        ``T``, with a :math:`1/\\sqrt p` guide. Returns the Figure."""
        fig, ax = bare_axes(ax, figsize=(6.0, 4.0))
        ps = [float(p) for p in self.permutations]
        floor = 1e-6
        for T, row in zip(self.T_values, self.abs_errors):
            ax.plot(ps, [max(float(e), floor) for e in row], marker="o", label=f"T = {T}")
        first = float(self.abs_errors[:, 0].mean())
        ax.plot(
            ps,
            [first / math.sqrt(p / ps[0]) for p in ps],
            color="grey",
            linestyle="--",
            label="∝ 1/√p",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("permutations (masks) per mask size p")
        ax.set_ylabel(
            "|MPT − log p(X)| per sequence [nats]"
            + (f"\n(mean of {self.repeats} repeats)" if self.repeats > 1 else "")
        )
        ax.set_title(f"Stratified MPT converges to the exact LML (PPCA, N = {self.num_data})")
        ax.legend(fontsize="small")
        return fig


def convergence(
    T_values: Sequence[int] = (5, 10, 20, 50),
    K: int = 2,
    N: int = 100,
    noise_precision: float = 5.0,
    permutations: Sequence[int] = (1, 3, 10, 30, 100, 300),
    seed: int = 0,
    device: str | torch.device = "cpu",
    share_masks: bool = False,
    repeats: int = 1,
) -> ConvergenceResult:
    r"""Stratified MPT estimate minus the exact LML of PPCA with its true parameters, per
    sequence, for each sequence length and number of masks per size.

    Example::

        res = convergence(T_values=(5, 10), N=50, permutations=(1, 10, 100))
        res.final_abs_error, res.figure().savefig("convergence.png")

    :param tuple T_values: sequence lengths :math:`T`.
    :param int K: latent dimension.
    :param int N: sequences per data set.
    :param float noise_precision: :math:`1/\sigma^2` of the generated data.
    :param tuple permutations: masks per mask size :math:`p` (increasing).
    :param int seed: seeds the data (one data set per ``T``) and the masks.
    :param device: torch device.
    :param bool share_masks: the same masks for every sequence (faster, correlated errors).
    :param int repeats: independent repeats of the masks per ``(T, p)``; the figure and
        :attr:`ConvergenceResult.abs_errors` average ``|error|`` over them.
    :returns: :class:`ConvergenceResult`.

    The error is :math:`\big(\sum_n \sum_{m=1}^T \hat S_n(m) - \log p(X)\big)/N`, with
    :math:`\hat S_n(m)` the mean score of ``p`` uniform masks of size :math:`m`; it shrinks as
    :math:`O(1/\sqrt p)` (the estimator is unbiased).
    """
    device = torch.device(device)
    noise_scale = float(noise_precision) ** -0.5
    errors = torch.zeros(len(T_values), len(permutations), repeats, dtype=torch.float64)
    stderr = torch.zeros_like(errors)
    exact = torch.zeros(len(T_values), dtype=torch.float64)
    for i, T in enumerate(T_values):
        gen = torch.Generator().manual_seed(seed * 1000 + int(T))
        X, truth = sample_ppca(N, int(T), K, noise_scale=noise_scale, generator=gen)
        X = X.to(device)
        truth = {k: v.to(device) for k, v in truth.items()}

        def model(data, truth=truth):
            return ppca_collapsed(data, K, **truth)

        lml = float(ppca_log_marginal(X, **truth))
        exact[i] = lml / N
        for j, p in enumerate(permutations):
            for r in range(repeats):
                pyro.set_rng_seed(seed * 100003 + int(T) * 1009 + j * 101 + r)
                curve = mpt_curve(model, X, num_masks=int(p), share_masks=share_masks)
                errors[i, j, r] = (float(curve.area) - lml) / N
                stderr[i, j, r] = curve.area_stderr / N
    return ConvergenceResult(
        T_values=tuple(int(t) for t in T_values),
        permutations=tuple(int(p) for p in permutations),
        errors=errors,
        stderr=stderr,
        exact=exact,
        num_data=int(N),
    )

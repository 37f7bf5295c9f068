r"""Experiment 2 of the paper: the area under the masked pre-training curve is the log
marginal likelihood.

PPCA with its true parameters, :math:`T = 200`, :math:`K = 5`, :math:`N = 1000`. The curve
:math:`S(m)` over mask rates :math:`m/T = 1/T, \dots, 1` is estimated with 1 and with 100
uniform masks per size; its area :math:`\sum_m S(m)` is compared with the exact
:math:`\log p(X)`.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520 (Figure 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyro
import torch

from ..curve import MPTCurve, mpt_curve
from ..models import ppca_collapsed, ppca_log_marginal, sample_ppca
from ..plotting import bare_axes, plot_curve

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["AreaResult", "area"]


@dataclass
class AreaResult:
    r"""Numbers of :func:`area`.

    :ivar int T: tokens per sequence.
    :ivar int K: latent dimension.
    :ivar int N: sequences.
    :ivar tuple permutations: masks per size of each curve.
    :ivar list curves: one :class:`~pyro_mpt.MPTCurve` per entry of ``permutations``.
    :ivar float exact: exact :math:`\log p(X)` (summed over sequences).
    :ivar bool share_masks: whether every sequence had the same masks.

    Example::

        res = area(T=50, K=5, N=200, permutations=(1, 20))
        res.areas, res.area_stderr, res.z_scores     # one entry per permutations value
        print(res.headline())
    """

    T: int
    K: int
    N: int
    permutations: tuple[int, ...]
    curves: list[MPTCurve]
    exact: float
    share_masks: bool

    @property
    def areas(self) -> list[float]:
        """The areas :math:`\\sum_m S(m)`, one per curve (nats, summed over sequences)."""
        return [float(c.area) for c in self.curves]

    @property
    def area_stderr(self) -> list[float]:
        """Standard errors of the areas (NaN with one mask per size)."""
        return [float(c.area_stderr) for c in self.curves]

    def z_scores(self) -> list[float]:
        """``(area - exact) / stderr`` per curve (NaN where the stderr is unknown)."""
        out = []
        for a, se in zip(self.areas, self.area_stderr):
            out.append((a - self.exact) / se if math.isfinite(se) and se > 0 else float("nan"))
        return out

    def headline(self) -> str:
        parts = []
        for p, a, se in zip(self.permutations, self.areas, self.area_stderr):
            txt = f"p={p}: area {a / self.N:.4f}"
            if math.isfinite(se):
                txt += f" ± {se / self.N:.4f}"
            parts.append(txt)
        return "; ".join(parts) + f"; exact LML {self.exact / self.N:.4f} (nats per sequence)"

    def figure(self, ax: Axes | None = None) -> Figure:
        r"""The curves :math:`S(m)` per sequence against the mask rate, each with its
        :math:`\pm 1` s.e. band and its area in the legend (:func:`~pyro_mpt.plot_curve`,
        ``shade="band"``: overlapping areas shaded from 0 would blend into colours the legend
        does not show), and the exact LML as the reference line. Returns the Figure."""
        fig, ax = bare_axes(ax, figsize=(7.0, 4.8))
        colors = ["tab:orange", "tab:blue", "tab:green", "tab:purple"]
        last = len(self.curves) - 1
        for i, (p, curve) in enumerate(zip(self.permutations, self.curves)):
            plot_curve(
                curve,
                reference=self.exact if i == last else None,
                ax=ax,
                per_sequence=True,
                color=colors[i % len(colors)],
                label=f"S(m), {p} permutation{'s' if p > 1 else ''} per size",
                shade="band",
            )
        # two short lines: one long line was cut off at the figure's right edge
        ax.set_title(
            f"MPT curve and its area: PPCA, T = {self.T}, K = {self.K}, N = {self.N}\n"
            f"exact log p(X) = {self.exact / self.N:.3f} nats per sequence",
            fontsize="medium",
        )
        return fig


def area(
    T: int = 200,
    K: int = 5,
    N: int = 1000,
    permutations: Sequence[int] = (1, 100),
    noise_precision: float = 5.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    share_masks: bool = True,
) -> AreaResult:
    r"""The curve :math:`S(m)` of PPCA with its true parameters, estimated with each number
    of masks per size in ``permutations``, and its area against the exact LML.

    ``share_masks=True`` (default) draws the same masks for every sequence: still unbiased,
    and at the paper's size (T = 200, N = 1000) much faster with the low-rank Gaussian
    conditionals; the standard error accounts for the correlation it brings.

    Example::

        res = area(T=50, K=5, N=200, permutations=(1, 20))
        res.areas, res.exact, res.figure().savefig("area.png")

    :returns: :class:`AreaResult`.

    The area is :math:`\sum_{m=1}^T \hat S(m)`, :math:`\hat S(m)` averaging the stratified
    masked scores of ``p`` masks of size :math:`m` per sequence; its expectation is
    :math:`\log p(X)`, here the exact
    :math:`\sum_n \log \mathcal N(x_n; \mu, W W^\top + \sigma^2 I)` of data ``(N, T)``.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    X, truth = sample_ppca(N, T, K, noise_scale=float(noise_precision) ** -0.5, generator=gen)
    X = X.to(device)
    truth = {k: v.to(device) for k, v in truth.items()}

    def model(data):
        return ppca_collapsed(data, K, **truth)

    exact = float(ppca_log_marginal(X, **truth))
    curves = []
    for j, p in enumerate(permutations):
        pyro.set_rng_seed(seed * 1000 + j)
        curves.append(mpt_curve(model, X, num_masks=int(p), share_masks=share_masks))
    return AreaResult(
        T=int(T),
        K=int(K),
        N=int(N),
        permutations=tuple(int(p) for p in permutations),
        curves=curves,
        exact=exact,
        share_masks=bool(share_masks),
    )

r"""Experiment 3 of the paper: training by cumulative masked pre-training maximises the log
marginal likelihood; a fixed mask rate does not.

PPCA, :math:`T = 10`, :math:`N = 2000`, :math:`K = 2`: the collapsed model's ``W``, ``loc``
and ``noise_scale`` are learned by Adam on :class:`~pyro_mpt.MaskedELBO` with the stratified
estimator (unbiased for :math:`\log p(X)`) and with a fixed 80% mask rate (biased: it
maximises :math:`T\,S(0.8T)`, not the LML). Along the way the objective and the exact
:math:`\log p(X)` of the current parameters are recorded, against the closed-form
maximum-likelihood fit (Tipping & Bishop 1999) and the true parameters.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520 (Section 4, training figure).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from ..masked_elbo import MaskedELBO
from ..models import ppca_collapsed, ppca_log_marginal, ppca_maximum_likelihood, sample_ppca

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["TrainingResult", "training", "TRAINING_RUNS"]

#: The runs of :func:`training`: name -> MaskedELBO keyword arguments.
TRAINING_RUNS = {
    "stratified": {"estimator": "stratified"},
    "fixed 80%": {"estimator": "fixed", "mask_rate": 0.8},
}


@dataclass
class TrainingResult:
    r"""Numbers of :func:`training`, all in nats per sequence.

    :ivar torch.Tensor steps: ``(R,)`` the recorded SVI steps (1-based).
    :ivar dict objective: run name -> ``(R,)`` the MaskedELBO objective
        :math:`-\mathrm{loss}/N`, averaged over the steps since the previous record.
    :ivar dict lml: run name -> ``(R,)`` exact :math:`\log p(X)/N` of the current parameters.
    :ivar float ml_lml: :math:`\log p(X)/N` of the closed-form maximum-likelihood fit.
    :ivar float true_lml: :math:`\log p(X)/N` of the true parameters.
    :ivar int N: sequences.
    :ivar int T: tokens per sequence.

    Example::

        res = training(N=500, steps=200)
        res.steps.shape, res.lml["stratified"].shape   # (R,), (R,)
        res.gap_to_ml("stratified")
    """

    steps: torch.Tensor
    objective: dict[str, torch.Tensor]
    lml: dict[str, torch.Tensor]
    ml_lml: float
    true_lml: float
    N: int
    T: int

    def final_lml(self, run: str = "stratified") -> float:
        """The exact LML per sequence of ``run``'s parameters after the last step."""
        return float(self.lml[run][-1])

    def gap_to_ml(self, run: str = "stratified") -> float:
        """``final_lml(run) - ml_lml`` (<= 0 up to the ML fit's optimality)."""
        return self.final_lml(run) - self.ml_lml

    def headline(self) -> str:
        runs = ", ".join(f"{name} {self.final_lml(name):.4f}" for name in self.lml)
        return (
            f"final exact LML per sequence: {runs}; closed-form ML {self.ml_lml:.4f}; "
            f"true parameters {self.true_lml:.4f}"
        )

    def figure(self, ax: Axes | None = None) -> Figure:
        """Without ``ax``: two panels, (left) the exact LML of each run's current parameters
        minus the closed-form ML LML (per sequence; 0 is the maximum), with the
        true parameters' level, and (right) each run's MPT objective with the ML and true
        LMLs. With ``ax``: the left panel on it. Returns the Figure."""
        if ax is None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(11.0, 4.5), layout="constrained")
            ax, ax2 = fig.subplots(1, 2)
        else:
            fig, ax2 = ax.figure, None
        steps = self.steps.numpy()
        colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
        gaps = {name: v - self.ml_lml for name, v in self.lml.items()}
        for i, name in enumerate(self.lml):
            c = colors[i % len(colors)]
            ax.plot(
                steps,
                gaps[name].numpy(),
                color=c,
                label=f"{name}: final {float(gaps[name][-1]):+.4f}",
            )
        ax.axhline(0.0, color="black", linewidth=1.0, label="closed-form ML")
        ax.axhline(
            self.true_lml - self.ml_lml, color="grey", linestyle=":", label="true parameters"
        )
        lo = min(float(v[len(v) // 5 :].min()) for v in gaps.values())
        lo = min(lo, self.true_lml - self.ml_lml)
        ax.set_ylim(lo - max(0.01, 0.3 * abs(lo)), max(0.01, 0.3 * abs(lo)))
        ax.set_xlabel("SVI step")
        ax.set_ylabel("exact log p(X) − ML log p(X) [nats per sequence]")
        ax.set_title(
            f"Exact LML while training PPCA (T = {self.T}, N = {self.N})", fontsize="medium"
        )
        ax.legend(fontsize="small", loc="lower right")
        if ax2 is not None:
            for i, name in enumerate(self.objective):
                c = colors[i % len(colors)]
                ax2.plot(
                    steps,
                    self.objective[name].numpy(),
                    color=c,
                    alpha=0.8,
                    label=f"MaskedELBO objective, {name}",
                )
            ax2.axhline(self.ml_lml, color="black", linewidth=1.0, label="ML log p(X)")
            ax2.axhline(self.true_lml, color="grey", linestyle=":", label="true log p(X)")
            vals = [float(v[len(v) // 5 :].min()) for v in self.objective.values()]
            lo = min(vals + [self.ml_lml])
            pad = max(0.05, 0.1 * (self.ml_lml - lo))
            ax2.set_ylim(lo - pad, self.ml_lml + pad + 0.1 * (self.ml_lml - lo))
            ax2.set_xlabel("SVI step")
            ax2.set_ylabel("nats per sequence")
            ax2.set_title("Objectives: the fixed rate's is biased", fontsize="medium")
            ax2.legend(fontsize="small", loc="center right")
        return fig


def training(
    T: int = 10,
    N: int = 2000,
    K: int = 2,
    steps: int = 1500,
    lr: float = 0.05,
    noise_precision: float = 5.0,
    record_every: int = 10,
    runs: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> TrainingResult:
    r"""SVI on :func:`~pyro_mpt.models.ppca_collapsed` with each MaskedELBO of ``runs``
    (default ``TRAINING_RUNS``: stratified, and a fixed 80% rate), recording the
    objective and the exact LML of the current parameters every ``record_every`` steps.

    Clears Pyro's global parameter store before each run (and leaves the last run's
    parameters in it).

    Example::

        res = training(N=500, steps=200)
        res.final_lml("stratified"), res.ml_lml, res.figure().savefig("training.png")

    :param int steps: SVI steps per run.
    :param float lr: Adam learning rate.
    :param int record_every: record every this many steps (and at the last step).
    :param dict runs: name -> MaskedELBO keyword arguments.
    :returns: :class:`TrainingResult`.

    The stratified run maximises an unbiased estimate of :math:`\log p(X) = \sum_m S(m)`; the
    fixed rate :math:`r` maximises :math:`T\,S(\mathrm{round}(rT))` instead, which is biased.
    """
    device = torch.device(device)
    runs = TRAINING_RUNS if runs is None else runs
    gen = torch.Generator().manual_seed(seed)
    X, truth = sample_ppca(N, T, K, noise_scale=float(noise_precision) ** -0.5, generator=gen)
    X = X.to(device)
    truth = {k: v.to(device) for k, v in truth.items()}
    with torch.no_grad():
        ml_lml = float(ppca_log_marginal(X, **ppca_maximum_likelihood(X, K))) / N
        true_lml = float(ppca_log_marginal(X, **truth)) / N

    def model(data):
        return ppca_collapsed(data, K)

    recorded = [s for s in range(1, steps + 1) if s % record_every == 0 or s == steps]
    objective, lml = {}, {}
    for name, kwargs in runs.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(seed + 1)  # the same initialisation for every run
        svi = SVI(model, None, Adam({"lr": lr}), loss=MaskedELBO(**kwargs))
        objs, lmls, acc, count = [], [], 0.0, 0
        for step in range(1, steps + 1):
            acc += svi.step(X)
            count += 1
            if step in recorded:
                objs.append(-acc / count / N)
                acc, count = 0.0, 0
                with torch.no_grad():
                    params = {k: pyro.param(k).detach() for k in ("W", "loc", "noise_scale")}
                    lmls.append(float(ppca_log_marginal(X, **params)) / N)
        objective[name] = torch.tensor(objs, dtype=torch.float64)
        lml[name] = torch.tensor(lmls, dtype=torch.float64)
    return TrainingResult(
        steps=torch.tensor(recorded),
        objective=objective,
        lml=lml,
        ml_lml=ml_lml,
        true_lml=true_lml,
        N=int(N),
        T=int(T),
    )

r"""Masked language models on data with a known log marginal likelihood.

A random hidden Markov model (``num_states`` hidden states, ``vocab_size`` symbols, moderately
peaked transitions and emissions) generates training and held-out sequences of ``seq_len``
tokens. Its exact held-out :math:`\log p(X)` comes from the forward algorithm
(:func:`pyro_mpt.models.hmm_log_marginal`) and is cross-checked against the exact HMM masked
predictor (:func:`pyro_mpt.mlm.hmm_predictor`): with the chain estimator (and, for short
sequences, all :math:`2^T - 1` masks) its area equals :math:`\log p(X)` to rounding.

Three :class:`~pyro_mpt.mlm.transformer.TinyMLM` of the same architecture and initialisation
are compared with it, by the area of their held-out MPT curve (in nats per token):

(a) trained by BERT's loss at a fixed 15% mask rate,
(b) trained by the cumulative MPT objective (uniformly random mask sizes, weight T/m),
(c) untrained.

The theory (Moreno-Muñoz et al. 2023) predicts that (b), whose training objective is the
area itself, gets an area closer to the exact LML than (a), which only learns the curve near
:math:`m/T = 0.15`; (c) is far below both.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520 (Section 5, BERT).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..models import hmm_log_marginal, sample_hmm
from ..options import check_bool, check_positive_int
from ..plotting import bare_axes
from ..progress import progress_bar
from .curve import MLMCurve, mlm_curve, pseudo_log_likelihood
from .hmm import hmm_predictor, random_hmm
from .transformer import TinyMLM, num_threads, train_mlm

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["MLMExperimentResult", "mlm_experiment", "random_hmm"]

#: The order and labels of the curves in the result and the figure.
LABELS = {
    "exact": "exact HMM predictor",
    "fixed": "(a) TinyMLM, fixed 15% rate",
    "uniform": "(b) TinyMLM, uniform rates (cumulative)",
    "untrained": "(c) TinyMLM, untrained",
}
COLORS = {"exact": "black", "fixed": "tab:orange", "uniform": "tab:blue", "untrained": "tab:gray"}

#: Sequences up to this length also get the exhaustive cross-check (all 2^T - 1 masks).
EXHAUSTIVE_CHECK_MAX_TOKENS = 10


@dataclass
class MLMExperimentResult:
    r"""Numbers of :func:`mlm_experiment`. Areas, LMLs and PLLs are in nats per token of the
    held-out set (summed over sequences, divided by ``num_test * seq_len``).

    :ivar dict config: the arguments the experiment ran with.
    :ivar float exact_lml: exact held-out :math:`\log p(X)` per token (forward algorithm).
    :ivar float exact_chain_area: the exact predictor's chain-estimator area per token (equals
        ``exact_lml`` to rounding).
    :ivar float exact_exhaustive_area: the same by all :math:`2^T-1` masks, or None (long T).
    :ivar dict curves: :class:`~pyro_mpt.mlm.MLMCurve` per model: ``"exact"``, ``"fixed"``
        (a), ``"uniform"`` (b), ``"untrained"`` (c); sums over the held-out sequences.
    :ivar dict areas: curve area per token per model.
    :ivar dict area_stderr: its Monte Carlo standard error per token.
    :ivar dict fixed_rate: what the 15% rate estimates, :math:`T S(\mathrm{round}(0.15T))`,
        per token per model.
    :ivar dict pll: pseudo-log-likelihood :math:`T S(1)` per token per model.
    :ivar dict losses: training loss histories of ``"fixed"`` and ``"uniform"``.
    :ivar dict seconds: wall time of the parts.

    Example::

        result = mlm_experiment(quick=True)
        print(result.headline())
        result.exact_lml, result.areas["uniform"], result.areas["fixed"]
    """

    config: dict[str, Any]
    exact_lml: float
    exact_chain_area: float
    exact_exhaustive_area: float | None
    curves: dict[str, MLMCurve]
    areas: dict[str, float]
    area_stderr: dict[str, float]
    fixed_rate: dict[str, float]
    pll: dict[str, float]
    losses: dict[str, list[float]]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def gaps(self) -> dict[str, float]:
        """``area - exact_lml`` per model (nats per token)."""
        return {k: v - self.exact_lml for k, v in self.areas.items()}

    def paired_difference(
        self, first: str = "uniform", second: str = "fixed"
    ) -> tuple[float, float]:
        """``(mean, stderr)`` of ``areas[first] - areas[second]`` per token, paired over the
        held-out sequences (the curves share their masks): the standard error is that of the
        mean of the per-sequence area differences."""
        T = self.config["seq_len"]
        d = (self.curves[first].per_sequence - self.curves[second].per_sequence).sum(-1) / T
        N = d.shape[0]
        se = float(d.std() / N**0.5) if N > 1 else float("nan")
        return float(d.mean()), se

    @property
    def uniform_closer(self) -> bool:
        """Whether (b)'s area is closer to the exact LML than (a)'s (what the theory
        predicts)."""
        return abs(self.gaps["uniform"]) < abs(self.gaps["fixed"])

    def headline(self) -> str:
        """A few lines with the numbers, in nats per token of held-out data."""
        lines = [
            f"exact held-out LML per token (forward algorithm): {self.exact_lml:.4f}  "
            f"(exact predictor: chain area {self.exact_chain_area:.4f}"
            + (
                f", exhaustive {self.exact_exhaustive_area:.4f}"
                if self.exact_exhaustive_area is not None
                else ""
            )
            + ")"
        ]
        for key, label in LABELS.items():
            lines.append(
                f"{label:42s} area {self.areas[key]:.4f} ± {self.area_stderr[key]:.4f} "
                f"(gap {self.gaps[key]:+.4f}); 15% rate {self.fixed_rate[key]:.4f}; "
                f"PLL {self.pll[key]:.4f}"
            )
        diff, se = self.paired_difference("uniform", "fixed")
        lines.append(
            "(b) closer to the exact LML than (a): "
            + ("yes" if self.uniform_closer else "no")
            + f" (area (b) - (a) = {diff:+.4f} ± {se:.4f}, paired over sequences)"
        )
        return "\n".join(lines)

    def figure(self, ax: Axes | None = None) -> Axes:
        r""":math:`S(m)` per token (mean log-probability of a masked token, nats) against the
        mask rate :math:`m/T` for the exact predictor, (a), (b) and (c), with :math:`\pm 1`
        standard-error bands; the exact LML per token as a horizontal line (a curve whose mean
        height equals it has the right area) and the 15% rate as a vertical line.

        :param ax: a :class:`matplotlib.axes.Axes`; a new :class:`matplotlib.figure.Figure`
            (no pyplot, no global state) when ``None``.
        :returns: the :class:`~matplotlib.axes.Axes`.
        """
        _, ax = bare_axes(ax, figsize=(7.0, 4.5))
        N = self.config["num_test"]
        for key, label in LABELS.items():
            curve = self.curves[key]
            rates = curve.mask_rates.detach().cpu().double().numpy()
            s = curve.scores.detach().cpu().double().numpy() / N
            se = curve.stderr.detach().cpu().double().numpy() / N
            color = COLORS[key]
            ax.plot(
                rates,
                s,
                marker="o",
                markersize=3,
                color=color,
                linestyle="--" if key == "exact" else "-",
                label=f"{label}: area {self.areas[key]:.3f}",
                zorder=3,
            )
            if (se == se).all() and (se > 0).any():
                ax.fill_between(rates, s - se, s + se, color=color, alpha=0.2, linewidth=0)
        ax.axhline(
            self.exact_lml,
            color="tab:red",
            linestyle=":",
            linewidth=1.5,
            label=f"exact LML per token = {self.exact_lml:.3f}",
        )
        ax.axvline(0.15, color="0.5", linestyle="-.", linewidth=0.8, label="15% mask rate")
        ax.set_xlabel("mask rate m / T")
        ax.set_ylabel("S(m) per token (nats)")
        cfg = self.config
        ax.set_title(
            f"Held-out MPT curves, HMM (C={cfg['num_states']}, V={cfg['vocab_size']}, "
            f"T={cfg['seq_len']}, N={cfg['num_test']})",
            fontsize=10,
        )
        ax.set_xlim(0.0, 1.0 + 0.5 / cfg["seq_len"])
        ax.legend(fontsize=7, loc="center right")
        ax.grid(alpha=0.3)
        return ax


def mlm_experiment(
    num_states: int = 4,
    vocab_size: int = 8,
    seq_len: int = 12,
    num_train: int | None = None,
    num_test: int | None = None,
    steps: int | None = None,
    quick: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    num_masks: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool | None = None,
    threads: int | None = 1,
) -> MLMExperimentResult:
    r"""Trains TinyMLMs on HMM sequences by a fixed 15% rate and by the cumulative objective
    and compares their held-out MPT-curve areas with the exact LML (see the module doc).

    :param int num_states: HMM hidden states.
    :param int vocab_size: HMM symbols (the MLM vocabulary).
    :param int seq_len: tokens per sequence.
    :param int num_train: training sequences (default 2000 when ``quick``, 20000 otherwise).
    :param int num_test: held-out sequences, on which every number is reported (default 200
        when ``quick``, 1000 otherwise).
    :param int steps: Adam steps per model (default 800 when ``quick``, 4000 otherwise).
    :param bool quick: the quick size (for a CPU) or the full size (for a GPU).
    :param int seed: seeds the HMM, the data, the initialisation, the masks.
    :param device: where the models train and are scored (``"cpu"`` or ``"cuda"``).
    :param int batch_size: sequences per training step.
    :param float lr: Adam's learning rate.
    :param int num_masks: masks per size for each held-out curve (stratified estimator;
        default 4 when ``quick``, 16 otherwise).
    :param dict model_kwargs: extra :class:`TinyMLM` arguments (d_model, num_layers, ...).
    :param progress: tqdm bars while training and scoring (None: only on a terminal).
    :param int threads: torch's CPU threads during the experiment (restored after); ``None``
        leaves the setting. One thread is many times faster for these tiny models on a CPU
        shared with other work.
    :returns: :class:`MLMExperimentResult`.

    The HMM's exact :math:`\log p(X)` (forward algorithm) is the target; each model's score is
    its MPT-curve area :math:`\sum_m S(m)` on the held-out set, and the fixed rate's estimate
    :math:`T\,S(\mathrm{round}(0.15\,T))`, all per token.

    Example::

        result = mlm_experiment(quick=True, seed=0)
        print(result.headline())
        result.figure()
    """
    config = _config(dict(locals()))
    with num_threads(config["threads"]):
        return _run(config, progress)


def _config(arguments):
    """The experiment's configuration: the defaults of ``quick`` filled in, every option
    checked (before any work)."""
    quick = check_bool("quick", arguments["quick"])
    sizes = {"num_train": (2000, 20000), "num_test": (200, 1000), "steps": (800, 4000)}
    defaults = {**sizes, "num_masks": (4, 16)}  # (quick, full)
    config = {k: v for k, v in arguments.items() if k != "progress"}
    for name, (small, full) in defaults.items():
        if config[name] is None:
            config[name] = small if quick else full
    counts = ("num_states", "vocab_size", "seq_len", "batch_size", *defaults)
    for name in counts:
        config[name] = check_positive_int(name, config[name])
    config["threads"] = check_positive_int("threads", config["threads"], allow_none=True)
    config["device"] = str(arguments["device"])
    config["model_kwargs"] = dict(arguments["model_kwargs"] or {})
    return config


def _exact(config, per_token):
    """The HMM and its data (CPU, float64), the exact held-out LML per token and its
    cross-checks by the exact predictor's chain and exhaustive areas."""
    seq_len = config["seq_len"]
    g = torch.Generator().manual_seed(config["seed"])
    initial, transition, emission = random_hmm(
        config["num_states"], config["vocab_size"], generator=g
    )
    train = sample_hmm(config["num_train"], seq_len, initial, transition, emission, generator=g)
    test = sample_hmm(config["num_test"], seq_len, initial, transition, emission, generator=g)
    exact_lml = float(hmm_log_marginal(test, initial, transition, emission)) * per_token
    exact = hmm_predictor(initial, transition, emission)
    chain = mlm_curve(exact, test, estimator="chain", generator=g)
    areas = {"chain": float(chain.area) * per_token, "exhaustive": None}
    if seq_len <= EXHAUSTIVE_CHECK_MAX_TOKENS:
        areas["exhaustive"] = float(mlm_curve(exact, test, exhaustive=True).area) * per_token
    for name, value in areas.items():
        if value is not None and abs(value - exact_lml) > 1e-6:
            raise RuntimeError(
                f"mlm_experiment: the exact HMM predictor's {name} area {value} differs from "
                f"the forward algorithm's LML {exact_lml} (nats per token)"
            )
    return train, test, exact, exact_lml, areas


def _train_models(config, train, progress, seconds):
    """Three TinyMLMs of one initialisation (two trained by their objective) and losses."""
    device, seed = torch.device(config["device"]), config["seed"]
    with torch.random.fork_rng(devices=[]):  # the global CPU generator is left as it was
        torch.random.default_generator.manual_seed(seed)
        base = TinyMLM(config["vocab_size"], config["seq_len"], **config["model_kwargs"])
        base = base.to(device)
    models = {"fixed": copy.deepcopy(base), "uniform": copy.deepcopy(base), "untrained": base}
    train_dev = train.to(device)
    losses = {}
    for key in ("fixed", "uniform"):
        t = time.perf_counter()
        losses[key] = train_mlm(
            models[key],
            train_dev,
            objective=key,
            mask_rate=0.15,
            steps=config["steps"],
            batch_size=config["batch_size"],
            lr=config["lr"],
            generator=torch.Generator(device=device).manual_seed(seed + 1),
            progress=progress,
        )
        seconds[f"train_{key}"] = time.perf_counter() - t
    return models, losses


def _run(config, progress):
    seconds = {}
    t0 = time.perf_counter()
    per_token = 1.0 / (config["num_test"] * config["seq_len"])
    train, test, exact, exact_lml, exact_areas = _exact(config, per_token)
    seconds["data_and_exact"] = time.perf_counter() - t0
    models, losses = _train_models(config, train, progress, seconds)

    # held-out curves (float64 log-probabilities, same masks for every model)
    t = time.perf_counter()
    device = torch.device(config["device"])
    predictors = {"exact": exact}
    for key, model in models.items():
        model.eval()
        predictors[key] = lambda tokens, mask, model=model: model(
            tokens.to(device), mask.to(device)
        ).to("cpu", torch.float64)
    curves, areas, area_stderr, fixed_rate, pll = {}, {}, {}, {}, {}
    bar = progress_bar(len(LABELS), progress, desc="mlm_experiment curves", unit="model")
    for key in LABELS:
        with torch.no_grad():
            curve = mlm_curve(
                predictors[key],
                test,
                num_masks=config["num_masks"],
                generator=torch.Generator().manual_seed(config["seed"] + 2),
            )
            p = pseudo_log_likelihood(predictors[key], test)
        curves[key] = curve
        areas[key] = float(curve.area) * per_token
        area_stderr[key] = float(curve.area_stderr) * per_token
        fixed_rate[key] = float(curve.fixed_rate_estimate(0.15)) * per_token
        pll[key] = float(p.sum()) * per_token
        bar.update(1)
    bar.close()
    seconds["curves"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return MLMExperimentResult(
        config=config,
        exact_lml=exact_lml,
        exact_chain_area=exact_areas["chain"],
        exact_exhaustive_area=exact_areas["exhaustive"],
        curves=curves,
        areas=areas,
        area_stderr=area_stderr,
        fixed_rate=fixed_rate,
        pll=pll,
        losses=losses,
        seconds=seconds,
    )

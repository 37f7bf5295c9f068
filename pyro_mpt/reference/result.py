r"""What a reference returns, :class:`LMLEstimate`, and the one way it flags a number that
cannot be trusted (:func:`flag_unreliable`: a message starting ``"UNRELIABLE: "`` and a
:class:`UserWarning`)."""

from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import dataclass, field

import torch

from ..intervals import t_interval

__all__ = [
    "UNRELIABLE",
    "LMLEstimate",
    "fixed_estimate",
    "flag_nonfinite",
    "flag_unreliable",
]

#: The prefix of every message that marks an estimate as not trustworthy.
UNRELIABLE = "UNRELIABLE: "

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class LMLEstimate:
    r"""A reference estimate of :math:`\log p(X) = \sum_n \log p(x_n)`.

    :ivar torch.Tensor total: the estimate, subsampling scales applied (a scalar tensor).
    :ivar torch.Tensor per_sequence: ``(N,)`` :math:`\log p(x_n)`.
    :ivar float stderr: Monte Carlo standard error of ``total`` (0 for ``"exact"`` and
        ``"quadrature"``, whose error is not a sampling error).
    :ivar torch.Tensor per_sequence_stderr: ``(N,)``.
    :ivar str method: ``"exact"``, ``"gaussian"``, ``"importance"`` or ``"quadrature"``
        (what ran).
    :ivar int num_samples: :math:`S` (grid points for quadrature; ``None`` for exact).
    :ivar torch.Tensor ess: ``(N,)`` effective sample sizes (importance), else ``None``.
    :ivar torch.Tensor khat: ``(N,)`` Pareto :math:`\hat k` (importance), else ``None``.
    :ivar float khat_threshold: ArviZ's :math:`\min(1 - 1/\log_{10}S, 0.7)` (importance).
    :ivar bool trustworthy: ``False`` when a diagnostic failed (see ``messages``).
    :ivar list messages: why the method was chosen, how it ran, what was flagged.
    :ivar torch.Tensor log_weights: ``(S, N)`` importance log-weights when
        :math:`SN \le 2^{22}`, else ``None``.
    :ivar torch.device device: where the computation ran.
    :ivar float dof: the degrees of freedom of ``stderr`` (infinite: the delta method's
        normal approximation); :meth:`ci` uses it.
    :ivar torch.Tensor sequence_trustworthy: ``(N,)`` bool, each sequence's own verdict
        (importance: its k-hat and ESS passed), else ``None``. ``trustworthy`` is the
        data-level verdict: see :func:`pyro_mpt.reference.importance.importance_reference`.
    :ivar torch.Tensor resamples: ``(N,)`` resampling steps per SMC run (``"smc"``; its
        ``ess`` is then the smallest ESS over the stages, averaged over the runs).
    :ivar drift: the SMC reference's particle-count check
        (:class:`~pyro_mpt.reference.smc_drift.DriftCheck`: drift, its standard error, the
        implied bias, whether it failed), else ``None``.

    Example::

        ref = log_marginal_likelihood(ppca_collapsed, X, 2)    # X: (N, T)
        ref.total, ref.stderr, ref.per_sequence.shape          # (N,)
        ref.method, ref.trustworthy
    """

    total: torch.Tensor
    per_sequence: torch.Tensor
    stderr: float
    per_sequence_stderr: torch.Tensor
    method: str
    num_samples: int | None = None
    ess: torch.Tensor | None = None
    khat: torch.Tensor | None = None
    khat_threshold: float | None = None
    trustworthy: bool = True
    messages: list = field(default_factory=list)
    log_weights: torch.Tensor | None = None
    device: torch.device | None = None
    dof: float = math.inf
    sequence_trustworthy: torch.Tensor | None = None

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        r"""The interval :math:`\hat L \pm t_{(1+\ell)/2,\nu}\,\mathrm{se}` with
        :math:`\nu` = ``dof`` (the point itself for ``"exact"`` and ``"quadrature"``).

        :param float level: the coverage :math:`\ell`.
        :returns: ``(low, high)``."""
        return t_interval(self.total, self.stderr, self.dof, level)

    resamples: torch.Tensor | None = None
    drift: tuple | None = None

    @property
    def num_particles(self) -> int | None:
        """Deprecated name of ``num_samples``."""
        warnings.warn(
            "LMLEstimate.num_particles is deprecated and will be removed in the next release; "
            "use LMLEstimate.num_samples (it means the same)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.num_samples

    def __str__(self) -> str:
        line = f"log p(x) = {float(self.total):.4f}"
        if self.method in ("importance", "smc_importance"):
            line += f" +- {self.stderr:.4f} ({self.method}, S={self.num_samples}"
            if self.ess is not None:
                line += f", min ESS {float(self.ess.min()):.1f}"
            if self.khat is not None:
                line += f", max k-hat {float(self.khat.max()):.2f}"
            line += ")"
        elif self.method == "smc":
            line += f" +- {self.stderr:.4f} (smc, P={self.num_samples} per run)"
        elif self.method == "quadrature":
            line += f" (quadrature, {self.num_samples} grid points)"
        else:
            line += " (exact)"
        if not self.trustworthy:
            flagged = [m for m in self.messages if m.startswith(UNRELIABLE)]
            line += " -- NOT TRUSTWORTHY: " + ("; ".join(flagged) or "see messages")
        return line


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside the package, so that a warning points
    at the user's call (through :func:`log_marginal_likelihood`, ``evaluate`` ...)."""
    frame, level = inspect.currentframe().f_back, 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _PACKAGE_DIR + os.sep
    ):
        frame, level = frame.f_back, level + 1
    return level


def flag_unreliable(messages: list, msg: str) -> bool:
    """Records ``"UNRELIABLE: " + msg`` in ``messages`` and warns it (``UserWarning``).

    :returns: ``False``, the estimate's new ``trustworthy``."""
    text = UNRELIABLE + msg
    messages.append(text)
    warnings.warn(text, UserWarning, stacklevel=_caller_stacklevel())
    return False


def flag_nonfinite(per_sequence: torch.Tensor, messages: list) -> bool:
    """Flags the sequences whose estimate is not finite (every weight zero or NaN).

    :returns: whether every sequence is finite."""
    n = int((~torch.isfinite(per_sequence)).sum())
    if not n:
        return True
    return flag_unreliable(
        messages,
        f"{n} of {per_sequence.numel()} sequences have a non-finite estimate (every weight "
        "zero or NaN): the proposal or grid misses where the data put the latents",
    )


def fixed_estimate(per_sequence, scale, method, messages, device, **fields) -> LMLEstimate:
    """An estimate without a sampling error (``"exact"``, ``"quadrature"``): zero standard
    errors, ``total`` the scaled sum of ``per_sequence``."""
    return LMLEstimate(
        total=(scale * per_sequence).sum(),
        per_sequence=per_sequence,
        stderr=0.0,
        per_sequence_stderr=torch.zeros_like(per_sequence),
        method=method,
        messages=messages,
        device=device,
        **fields,
    )

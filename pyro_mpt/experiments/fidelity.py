r"""Verdicts for the report of ``pyro-mpt reproduce``: does a measured quantity agree with
the paper's claim, given its spread?

A claim is about one number :math:`d` (e.g. MPT-trained LML minus VAE LML, per image) and is
either that :math:`d > 0` (``"positive"``) or that :math:`d = 0` (``"zero"``). With the mean
:math:`\bar d` and its standard error :math:`s` (over seeds: :math:`s = \mathrm{sd}/\sqrt n`)
and a critical value :math:`c` (over :math:`n` seeds the Student-t
:math:`t_{0.975,\,n-1}`), the interval :math:`[\bar d - c s, \bar d + c s]` decides:

* ``"positive"``: *consistent* if the interval lies above 0, *not consistent* if below,
  *not distinguishable* if it contains 0 (the spread is too large to tell);
* ``"zero"``: *consistent* if it contains 0, else *not consistent*.

A non-finite mean or standard error gives *not distinguishable*.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..intervals import t_quantile

__all__ = [
    "CONSISTENT",
    "NOT_CONSISTENT",
    "NOT_DISTINGUISHABLE",
    "SeedSpread",
    "combine",
    "verdict",
]

CONSISTENT = "consistent"
NOT_CONSISTENT = "not consistent"
NOT_DISTINGUISHABLE = "not distinguishable"
_CLAIMS = ("positive", "zero")


def verdict(mean: float, stderr: float, claim: str = "positive", critical: float = 2.0) -> str:
    r"""The verdict on a claim about :math:`d` from its estimate and standard error, through
    the interval :math:`\bar d \pm c\,s` (see the module doc).

    :param float mean: the estimate :math:`\bar d`.
    :param float stderr: its standard error :math:`s \ge 0`.
    :param str claim: ``"positive"`` (:math:`d > 0`) or ``"zero"`` (:math:`d = 0`).
    :param float critical: the critical value :math:`c > 0`.
    :returns: ``"consistent"``, ``"not consistent"`` or ``"not distinguishable"``.
    :raises ValueError: for an unknown claim, a negative ``stderr`` or a non-positive
        ``critical``.
    """
    if claim not in _CLAIMS:
        raise ValueError(f"claim={claim!r} is not one of {list(_CLAIMS)}")
    if not critical > 0:
        raise ValueError(f"critical={critical!r} must be > 0, e.g. 2.0")
    mean, stderr = float(mean), float(stderr)
    if stderr < 0:
        raise ValueError(f"stderr={stderr!r} is negative; pass a standard error (>= 0)")
    if not (math.isfinite(mean) and math.isfinite(stderr)):
        return NOT_DISTINGUISHABLE
    low, high = mean - critical * stderr, mean + critical * stderr
    if claim == "zero":
        return CONSISTENT if low <= 0.0 <= high else NOT_CONSISTENT
    if low > 0.0:
        return CONSISTENT
    return NOT_CONSISTENT if high < 0.0 else NOT_DISTINGUISHABLE


def combine(verdicts: Iterable[str]) -> str:
    """One verdict for a claim made of parts: *not consistent* if any part is, *consistent*
    if every part is, else *not distinguishable*.

    :param verdicts: the parts' verdicts (at least one).
    """
    verdicts = list(verdicts)
    if not verdicts:
        raise ValueError("combine: no verdicts given; pass at least one")
    if NOT_CONSISTENT in verdicts:
        return NOT_CONSISTENT
    return CONSISTENT if all(v == CONSISTENT for v in verdicts) else NOT_DISTINGUISHABLE


@dataclass(frozen=True)
class SeedSpread:
    r"""A quantity measured once per seed: mean :math:`\bar d`, standard deviation over the
    seeds and the standard error of the mean :math:`\mathrm{sd}/\sqrt n`.

    :ivar tuple values: one value per seed.
    """

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> SeedSpread:
        """From the per-seed values (at least one)."""
        values = tuple(float(v) for v in values)
        if not values:
            raise ValueError("SeedSpread.of: no values given; pass one value per seed")
        return cls(values)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def sd(self) -> float:
        """The sample standard deviation (:math:`n - 1` in the denominator; NaN for one)."""
        if self.n < 2:
            return math.nan
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (self.n - 1))

    @property
    def stderr(self) -> float:
        return self.sd / math.sqrt(self.n)

    def verdict(self, claim: str = "positive", level: float = 0.95) -> str:
        r""":func:`verdict` with the Student-t critical value :math:`t_{(1+\ell)/2,\,n-1}`
        (*not distinguishable* from a single seed).

        :param str claim: ``"positive"`` or ``"zero"``.
        :param float level: the interval's coverage :math:`\ell`.
        """
        if self.n < 2:
            return NOT_DISTINGUISHABLE
        return verdict(self.mean, self.stderr, claim, t_quantile(level, self.n - 1))

    def text(self, digits: int = 3) -> str:
        """``"mean ± sd (n seeds)"``."""
        return f"{self.mean:+.{digits}f} ± {self.sd:.{digits}f} (sd over {self.n} seeds)"

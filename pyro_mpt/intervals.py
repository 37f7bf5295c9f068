r"""Calibrated intervals: Student-t quantiles, Welch-Satterthwaite degrees of freedom and
the ``ci(level)`` that every estimate (:class:`~pyro_mpt.MPTEstimate`,
:class:`~pyro_mpt.MPTCurve`, :class:`~pyro_mpt.LMLEstimate`) shares.

A standard error estimated from :math:`K` independent draws rests on :math:`K - 1` degrees
of freedom, so :math:`(\hat L - L) / \mathrm{se}` is Student-t, not normal: at :math:`K=2`
a 1.96-s.e. interval covers about 70% (the theory page, "Honest standard errors").
"""

from __future__ import annotations

import math

import torch

__all__ = ["satterthwaite_dof", "t_interval", "t_quantile", "verdict"]


def t_quantile(level: float, dof: float) -> float:
    r"""The two-sided Student-t critical value :math:`t_{(1+\ell)/2,\,\nu}` (normal for
    :math:`\nu = \infty`; NaN for :math:`\nu` NaN or below 1e-9).

    :param float level: the interval's coverage :math:`\ell \in (0, 1)`.
    :param float dof: the degrees of freedom :math:`\nu`.
    """
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}: e.g. level=0.95")
    dof = float(dof)
    if math.isnan(dof) or dof <= 1e-9:
        return math.nan
    from scipy.stats import norm, t  # scipy comes with arviz and scikit-learn

    q = 0.5 * (1.0 + level)
    return float(norm.ppf(q) if math.isinf(dof) else t.ppf(q, dof))


def t_interval(value, stderr: float, dof: float, level: float = 0.95) -> tuple[float, float]:
    r"""The interval :math:`\hat L \pm t_{(1+\ell)/2,\nu}\,\mathrm{se}`; with a zero
    standard error (an exact number) the point itself, with a NaN one ``(nan, nan)``.

    :param value: the estimate :math:`\hat L` (a float or a scalar tensor).
    :param float stderr: its standard error.
    :param float dof: its degrees of freedom :math:`\nu`.
    :param float level: the coverage :math:`\ell`.
    :returns: ``(low, high)`` floats.
    """
    value, stderr = float(value), float(stderr)
    if stderr == 0.0:
        t_quantile(level, math.inf)  # still checks level
        return value, value
    half = t_quantile(level, dof) * stderr
    return value - half, value + half


def satterthwaite_dof(variances, dofs) -> float:
    r"""The Welch-Satterthwaite degrees of freedom of a sum of independent variance
    estimates :math:`v_i` with :math:`\nu_i` degrees of freedom each,

    .. math:: \nu = \frac{(\sum_i v_i)^2}{\sum_i v_i^2 / \nu_i},

    :math:`\infty` when every term with :math:`v_i > 0` has :math:`\nu_i = \infty`, NaN when
    every :math:`v_i` is 0 or any is NaN.

    :param variances: the :math:`v_i` (tensor or sequence of floats).
    :param dofs: the :math:`\nu_i` (same shape, or one number for all).
    """
    v = torch.as_tensor(variances, dtype=torch.float64).flatten()
    nu = torch.as_tensor(dofs, dtype=torch.float64, device=v.device).expand(v.shape)
    total = float(v.sum())
    if math.isnan(total) or total <= 0.0:
        return math.nan
    positive = v > 0
    denominator = float((v[positive] ** 2 / nu[positive]).sum())
    return math.inf if denominator == 0.0 else total**2 / denominator


def verdict(difference: float, stderr: float, dof: float, level: float = 0.95) -> str:
    r"""``"ok"`` when :math:`|d| \le t_{(1+\ell)/2,\nu}\,\mathrm{se}` (the difference is
    within its interval), ``"check"`` when not, ``"n/a"`` without a usable standard error.

    :param float difference: estimate minus reference.
    :param float stderr: the difference's standard error.
    :param float dof: its degrees of freedom.
    :param float level: the interval's coverage.
    """
    q = t_quantile(level, dof)
    if math.isnan(q) or not stderr > 0 or math.isnan(difference):
        return "n/a"
    return "ok" if abs(difference) <= q * stderr else "check"

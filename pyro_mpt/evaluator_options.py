"""The options of :func:`~pyro_mpt.evaluate` and :func:`~pyro_mpt.compare`, all checked
before any work: a bad value raises ``ValueError`` naming the argument and the value, a value
of the wrong kind or an unknown option key ``TypeError``, and the model is not called.

The reference's own values in ``reference_options`` (chunk sizes, budgets, ...) are checked
by :func:`~pyro_mpt.log_marginal_likelihood`, which also does so before it calls the model;
the masked estimators' options are checked by constructing their
:class:`~pyro_mpt.MaskedELBO` s (which :func:`~pyro_mpt.mpt_curve` shares).

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .conditionals import Conditionals
from .curve import mpt_curve
from .estimators import MaskEstimator, get_estimator
from .masked_elbo import MaskedELBO
from .options import check_bool, check_choice, check_positive_int, check_probability
from .reference import METHODS, log_marginal_likelihood

__all__ = [
    "RunOptions",
    "check_model",
    "check_models_and_guides",
    "check_rates",
    "check_run_options",
    "estimator_list",
]

# Keywords that evaluate/compare set themselves, so reference_options / mpt_options may not.
_REFERENCE_SET = {"model", "method", "num_particles", "num_samples", "guide", "token_plate"}
_REFERENCE_SET |= {"progress"}
_MPT_SET = {"self", "model", "estimator", "mask_rate", "num_masks", "num_particles"}
_MPT_SET |= {"num_samples", "conditionals", "token_plate", "share_masks", "exhaustive"}


@dataclass(frozen=True)
class RunOptions:
    """The checked options shared by the reference and the masked parts."""

    reference: str
    reference_samples: int
    mpt_samples: int
    conditionals: str | Conditionals
    token_plate: str | None
    share_masks: bool
    progress: bool | None
    reference_options: dict[str, Any]
    mpt_options: dict[str, Any]

    def masked_elbo(self, estimator: str | MaskEstimator, num_masks: int) -> MaskedELBO:
        """The :class:`~pyro_mpt.MaskedELBO` of one estimator; constructing it checks every
        MPT option."""
        return MaskedELBO(
            estimator=estimator,
            num_masks=num_masks,
            num_samples=self.mpt_samples,
            conditionals=self.conditionals,
            token_plate=self.token_plate,
            share_masks=self.share_masks,
            **self.mpt_options,
        )

    def settings(self) -> dict[str, Any]:
        """The options as the report's ``settings`` show them."""
        names = ("reference", "reference_samples", "conditionals", "mpt_samples")
        names += ("token_plate", "share_masks")
        return {name: getattr(self, name) for name in names}

    def reference_kwargs(self, guide: Callable[..., Any] | None) -> dict[str, Any]:
        """The keyword arguments of :func:`~pyro_mpt.log_marginal_likelihood`."""
        return dict(
            method=self.reference,
            num_samples=self.reference_samples,
            guide=guide,
            token_plate=self.token_plate,
            progress=self.progress,
            **self.reference_options,
        )

    def curve_kwargs(self, curve_masks: int) -> dict[str, Any]:
        """The keyword arguments of :func:`~pyro_mpt.mpt_curve`."""
        return dict(
            num_masks=curve_masks,
            conditionals=self.conditionals,
            num_samples=self.mpt_samples,
            token_plate=self.token_plate,
            share_masks=self.share_masks,
            **self.mpt_options,
        )


def check_model(name: str, model: Callable[..., Any]) -> None:
    """:raises TypeError: when ``model`` is not callable."""
    if not callable(model):
        raise TypeError(f"{name} must be a callable Pyro model, got {model!r}")


def check_models_and_guides(
    models: dict[str, Callable[..., Any]], guides: Mapping[str, Callable[..., Any]] | None
) -> dict[str, Callable[..., Any]]:
    """The models of :func:`~pyro_mpt.compare` checked; returns ``guides`` as a dict."""
    if not isinstance(models, dict):
        raise TypeError(f"models must be a dict of name -> Pyro model, got {type(models).__name__}")
    if not models:
        raise ValueError("compare needs at least one model in the dict, got an empty dict")
    for name, m in models.items():
        check_model(f"models[{name!r}]", m)
    guides = dict(guides or {})
    unknown = set(guides) - set(models)
    if unknown:
        raise ValueError(f"guides for models not in `models`: {sorted(unknown)}")
    return guides


def estimator_list(
    estimators: str | Iterable[str | MaskEstimator],
) -> dict[str, MaskEstimator]:
    """name -> :class:`~pyro_mpt.estimators.MaskEstimator`, in order; ``"fixed"`` is named
    ``"fixed(<rate>)"``. Unknown names and repeats raise ``ValueError``."""
    if isinstance(estimators, str):
        estimators = (estimators,)
    try:
        estimators = list(estimators)
    except TypeError:
        raise TypeError(
            f"estimators must be a sequence of estimator names, got {estimators!r}"
        ) from None
    out = {}
    for e in estimators:
        est = get_estimator(e)  # unknown names raise ValueError listing the valid ones
        name = est.name
        if name == "fixed":
            name = f"fixed({est.mask_rate:g})"
        if name in out:
            raise ValueError(f"estimator {name!r} is listed twice in estimators={estimators!r}")
        out[name] = est
    return out


def check_rates(fixed_rates: Iterable[float]) -> list[float]:
    """The fixed mask rates as floats in :math:`(0, 1]`."""
    try:
        rates = list(fixed_rates)
    except TypeError:
        raise TypeError(
            f"fixed_rates must be a sequence of mask rates, got {fixed_rates!r}"
        ) from None
    out = []
    for i, r in enumerate(rates):
        try:
            out.append(check_probability("mask_rate", r))
        except ValueError as error:
            raise ValueError(f"fixed_rates[{i}]: {error}") from None
    return out


def check_run_options(
    *,
    reference: str,
    reference_samples: int,
    mpt_samples: int,
    conditionals: str | Conditionals,
    token_plate: str | None,
    share_masks: bool,
    progress: bool | None,
    guides: dict[str, Callable[..., Any] | None],
    reference_options: dict[str, Any] | None,
    mpt_options: dict[str, Any] | None,
) -> RunOptions:
    """The options shared by evaluate and compare, checked; ``guides`` maps each guide's
    argument name (for the error) to the guide."""
    check_choice("reference", reference, ("auto", *METHODS))
    check_positive_int("reference_samples", reference_samples)
    check_positive_int("mpt_samples", mpt_samples)
    if token_plate is not None and not isinstance(token_plate, str):
        raise TypeError(f"token_plate must be a plate name (str) or None, got {token_plate!r}")
    check_bool("share_masks", share_masks)
    check_bool("progress", progress, allow_none=True)
    for name, guide in guides.items():
        if guide is not None and not callable(guide):
            raise TypeError(f"{name} must be a callable Pyro guide or None, got {guide!r}")
    valid_ref = _keywords(log_marginal_likelihood) - _REFERENCE_SET
    valid_mpt = (_keywords(MaskedELBO.__init__) & _keywords(mpt_curve)) - _MPT_SET
    return RunOptions(
        reference=reference,
        reference_samples=int(reference_samples),
        mpt_samples=int(mpt_samples),
        conditionals=conditionals,
        token_plate=token_plate,
        share_masks=share_masks,
        progress=progress,
        reference_options=_check_keys("reference_options", reference_options, valid_ref),
        mpt_options=_check_keys("mpt_options", mpt_options, valid_mpt),
    )


def _keywords(fn: Callable[..., Any]) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds}


def _check_keys(name: str, options: dict[str, Any] | None, valid: set[str]) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"{name} must be a dict of keyword arguments, got {options!r}")
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"{name} has unknown keys {unknown}; valid keys are {sorted(valid)}")
    return dict(options)

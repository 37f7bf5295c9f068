r"""Conditional backends: each answers, batched over masks, what
:math:`\log p(x_j \mid x_O)` is for the scored tokens :math:`j`.

Backends are looked up by name in :data:`CONDITIONALS`; ``"auto"`` chooses by the model's
latents (:func:`choose_conditionals`). Each backend is built from the options of
:func:`get_conditionals` it names in its ``options`` table.

Modules, low to high: :mod:`~pyro_mpt.conditionals.base` (the interface),
:mod:`~pyro_mpt.conditionals.kernels` (per-site token kernels),
:mod:`~pyro_mpt.conditionals.grid` (the midpoint grid),
:mod:`~pyro_mpt.conditionals.particles` (weighted particles and their scorer),
:mod:`~pyro_mpt.conditionals.hmm_sites` (``DiscreteHMM`` / ``GaussianHMM`` sites),
:mod:`~pyro_mpt.conditionals.sites` (observed sites to kernels),
:mod:`~pyro_mpt.conditionals.evidence` and :mod:`~pyro_mpt.conditionals.elimination`
(variable elimination), :mod:`~pyro_mpt.conditionals.affine` (linear-Gaussian models
compiled to a Gaussian over the tokens), then one module per backend
(:mod:`~pyro_mpt.conditionals.mixed`: continuous latents by draws, enumerated ones summed out
for each).

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..options import check_choice, check_positive_int, renamed_keyword, resolve_max_elements
from ..progress import logger
from .base import Conditionals, Scorer
from .conjugate import ConjugateConditionals, detect_conjugate
from .enumerate import EnumerateConditionals
from .gaussian import GaussianConditionals
from .importance import ImportanceConditionals
from .linear_gaussian import LinearGaussianConditionals, detect_linear_gaussian
from .mixed import MixedConditionals, has_mixed_latents
from .particles import ParticleScorer
from .proposal import Proposal
from .quadrature import QuadratureConditionals, check_bounds
from .smc import SMCConditionals

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = [
    "CONDITIONALS",
    "Conditionals",
    "ConjugateConditionals",
    "EnumerateConditionals",
    "GaussianConditionals",
    "ImportanceConditionals",
    "LinearGaussianConditionals",
    "MixedConditionals",
    "ParticleScorer",
    "Proposal",
    "QuadratureConditionals",
    "SMCConditionals",
    "Scorer",
    "choose_conditionals",
    "get_conditionals",
]

#: The conditional backends by name.
CONDITIONALS: dict[str, type[Conditionals]] = {
    cls.name: cls
    for cls in (
        GaussianConditionals,
        EnumerateConditionals,
        ImportanceConditionals,
        QuadratureConditionals,
        LinearGaussianConditionals,
        MixedConditionals,
        SMCConditionals,
        ConjugateConditionals,
    )
}


def choose_conditionals(
    layout: TokenLayout,
    num_samples: int = 256,
    max_elements: int | None = None,
    *,
    num_particles: int | None = None,
    model_call: tuple | None = None,
) -> Conditionals:
    """The ``"auto"`` rule: no latents -> ``"gaussian"`` (exact); only enumerated latents ->
    ``"enumerate"`` (exact); enumerated and continuous latents -> ``"mixed"`` (continuous
    ones by ``num_samples`` prior draws, enumerated ones summed out for each); one conjugate
    latent and its tokens (:mod:`~pyro_mpt.conditionals.conjugate`) -> ``"conjugate"``
    (exact); a linear-Gaussian model (found from ``model_call``, see
    :mod:`~pyro_mpt.conditionals.affine`) -> ``"linear_gaussian"`` (exact); otherwise
    ``"importance"`` with ``num_samples`` prior draws. The reason is logged.

    :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout`.
    :param int num_samples: prior draws of ``"importance"``.
    :param int max_elements: memory budget of ``"enumerate"``; ``None``: the default of the
        layout's device (:func:`~pyro_mpt.options.resolve_max_elements`).
    :param int num_particles: deprecated name of ``num_samples``.
    :param tuple model_call: ``(model, args, kwargs, trace)``, to test whether the model is
        linear-Gaussian; without it that route is not considered.
    :returns: a :class:`Conditionals` instance.

    Example::

        choose_conditionals(layout)                # GaussianConditionals() for ppca_collapsed
    """
    num_samples = renamed_keyword(
        "choose_conditionals", "num_particles", "num_samples", num_particles, num_samples, 256
    )
    num_samples = check_positive_int("num_samples", num_samples)
    if not layout.latents:
        backend = GaussianConditionals()
    elif all(n in layout.enumerated for n in layout.latents):
        backend = EnumerateConditionals(resolve_max_elements(max_elements, layout.device))
    elif has_mixed_latents(layout):
        backend = MixedConditionals(num_samples, resolve_max_elements(max_elements, layout.device))
    else:
        backend = _conjugate_or_none(layout, model_call)
        backend = backend or _linear_gaussian_or_none(layout, max_elements, model_call)
        backend = backend or ImportanceConditionals(num_samples, max_elements=max_elements)
    logger.info("conditionals='auto' chose %r for latents %s", backend.name, layout.latents)
    return backend


def _conjugate_or_none(layout, model_call):
    """``"conjugate"`` (with the kernel it compiled) if the model is one conjugate latent
    and its tokens, else ``None``; the reason is logged either way."""
    if model_call is None:
        return None
    model, args, kwargs, trace = model_call
    kernel, why = detect_conjugate(model, args, kwargs, layout, trace)
    logger.info("conditionals='auto': %s", why)
    if kernel is None:
        return None
    return ConjugateConditionals(compiled=(trace, kernel))


def _linear_gaussian_or_none(layout, max_elements, model_call):
    """``"linear_gaussian"`` (with the model it compiled) if the model is linear-Gaussian,
    else ``None``; the reason is logged either way."""
    if model_call is None:
        return None
    model, args, kwargs, trace = model_call
    budget = resolve_max_elements(max_elements, layout.device)
    compiled, why = detect_linear_gaussian(model, args, kwargs, layout, trace, budget)
    logger.info("conditionals='auto': %s", why)
    if compiled is None:
        return None
    return LinearGaussianConditionals(max_elements, compiled=(trace, compiled))


def get_conditionals(
    conditionals: str | Conditionals,
    layout: TokenLayout,
    num_samples: int = 256,
    quadrature_points: int = 20,
    quadrature_bounds: tuple[float, float] = (-5.0, 5.0),
    max_elements: int | None = None,
    *,
    num_particles: int | None = None,
    model_call: tuple | None = None,
) -> Conditionals:
    """Looks a backend up by name (or passes a :class:`Conditionals` instance through).
    Every option is checked first, whichever backend uses it.

    :param conditionals: ``"auto"``, a name in :data:`CONDITIONALS`, or an instance.
    :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout` (used by ``"auto"``
        and for the device of the default ``max_elements``).
    :param int num_samples: prior draws of ``"importance"``.
    :param int quadrature_points: grid points per latent dimension of ``"quadrature"``.
    :param tuple quadrature_bounds: ``(low, high)`` of every grid axis, on the unconstrained
        scale of each latent's support (:mod:`~pyro_mpt.conditionals.grid`).
    :param int max_elements: memory budget of ``"enumerate"``; ``None``: the default of the
        layout's device (:func:`~pyro_mpt.options.resolve_max_elements`).
    :param int num_particles: deprecated name of ``num_samples``.
    :param tuple model_call: ``(model, args, kwargs, trace)`` for ``"auto"``
        (:func:`choose_conditionals`).
    :returns: a :class:`Conditionals` instance.
    :raises ValueError: for an unknown name (listing the valid ones) or a bad option.

    Example::

        get_conditionals("quadrature", layout, quadrature_points=30)
    """
    num_samples = renamed_keyword(
        "get_conditionals", "num_particles", "num_samples", num_particles, num_samples, 256
    )
    if not isinstance(conditionals, Conditionals):
        check_choice("conditionals", conditionals, ["auto", *sorted(CONDITIONALS)])
    options = {
        "num_samples": check_positive_int("num_samples", num_samples),
        "quadrature_points": check_positive_int("quadrature_points", quadrature_points),
        "quadrature_bounds": check_bounds("quadrature_bounds", quadrature_bounds),
        "max_elements": check_positive_int("max_elements", max_elements, allow_none=True),
    }
    if layout is not None:
        options["max_elements"] = resolve_max_elements(max_elements, layout.device)
    if isinstance(conditionals, Conditionals):
        return conditionals
    if conditionals == "auto":
        return choose_conditionals(
            layout, options["num_samples"], options["max_elements"], model_call=model_call
        )
    backend = CONDITIONALS[conditionals].from_options(**options)
    logger.debug("conditionals %r built as %r", conditionals, backend)
    return backend

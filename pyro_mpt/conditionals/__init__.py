"""Conditional backends: each answers, batched over masks, what
:math:`\\log p(x_j \\mid x_O)` is for the scored tokens :math:`j`.

Backends are looked up by name in :data:`CONDITIONALS`; ``"auto"`` chooses by the model's
latents (:func:`choose_conditionals`).
"""

from .base import DEFAULT_MAX_ELEMENTS, Conditionals, ParticleScorer, Scorer
from .enumerate import EnumerateConditionals
from .gaussian import GaussianConditionals
from .importance import ImportanceConditionals
from .quadrature import QuadratureConditionals

__all__ = [
    "CONDITIONALS",
    "Conditionals",
    "EnumerateConditionals",
    "GaussianConditionals",
    "ImportanceConditionals",
    "ParticleScorer",
    "QuadratureConditionals",
    "Scorer",
    "choose_conditionals",
    "get_conditionals",
]

#: The conditional backends by name.
CONDITIONALS = {
    cls.name: cls
    for cls in (
        GaussianConditionals,
        EnumerateConditionals,
        ImportanceConditionals,
        QuadratureConditionals,
    )
}


def choose_conditionals(layout, num_particles=256, max_elements=DEFAULT_MAX_ELEMENTS):
    """The ``"auto"`` rule: no latents -> ``"gaussian"`` (exact); only enumerated latents ->
    ``"enumerate"`` (exact); otherwise ``"importance"`` with ``num_particles`` prior draws.

    :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout`.
    :param int num_particles: prior draws of ``"importance"``.
    :param int max_elements: memory budget of ``"enumerate"``.
    :returns: a :class:`Conditionals` instance.

    Example::

        choose_conditionals(layout)                # GaussianConditionals() for ppca_collapsed

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    if not layout.latents:
        return GaussianConditionals()
    if all(n in layout.enumerated for n in layout.latents):
        return EnumerateConditionals(max_elements)
    return ImportanceConditionals(num_particles)


def get_conditionals(
    conditionals,
    layout,
    num_particles=256,
    quadrature_points=20,
    quadrature_bounds=(-5.0, 5.0),
    max_elements=DEFAULT_MAX_ELEMENTS,
):
    """Looks a backend up by name (or passes a :class:`Conditionals` instance through).

    :param conditionals: ``"auto"``, a name in :data:`CONDITIONALS`, or an instance.
    :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout` (used by ``"auto"``).
    :returns: a :class:`Conditionals` instance.
    :raises ValueError: for an unknown name.

    Example::

        get_conditionals("quadrature", layout, quadrature_points=30)

    Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
    Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
    """
    if isinstance(conditionals, Conditionals):
        return conditionals
    if conditionals == "auto":
        return choose_conditionals(layout, num_particles, max_elements)
    if conditionals == "importance":
        return ImportanceConditionals(num_particles)
    if conditionals == "enumerate":
        return EnumerateConditionals(max_elements)
    if conditionals == "quadrature":
        return QuadratureConditionals(quadrature_points, quadrature_bounds)
    if isinstance(conditionals, str) and conditionals in CONDITIONALS:
        return CONDITIONALS[conditionals]()
    raise ValueError(
        f"unknown conditionals {conditionals!r}; valid names are {['auto'] + sorted(CONDITIONALS)}"
    )

"""What every reference method receives: the traced model (:class:`Problem`) and the
checked options (:class:`ReferenceOptions`, from :func:`check_options`, which validates
every option before the model is run)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..options import check_bool, check_positive_int
from ..tokens.checks import check_bounds, check_plate_options
from .compile import check_compile

__all__ = ["Problem", "ReferenceOptions", "check_options"]


@dataclass
class Problem:
    """A model, its arguments, one trace of it and the token layout read off that trace
    (:func:`pyro_mpt.tokens.read_layout`)."""

    model: object
    args: tuple
    kwargs: dict
    trace: object
    layout: object

    @property
    def continuous(self) -> list:
        """The latent sites that are not enumerated."""
        return [n for n in self.layout.latents if n not in self.layout.enumerated]


@dataclass(frozen=True)
class ReferenceOptions:
    """The options of :func:`pyro_mpt.reference.log_marginal_likelihood`, checked."""

    num_samples: int = 4096
    guide: object = None
    chunk_size: int | None = None
    quadrature_points: int = 20
    quadrature_bounds: tuple = (-5.0, 5.0)
    max_elements: int | None = None
    progress: bool | None = None
    compile: object = None
    token_plate: str | None = None
    max_plate_nesting: float = math.inf


def check_options(
    *,
    token_plate,
    max_plate_nesting,
    num_samples,
    guide,
    chunk_size,
    quadrature_points,
    quadrature_bounds,
    max_elements,
    progress,
    compile,
) -> ReferenceOptions:
    """Every option checked (``ValueError`` for a bad value, ``TypeError`` for a wrong
    kind, each naming the option and the value)."""
    if guide is not None and not callable(guide):
        raise TypeError(f"guide must be a callable Pyro guide or None, got {guide!r}")
    check_plate_options(token_plate, max_plate_nesting)
    return ReferenceOptions(
        num_samples=check_positive_int("num_samples", num_samples),
        guide=guide,
        chunk_size=check_positive_int("chunk_size", chunk_size, allow_none=True),
        quadrature_points=check_positive_int("quadrature_points", quadrature_points),
        quadrature_bounds=check_bounds(quadrature_bounds),
        max_elements=check_positive_int("max_elements", max_elements, allow_none=True),
        progress=check_bool("progress", progress, allow_none=True),
        compile=check_compile(compile),
        token_plate=token_plate,
        max_plate_nesting=max_plate_nesting,
    )

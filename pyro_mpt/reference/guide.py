"""Checks that a guide can be the importance proposal of a model: it samples exactly the
model's continuous latent sites, inside the sequence plates, with a density. The checks
live with the particle proposals (:mod:`pyro_mpt.conditionals.proposal`), which the
conditionals share."""

from __future__ import annotations

from ..conditionals.proposal import check_guide, guide_sites

__all__ = ["check_guide", "guide_sites"]

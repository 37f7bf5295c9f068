"""Checks that a guide can be the importance proposal of a model: it samples exactly the
model's continuous latent sites, inside the sequence plates, with a density."""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample

__all__ = ["check_guide", "guide_sites"]


def guide_sites(trace) -> dict:
    """The sampled (not observed, not subsample) sites of a guide's trace, by name."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def _is_point_mass(fn) -> bool:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, pyro.distributions.Delta)


def _check_sites(proposed, layout, continuous):
    missing = [n for n in continuous if n not in proposed]
    extra = sorted(proposed - set(continuous))
    if not (missing or extra):
        return
    parts = []
    if missing:
        parts.append(f"it does not sample the model's latent site(s) {missing}")
    if extra:
        enumerated = [n for n in extra if n in layout.enumerated]
        note = (
            f" ({enumerated} are enumerated in the model and summed out exactly: the guide "
            "must not sample them)"
            if enumerated
            else ""
        )
        parts.append(f"it samples site(s) {extra} that are not latent in the model{note}")
    raise ValueError(
        "the guide does not match the model: "
        + "; ".join(parts)
        + f". The model's continuous latent sites are {continuous}; the guide must sample "
        "exactly those (e.g. pyro.infer.autoguide.AutoNormal(model))"
    )


def _check_site_plates(sites, layout):
    seq_plates = {
        f.name
        for s in layout.sites
        for f in s.frames
        if f.name != layout.token_plate and f.size > 1
    }
    auxiliary = any(s["infer"].get("is_auxiliary") for s in sites.values())
    for name, site in sites.items():
        frames = {f.name for f in site["cond_indep_stack"] if f.vectorized}
        outside = sorted(seq_plates - frames)
        if outside:
            raise ValueError(
                f"guide site {name!r} is not inside the sequence plate(s) {outside}: one "
                "proposal shared by all sequences does not factorise over them, so "
                "per-sequence importance sampling cannot use it (AutoMultivariateNormal, "
                "AutoDiagonalNormal and other AutoContinuous guides sample one global vector); "
                "use a guide with the model's plates, e.g. AutoNormal"
            )
        # A Delta is a proposal only as the image of an auxiliary draw (AutoNormal's
        # Delta(value, log_density) after its "_unconstrained" site), not on its own.
        if not auxiliary and _is_point_mass(site["fn"]):
            raise ValueError(
                f"guide site {name!r} is a point mass ({type(site['fn']).__name__}): it has no "
                "density to weigh draws by, so it cannot be an importance proposal (AutoDelta "
                "fits a MAP point); use e.g. AutoNormal"
            )


def check_guide(guide, args, kwargs, layout, continuous) -> None:
    """Traces the guide once (this also sets up an AutoGuide's prototype outside the
    particle plate) and checks that it proposes the model's continuous latents, one
    proposal per sequence.

    :raises ValueError: naming the sites or plates that do not match."""
    trace = poutine.trace(guide).get_trace(*args, **kwargs)
    sites = guide_sites(trace)
    proposed = {n for n, s in sites.items() if not s["infer"].get("is_auxiliary")}
    _check_sites(proposed, layout, continuous)
    _check_site_plates(sites, layout)

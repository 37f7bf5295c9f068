r"""A small particle run before the real one: models that are not vectorised over particles.

pyro_mpt draws :math:`S` particles at once in a plate left of the model's plates (dim
:math:`-P-1`), as Pyro's ``vectorize_particles=True`` does: a global latent of event shape
``(D,)`` then has shape ``(S, 1, ..., 1, D)``. A model must broadcast over those leading
dims. Two ways to get it wrong, both caught here with :math:`S_0` probe particles before
the :math:`S`-particle run:

- a statement that fails, such as ``x @ w`` (a matrix product contracts the wrong dims of a
  batched ``w``): the error names the latent sites that carried particles and how to write
  it (``(x * w).sum(-1)``);
- a statement that runs but adds dims, such as ``b.unsqueeze(-1)`` of a batched ``b``:
  a site's batch shape then holds the particle size twice, :math:`S^2` work that runs
  silently. Every site's batch dim must be 1 or the size of the plate (or enumerated
  support) that owns that dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..compat import enumerate_dim
from .particles import particle_trace

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["check_particle_shapes", "probe_particles"]

#: How the particle rule reads, in every message.
RULE = (
    "pyro_mpt runs S particles at once in a plate at dim {dim} (left of the model's plates, "
    "as Pyro's vectorize_particles=True does), so a latent of event shape (D,) has shape "
    "(S, 1, ..., D); write the model so that it broadcasts over leading dims: index and sum "
    "from the right, e.g. (x * w).sum(-1) instead of x @ w, w[..., 0] instead of w[0], and "
    "no reshape/unsqueeze of a latent's leading dims"
)


class _SiteLog(Messenger):
    """Records the sample sites a run has completed, with their shapes."""

    def __init__(self):
        super().__init__()
        self.sites = []

    def _postprocess_message(self, msg):
        if msg["type"] == "sample" and not site_is_subsample(msg):
            self.sites.append(msg)


def _probe_size(trace) -> int:
    """A particle count that no plate or support of ``trace`` has (so it cannot pass for
    one)."""
    sizes = {
        int(d)
        for s in trace.nodes.values()
        if s["type"] == "sample"
        for d in tuple(getattr(s["fn"], "batch_shape", ()))
        + tuple(getattr(s["value"], "shape", ()))
    }
    size = 3
    while size in sizes:
        size += 1
    return size


def _allowed_sizes(trace, P: int) -> dict:
    """``{dim: sizes}`` each batch dim may take: 1, its plates' sizes, enumerated supports."""
    allowed = {}
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        for f in site["cond_indep_stack"]:
            if f.vectorized:
                allowed.setdefault(f.dim, {1}).add(f.size)
        enum_dim = enumerate_dim(site)
        if enum_dim is not None:
            allowed.setdefault(enum_dim, {1}).add(int(site["value"].shape[enum_dim]))
    return allowed


def check_particle_shapes(trace, P: int, num_particles: int, plain=None) -> None:
    """Every site of a particle trace has batch dims of size 1, of its plate, of an
    enumerated support, or of the same dim in the ``plain`` trace (without particles).

    :raises ValueError: naming the site, its batch shape and the rule.
    """
    allowed = _allowed_sizes(trace, P)
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        batch = tuple(site["fn"].batch_shape)
        own = ()
        if plain is not None and site["name"] in plain.nodes:
            own = tuple(getattr(plain.nodes[site["name"]]["fn"], "batch_shape", ()))
        for i, size in enumerate(batch):
            dim = i - len(batch)
            if -dim <= len(own) and own[dim] == size:
                continue
            if size != 1 and size not in allowed.get(dim, {1}):
                raise ValueError(
                    f"site {site['name']!r} has batch shape {batch} when the model runs with "
                    f"{num_particles} particles: its dim {dim} of size {size} belongs to no "
                    "plate, so the particles are broadcast twice (S^2 work, or S x the "
                    "memory). " + RULE.format(dim=-P - 1)
                )


def probe_particles(model, args: tuple, kwargs: dict, layout: TokenLayout, trace) -> None:
    """Runs the model once with a few particles (the prior, enumerated sites enumerated)
    and checks the shapes, so that a model not vectorised over particles fails with a
    clear message before the full particle run. The random state is restored afterwards
    (seeded streams are unchanged).

    :param trace: a plain trace of the model (its plate sizes choose the probe's size).
    :raises ValueError: naming the latent sites, the failing statement's error and the
        particle broadcasting rule (``RULE``).
    """
    P = layout.max_plate_nesting
    S0 = _probe_size(trace)
    log = _SiteLog()
    device = layout.device
    devices = [device] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            with log:
                probe = particle_trace(model, args, kwargs, layout, num_particles=S0)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            latents = [s["name"] for s in log.sites if not s["is_observed"]]
            first = str(e).splitlines()[0]
            raise ValueError(
                f"the model runs without particles but fails with {S0} particles after the "
                f"latent site(s) {latents or '(none)'} ({type(e).__name__}: {first}). "
                + RULE.format(dim=-P - 1)
            ) from e
    check_particle_shapes(probe, P, S0, trace)

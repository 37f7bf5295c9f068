r"""A guide as the proposal of particle methods (issue 13): the importance conditionals, the
SMC conditionals and the SMC reference may draw their particles from a guide :math:`q`
(e.g. an :class:`~pyro.infer.autoguide.AutoNormal` trained by ``Trace_ELBO``) instead of
the prior, each particle weighted by :math:`p(z)/\tilde q(z)`.

**Defensive mixture.** A guide fitted to the *whole* sequence is far narrower than
:math:`p(z \mid x_O)` for a small observed part :math:`O`; with :math:`q` alone the weights
:math:`p(z)\,p(x_O \mid z)/q(z)` then have infinite variance (for Gaussians as soon as
:math:`q`'s variance is under half the target's), and in practice the masked tokens leak
into :math:`p(x_j \mid x_O)` through the proposal (the estimate is biased *up*). So a
fraction :math:`\alpha` (``prior_fraction``) of the particles is drawn from the prior and
every particle is weighted against the mixture (Hesterberg's defensive importance
sampling, with deterministic allocation):

.. math:: \tilde q(z) = \alpha\, p(z) + (1 - \alpha)\, q(z), \qquad
    w_s = \frac{p(z_s)}{\tilde q(z_s)} \le \frac1\alpha, \qquad
    \frac{p(z)\,p(x_O \mid z)}{\tilde q(z)} \le \frac{p(x_O \mid z)}{\alpha},

so no estimate is worse than prior importance sampling with :math:`\alpha S` particles,
while the rows that observe most tokens are as good as the guide makes them.

**Gradients.** The draws and :math:`\log \tilde q` are computed without gradients, so the
guide's parameters get none from ``MaskedELBO``; the model's parameters get theirs through
:math:`\log p(z_s)` and the likelihoods at the fixed draws, the gradient of an importance
estimate with a fixed proposal.

**What is supported.** The guide must sample exactly the model's continuous latent sites,
each inside the sequence plates (one proposal per sequence), with a density (not a point
mass); models with enumerated latents are refused. Evaluating :math:`q` at the prior's
draws replays the guide on them: a site it samples directly takes the value, and
``AutoNormal``'s auxiliary ``<name>_unconstrained`` site takes the value mapped to the
unconstrained space; any other auxiliary site needs ``prior_fraction=0``.

Reference: T. Hesterberg, "Weighted average importance sampling and defensive mixture
distributions", Technometrics 37(2), 1995.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from ..options import check_probability
from ..tokens import PARTICLE_PLATE
from ..tokens.subsample import replay_subsample
from .particles import flatten_particles, latent_log_prob
from .smc_moves import ParticleModel

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = [
    "DEFAULT_PRIOR_FRACTION",
    "Proposal",
    "ProposalParticleModel",
    "as_proposal",
    "check_guide",
    "guide_sites",
]

#: The share of the particles drawn from the prior (the defensive component). Measured on
#: latent PPCA (N=10, T=8, noise 0.5, 256 draws, the exact posterior as guide, 5 seeds): 0
#: left the chain estimate 25-34 nats high; 0.1, 0.25 and 0.5 within 0.35 nats and 3 s.e.,
#: with s.e. 0.45-0.63, 0.04-0.14 and 0.04-0.11.
DEFAULT_PRIOR_FRACTION = 0.25

UNCONSTRAINED = "_unconstrained"  # AutoNormal's auxiliary site of a constrained latent


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
        unobserved = [n for n in extra if n.endswith("_unobserved")]
        if unobserved:  # Pyro's obs_mask: the missing values of 'x' are a site 'x_unobserved'
            hide = [m for n in unobserved for m in (n, n + UNCONSTRAINED)]
            note += (
                f" ({unobserved} hold the values obs_mask leaves out, which are not scored: "
                f"pass proposal=poutine.block(guide, hide={hide}), exact for a guide whose "
                "draws of the latents do not depend on them, such as AutoNormal)"
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


def check_guide(guide, args, kwargs, layout, continuous):
    """Traces the guide once (this also sets up an AutoGuide's prototype outside the
    particle plate) and checks that it proposes the model's continuous latents, one
    proposal per sequence.

    :returns: the guide's trace.
    :raises ValueError: naming the sites or plates that do not match."""
    trace = poutine.trace(guide).get_trace(*args, **kwargs)
    sites = guide_sites(trace)
    proposed = {n for n, s in sites.items() if not s["infer"].get("is_auxiliary")}
    _check_sites(proposed, layout, continuous)
    _check_site_plates(sites, layout)
    return trace


def _check_shapes(guide_trace, model_trace, names) -> None:
    for name in names:
        got = tuple(guide_trace.nodes[name]["value"].shape)
        want = tuple(model_trace.nodes[name]["value"].shape)
        if got != want:
            raise ValueError(
                f"guide site {name!r} draws values of shape {got}, but the model's latent "
                f"site {name!r} has shape {want}: the proposal must draw one value of the "
                "model's shape per sequence (sample it inside the same plates, with the same "
                "event shape, e.g. pyro.infer.autoguide.AutoNormal(model))"
            )


def blocks(tensors: list, groups: int, size: int) -> torch.Tensor:
    """``size`` rows from ``tensors`` (each ``(groups * n_i, ...)``): each of the ``groups``
    blocks takes its share of every tensor in turn (an SMC sweep's guide draws, then its
    prior draws)."""
    parts = [t.reshape(groups, -1, *t.shape[1:]) for t in tensors]
    return torch.cat(parts, 1).reshape(size, *parts[0].shape[2:])


class Proposal:
    r"""A guide, with a defensive share of prior draws, as the proposal of particles (see
    the module docstring).

    :param guide: a Pyro guide taking the model's arguments and sampling exactly its
        continuous latent sites inside the sequence plates (e.g. ``AutoNormal(model)``).
    :param float prior_fraction: :math:`\alpha \in [0, 1)`, the share of particles drawn
        from the prior; 0 draws from the guide alone (unsafe for masked conditionals, see
        the module docstring).
    """

    def __init__(self, guide: Callable, prior_fraction: float = DEFAULT_PRIOR_FRACTION):
        if not callable(guide):
            raise TypeError(
                f"proposal must be a callable Pyro guide (e.g. AutoNormal(model)) or None, "
                f"got {guide!r}"
            )
        alpha = check_probability("prior_fraction", prior_fraction, low_open=False)
        if alpha >= 1:
            raise ValueError(
                f"prior_fraction must lie in [0, 1), got {prior_fraction!r}: at 1 the guide "
                "is never used (pass proposal=None to draw from the prior)"
            )
        self.guide, self.prior_fraction = guide, alpha
        self._auxiliary: dict = {}
        self._run = guide  # the guide as run: with the model's subsample (check)

    def check(self, args: tuple, kwargs: dict, layout: TokenLayout, trace) -> None:
        """Checks the guide against the model
        (:func:`~pyro_mpt.conditionals.proposal.check_guide`, value shapes, no enumerated
        latent, auxiliary sites it can be replayed on).

        :raises ValueError: naming the site and the fix."""
        if layout.enumerated:
            raise ValueError(
                f"proposal= needs a model whose latents are all continuous, but the site(s) "
                f"{layout.enumerated} are enumerated: leave proposal=None (the enumerated "
                "sites are summed out for each prior draw)"
            )
        names = list(layout.latents)
        # the guide's subsampled plates take the model's indices, as the model's own traces do
        self._run = replay_subsample(self.guide, trace)
        with torch.no_grad():
            gtr = check_guide(self._run, args, kwargs, layout, names)
        _check_shapes(gtr, trace, names)
        aux = {n for n, s in guide_sites(gtr).items() if s["infer"].get("is_auxiliary")}
        self._auxiliary = {n: n + UNCONSTRAINED for n in names if n + UNCONSTRAINED in aux}
        other = sorted(aux - set(self._auxiliary.values()))
        if other and self.prior_fraction > 0:
            raise ValueError(
                f"the guide's auxiliary site(s) {other} cannot be evaluated at the prior's "
                f"draws (prior_fraction={self.prior_fraction}): use a guide that samples the "
                "latents directly or as AutoNormal does, or pass prior_fraction=0"
            )

    def _guide_trace(self, args, kwargs, layout, size, values=None):
        dim = -layout.max_plate_nesting - 1
        guide = self._run if values is None else poutine.replay(self._run, trace=values)

        def particle_guide(*a, **k):
            with pyro.plate(PARTICLE_PLATE, size, dim=dim):
                return guide(*a, **k)

        return poutine.trace(particle_guide).get_trace(*args, **kwargs)

    def _replay_values(self, prior_trace, names) -> poutine.Trace:
        """The prior's draws as values for the guide's sites (unconstrained for an
        AutoNormal auxiliary site)."""
        values = poutine.Trace()
        for name in names:
            site = prior_trace.nodes[name]
            value, target = site["value"], self._auxiliary.get(name, name)
            if target != name:
                value = biject_to(site["fn"].support).inv(value)
            values.add_node(target, type="sample", is_observed=False, value=value, infer={})
        return values

    def draw(
        self, args, kwargs, layout, size: int, prior_trace: Callable, groups: int = 1
    ) -> tuple:
        r"""``size`` particles: ``round(alpha * size)`` prior draws (``prior_trace(n)``, the
        model traced with ``n`` prior particles), the rest from the guide, all without
        gradients. With ``groups`` (dividing ``size``), each of the ``groups`` consecutive
        blocks of ``size / groups`` particles (an SMC sweep's) is such a mixture.

        :returns: ``(values, log_q, alpha)``: ``values`` a trace of the latents' draws
            (shapes ``(size, ...)``, for :func:`pyro.poutine.replay`), ``log_q``
            ``(size, N)`` the guide's log-density :math:`\log q(z_s)` of each particle and
            sequence, and ``alpha`` the share actually drawn from the prior (for
            :meth:`log_weight`)."""
        names, block = list(layout.latents), size // groups
        n_prior = min(block - 1, round(self.prior_fraction * block)) if block > 1 else 0
        drawn = []  # (guide trace, particles): the guide's own draws, then the prior's
        with torch.no_grad():
            if block - n_prior:
                n = groups * (block - n_prior)
                drawn.append((self._guide_trace(args, kwargs, layout, n), n))
            if n_prior:
                n = groups * n_prior
                replayed = self._replay_values(prior_trace(n), names)
                drawn.append((self._guide_trace(args, kwargs, layout, n, replayed), n))

            # the densities too: a guide's distributions hold its parameters, which must
            # get no gradient from the estimate
            log_q = blocks([self._log_q(tr, layout, n) for tr, n in drawn], groups, size)
        values = poutine.Trace()
        for name in names:
            value = blocks([tr.nodes[name]["value"] for tr, _ in drawn], groups, size)
            values.add_node(name, type="sample", is_observed=False, value=value, infer={})
        return values, log_q, n_prior / block

    @staticmethod
    def _log_q(guide_trace, layout, size: int) -> torch.Tensor:
        """``(size, N)``: every guide site's log-density (an auxiliary site's and its
        Delta's log-Jacobian included), per particle and sequence."""
        sites = list(guide_sites(guide_trace))
        return sum(
            flatten_particles(lp, layout, (size,), 0)
            for lp in latent_log_prob(guide_trace, sites, layout)
        )

    @staticmethod
    def log_weight(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
        r""":math:`\log p(z) - \log \tilde q(z)` with :math:`\tilde q = \alpha p + (1 -
        \alpha) q`, the mixture's density detached (the gradient of an importance estimate
        with a fixed proposal); ``alpha`` as :meth:`draw` returned it."""
        if alpha == 0:
            return log_p - log_q
        mix = torch.logaddexp(math.log(alpha) + log_p, math.log1p(-alpha) + log_q)
        return log_p - mix.detach()

    def __repr__(self) -> str:
        name = getattr(self.guide, "__name__", type(self.guide).__name__)
        return f"Proposal({name}, prior_fraction={self.prior_fraction})"


def as_proposal(proposal, prior_fraction: float | None) -> Proposal | None:
    """``proposal`` as a :class:`~pyro_mpt.conditionals.proposal.Proposal` (a guide is
    wrapped, with ``prior_fraction`` or the default), or ``None`` for the prior."""
    if proposal is None or isinstance(proposal, Proposal):
        if prior_fraction is not None:
            raise ValueError(
                f"prior_fraction={prior_fraction!r} applies to a guide passed as proposal=; "
                f"got proposal={proposal!r}: pass the guide itself, or set prior_fraction on "
                "the Proposal"
            )
        return proposal
    if prior_fraction is None:
        return Proposal(proposal)
    return Proposal(proposal, prior_fraction)


class ProposalParticleModel(ParticleModel):
    r"""A :class:`~pyro_mpt.conditionals.smc_moves.ParticleModel` whose SMC sweeps start
    from a :class:`Proposal`'s draws with log-weights :math:`\log p(z) - \log \tilde q(z)`
    (stage 0's incremental weight: the sweep's evidence starts at their mean, so it stays
    unbiased; the annealing path :math:`p(z)\, p(x_{O_k} \mid z)^{\beta}` and the moves are
    those of prior draws). On the unconstrained scale both densities take the same
    Jacobian, which cancels.

    :param proposal: the checked :class:`Proposal`.
    """

    def __init__(self, model, args: tuple, kwargs: dict, layout: TokenLayout, proposal):
        super().__init__(model, args, kwargs, layout)
        self.proposal = proposal

    def draw_weighted(self, B: int, P: int) -> tuple:
        """``(u, log_prior, table, log_w0)``, ``log_w0`` ``(B, P, N)``."""
        S, layout = B * P, self.layout
        drawn, log_q, alpha = self.proposal.draw(
            self.args, self.kwargs, layout, S, self._trace, groups=B
        )
        values = {name: drawn.nodes[name]["value"] for name in layout.latents}
        tr = self._trace(S, values)
        u, log_prior, table = self.unconstrain(tr, B, P)
        log_p = sum(
            flatten_particles(lp, layout, (S,), 0)
            for lp in latent_log_prob(tr, layout.latents, layout)
        )
        log_w0 = self.proposal.log_weight(log_p, log_q, alpha)
        return u, log_prior, table, log_w0.reshape(B, P, -1)

r"""Mixed latents: continuous (global) latents by prior particles, enumerated discrete latents
summed out exactly for each particle by variable elimination.

With :math:`S` prior draws :math:`\theta_s \sim p(\theta)` of the continuous latents and the
enumerated latents :math:`z` (per token, per sequence, or a Markov chain) eliminated given
each draw,

.. math::
    \log \hat p(x_E) = \operatorname{logsumexp}_s \log \sum_z p(z \mid \theta_s)
    \prod_{t \in E} p(x_t \mid z, \theta_s) - \log S,
    \qquad
    \log p(x_j \mid x_O) \approx \log \hat p(x_{O \cup \{j\}}) - \log \hat p(x_O),

the self-normalised importance mixture of the exact per-particle conditionals
(:math:`\bar w_s \propto p(x_O \mid \theta_s)`), consistent as :math:`S \to \infty` and
biased :math:`O(1/S)` in log space like ``"importance"``. It is what ``"importance"`` does
when every latent is one draw per sequence; here a latent inside the token plate (a
mixture assignment per data point) is summed out instead of drawn, which a per-sequence
particle cannot do. The draws are reparameterised, so gradients reach the parameters, and
they are shared by all masks of a step. The conditionals are ratios of one estimated
evidence, so the chain rule telescopes to :math:`\log \hat p(x_{1..T})`.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger

from ..options import check_positive_int, resolve_max_elements
from .base import Conditionals, Scorer
from .chunked import chunked_particle_scorer, particle_chunk_size, particle_elements
from .elimination import EliminationScorer
from .evidence import MASK_PLATE, EvidenceMessenger, contract_evidence
from .importance import (
    JointEnumerationError,
    check_discrete_latents,
    drawn_values,
    particle_scorer,
)
from .kernels import FactorizedKernel
from .particles import ParticleScorer, enumerated_dims, flatten_particles, particle_trace

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["MixedConditionals", "MixedEliminationScorer", "has_mixed_latents", "per_token_scorer"]


def has_mixed_latents(layout: TokenLayout) -> bool:
    """Whether the model has both enumerated and other (continuous) latents."""
    enumerated = set(layout.enumerated)
    return bool(enumerated) and any(n not in enumerated for n in layout.latents)


class _TiledValues(Messenger):
    """Sets each continuous latent to its particle draw, tiled over the evaluation items:
    item ``i`` of the item plate reads particle ``i % S``."""

    def __init__(self, values: dict, num_tiles: int):
        super().__init__()
        self.values, self.num_tiles = values, num_tiles

    def _pyro_sample(self, msg):
        value = self.values.get(msg["name"])
        if value is None or msg["is_observed"]:
            return
        msg["value"] = value.repeat(self.num_tiles, *([1] * (value.dim() - 1)))
        msg["done"] = True


class MixedEliminationScorer(EliminationScorer):
    r"""Variable elimination of the enumerated latents for each of ``S`` particles of the
    continuous ones (module docstring). Every evidence set is evaluated once per particle,
    as ``B x S`` items of one elimination, and the particles are mixed in log space.

    :param values: continuous latent site -> its ``S`` draws, as traced under the particle
        plate (``(S, *plate dims, *event)``).
    :param int num_samples: ``S``.
    :param trace: the particle trace the draws come from (sizes the work per item).
    """

    def __init__(
        self,
        model,
        args: tuple,
        kwargs: dict,
        layout: TokenLayout,
        values: dict,
        num_samples: int,
        trace=None,
        max_elements: int | None = None,
    ):
        # the parent refuses latents that are not enumerated: these are replayed instead
        enum_only = dataclasses.replace(layout, latents=list(layout.enumerated))
        super().__init__(model, args, kwargs, enum_only, trace, max_elements)
        self.layout = layout
        self.values, self.num_samples = values, num_samples

    def _items_trace(self, B, messenger):
        P, S = self.layout.max_plate_nesting, self.num_samples
        model, values = self.model, self.values

        def items_model(*args, **kwargs):
            with pyro.plate(MASK_PLATE, B, dim=-P - 1):
                with _TiledValues(values, B // S), messenger:
                    return model(*args, **kwargs)

        enum_model = poutine.enum(items_model, first_available_dim=-P - 2)
        return poutine.trace(enum_model).get_trace(*self.args, **self.kwargs)

    def log_evidence(self, evidence: torch.Tensor) -> torch.Tensor:
        r"""``(B, N)``: :math:`\log \hat p(x_{n,E_b})`, the particle mixture of the exact
        per-particle evidences of ``evidence`` (bool ``(B, N, T)``)."""
        B, S, N = evidence.shape[0], self.num_samples, self.layout.num_sequences
        items = evidence.repeat_interleave(S, 0)  # item b * S + s: evidence b, particle s
        tr = self._items_trace(B * S, EvidenceMessenger(self._site_masks(items)))
        logz = contract_evidence(tr, self.layout, MASK_PLATE, B * S).reshape(B, S, N)
        return torch.logsumexp(logz, 1) - math.log(S)

    def __call__(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """As :meth:`EliminationScorer.__call__`; with ``route="auto"`` the route is chosen by
        the work per row, every item being ``S`` draws wide: a probe costs about 3
        eliminations of the row's conditioning set (5 with gradients), differences cost
        ``1 + m`` for a row scoring ``m`` tokens."""
        if self.route != "auto":
            return super().__call__(observed, scored)
        probe = (5 if torch.is_grad_enabled() else 3) * observed.shape[0]
        differences = observed.shape[0] + int(scored.sum(-1).amax(-1).sum())
        self.route = "probe" if probe < differences else "differences"
        try:
            return super().__call__(observed, scored)
        finally:
            self.route = "auto"

    def log_conditionals(self, observed: torch.Tensor) -> torch.Tensor:
        r"""``(B, N, T)``: the probe route of
        :meth:`~pyro_mpt.conditionals.elimination.EliminationScorer.log_conditionals` with
        the draws as items. Each item :math:`(b, s)` gets its own probes :math:`t_{b,s}`
        and scaling :math:`c_{b,s}`; with :math:`Z_b = \sum_s Z_{b,s}`,

        .. math:: \hat p(x_u \mid x_{O_b}) = \sum_s c_{b,s,u}\,
            \frac{\partial \log Z_b}{\partial t_{b,s,u}}\Big|_{t=0}
            = \sum_s \frac{p(x_{O_b}, x_u \mid \theta_s)}{\sum_{s'} p(x_{O_b} \mid
            \theta_{s'})},

        the mixture :meth:`log_evidence` differences give, from one elimination."""
        S, N, B = self.num_samples, self.layout.num_sequences, observed.shape[0]
        items = observed.repeat_interleave(S, 0)  # item b * S + s: evidence b, particle s
        grad, logc = self._probe_gradients(
            items, lambda logz: torch.logsumexp(logz.reshape(B, S, N), 1)
        )
        # a particle whose weight underflowed contributes 0; keep log(0) out of the graph
        tiny = torch.finfo(grad.dtype).tiny
        log_terms = torch.where(items, 1.0, grad).clamp_min(tiny).log() + logc
        out = torch.logsumexp(log_terms.reshape(B, S, N, -1), 1)
        return torch.where(observed, out.new_zeros(()), out)


def _particle_route(trace, layout: TokenLayout):
    """The particle scorer builder that applies to a one-particle ``trace``: ``"importance"``'s
    (the enumerated sites enumerated jointly with the draws), :func:`per_token_scorer`, or
    ``None`` (variable elimination for each draw is needed)."""
    try:
        particle_scorer(trace, layout, 1)
        return particle_scorer
    except JointEnumerationError:
        pass  # a Markov chain or a per-token site: eliminate it for each draw
    return per_token_scorer if per_token_scorer(trace, layout, 1) is not None else None


def _chunk_drawer(model, args, kwargs, layout: TokenLayout, num_samples: int, build):
    """``draw(start, size)`` for :func:`~pyro_mpt.conditionals.chunked.chunked_particle_scorer`:
    ``size`` prior draws, scored by ``build``, and a function that replays the same draws
    (only one chunk's ``(size, N, T)`` tables are alive at a time)."""

    def draw(start: int, size: int):
        tr = particle_trace(model, args, kwargs, layout, num_particles=size)
        drawn = drawn_values(tr, layout)

        def kernels() -> list:
            again = particle_trace(
                poutine.replay(model, trace=drawn), args, kwargs, layout, num_particles=size
            )
            return build(again, layout, num_samples).kernels

        return build(tr, layout, num_samples), kernels

    return draw


def _check_independent_of_enumerated(trace, values: dict, layout: TokenLayout) -> None:
    """A continuous latent drawn with enumeration dims left of the particle plate depends on
    an enumerated site: its draws would differ per enumerated value, which prior draws
    shared by every configuration cannot represent."""
    P = layout.max_plate_nesting
    for name, value in values.items():
        if value.dim() > P + 1 + trace.nodes[name]["fn"].event_dim:
            raise ValueError(
                f"latent site {name!r} is continuous and depends on enumerated site(s) "
                f"{layout.enumerated}: conditionals='mixed' draws the continuous latents once "
                "for every enumerated configuration, so they must not depend on enumerated "
                "ones (here the enumerated sites also need elimination: a pyro.markov chain "
                "or a per-token site); integrate the continuous latent out in the model"
            )


def per_token_scorer(trace, layout: TokenLayout, num_samples: int) -> ParticleScorer | None:
    r"""The fast route when every enumerated site sits inside the token plate with a dim of
    its own and one observed site holds the tokens (a mixture assignment per data point):
    given a draw :math:`\theta_s` the tokens are independent, with

    .. math:: l_{s,t} = \log \sum_{c_t} p(c_t \mid \theta_s)\, p(x_t \mid c_t, \theta_s),

    so a :class:`~pyro_mpt.conditionals.kernels.FactorizedKernel` over the draws gives the
    same conditionals as elimination, by matrix products. ``None`` where it does not apply.
    """
    if layout.token_plate is None or len(layout.sites) != 1:
        return None
    dims = enumerated_dims(trace)
    if len(set(dims.values())) < len(dims):
        return None
    P = layout.max_plate_nesting
    total = 0.0
    for name in [layout.sites[0].name, *layout.enumerated]:
        site = trace.nodes[name]
        if layout.token_plate not in {f.name for f in site["cond_indep_stack"]}:
            return None  # an enumerated site shared by the tokens couples them
        total = total + site["fn"].log_prob(site["value"])
    lead = total.dim() - P - 1  # enumeration dims, left of the particle plate
    table = total.logsumexp(tuple(range(lead))) if lead > 0 else total
    table = table.reshape((1,) * (P + 1 - table.dim()) + tuple(table.shape))
    table = table.movedim(layout.token_dim, -1)  # (S, *sequence dims, T)
    S = table.shape[0]
    kernel = FactorizedKernel(flatten_particles(table, layout, (S,), 1))
    log_w0 = table.new_full((S, layout.num_sequences), -math.log(num_samples))
    return ParticleScorer([(slice(0, layout.num_tokens), kernel)], layout, log_w0)


class MixedConditionals(Conditionals):
    r"""Continuous latents by ``num_samples`` prior draws, enumerated latents summed out
    exactly for each draw (:class:`~pyro_mpt.conditionals.mixed.MixedEliminationScorer`). ``"auto"`` picks it for a
    model with both kinds of latents. Where the enumerated sites can simply be enumerated
    jointly with the draws (each has a dim of its own and one value per sequence), it
    returns ``"importance"``'s particle scorer instead: the same estimate, scored faster.

    :param int num_samples: ``S``, prior draws of the continuous latents per step.
    :param int max_elements: memory budget of one chunk of items; ``None``: the default of
        the data's device.

    Example::

        MaskedELBO(conditionals="mixed", token_plate="data").estimate(gmm, None, data)
    """

    name = "mixed"
    draws_latents = True
    options = {"num_samples": "num_samples", "max_elements": "max_elements"}

    def __init__(self, num_samples: int = 256, max_elements: int | None = None):
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.max_elements = check_positive_int("max_elements", max_elements, allow_none=True)

    def check(self, layout: TokenLayout, trace) -> None:
        check_discrete_latents(trace, layout, self.name)

    def scorer(self, model, args: tuple, kwargs: dict, layout: TokenLayout, trace) -> Scorer:
        """Where every enumerated site has a dim of its own and one value per sequence, the
        draws and the enumerated support are particles jointly (what ``"importance"`` does:
        the same estimate, scored faster); where each is per token,
        :func:`~pyro_mpt.conditionals.mixed.per_token_scorer`; otherwise a :class:`~pyro_mpt.conditionals.mixed.MixedEliminationScorer`.

        :raises ValueError: for a continuous latent that depends on an enumerated site
            (when elimination is needed), naming it."""
        self.check(layout, trace)
        S = self.num_samples
        budget = resolve_max_elements(self.max_elements, layout.device)
        # which route applies is a matter of the model's structure: ask one particle
        device = layout.device
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the probe leaves the draws' stream alone
            one = particle_trace(model, args, kwargs, layout, num_particles=1)
        build = _particle_route(one, layout)
        if build is not None:
            chunk = particle_chunk_size(S, particle_elements(trace, layout), budget, self.name)
            return chunked_particle_scorer(
                layout, S, chunk, _chunk_drawer(model, args, kwargs, layout, S, build)
            )
        tr = particle_trace(model, args, kwargs, layout, num_particles=S)
        enumerated = set(layout.enumerated)
        values = {n: tr.nodes[n]["value"] for n in layout.latents if n not in enumerated}
        _check_independent_of_enumerated(tr, values, layout)
        return MixedEliminationScorer(model, args, kwargs, layout, values, S, tr, budget)

    def __repr__(self) -> str:
        return f"MixedConditionals(num_samples={self.num_samples})"

r"""Exact conditionals for structured discrete latents by variable elimination.

When the enumerated latents of a model form a structure whose joint support is too large to
list (an HMM chain under :func:`pyro.markov`, whose joint support grows as :math:`C^T`), the
particle mixture of :mod:`pyro_mpt.conditionals.particles` does not scale. Instead every
conditional is a ratio of two marginal likelihoods of *partial evidence*,

.. math::
    \log p(x_j \mid x_O) = \log p(x_{O \cup \{j\}}) - \log p(x_O),
    \qquad
    \log p(x_E) = \log \sum_z p(z) \prod_{t \in E} p(x_t \mid z),

and each :math:`\log p(x_E)` is computed by variable elimination over the enumerated latents
with the evidence of the tokens outside :math:`E` removed (their log-probabilities set to
zero, which marginalises them exactly: :math:`\sum_{x_t} p(x_t \mid z) = 1`). This is
section 2b of the theory page of the docs. For a chain the elimination is linear in
:math:`T`.

Batched over masks: the model runs once per chunk inside an extra plate
(:data:`~pyro_mpt.conditionals.evidence.MASK_PLATE`) whose index :math:`b` enumerates
*evaluation items*. For mask row :math:`r` there is one item with evidence :math:`O_r` and one
item per scored token :math:`j` with evidence :math:`O_r \cup \{j\}` (or, by the probe
route, one item per distinct :math:`O_r`). The evidence masks and the contraction are in
:mod:`pyro_mpt.conditionals.evidence`.

When the enumerated sites form one ``pyro.markov`` chain of states with emissions (an
HMM), the same conditionals come from a scaled forward-backward in probability space,
every masked token of a row at once and no model run per chunk
(:mod:`pyro_mpt.conditionals.forward_backward`); ``route`` selects it by default.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from ..options import resolve_max_elements
from .base import Scorer
from .evidence import MASK_PLATE, EvidenceMessenger, ProbeMessenger, contract_evidence
from .forward_backward import markov_chain
from .particles import particle_trace

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["MASK_PLATE", "EliminationScorer", "contract_evidence"]


#: Elements one evidence item needs per element of its factors (``item_cost``): the
#: factors, their contraction and its temporaries (measured about 3 on an HMM).
EVIDENCE_FACTOR = 3


class EliminationScorer(Scorer):
    r"""Exact :math:`\log p(x_j \mid x_O)` for models whose latents are all enumerated, by
    variable elimination with partial evidence (see the module docstring):

    .. math:: \log p(x_j \mid x_O) = \log p(x_{O\cup\{j\}}) - \log p(x_O).

    Tokens neither observed nor scored are marginalised (their evidence is dropped), as the
    chain estimator needs. Being a ratio of this scorer's own evidences, the chain rule
    telescopes (:attr:`~pyro_mpt.conditionals.base.Scorer.telescopes`): any order sums to
    :math:`\log p(x_{1..T}) - \log p(x_\emptyset)`.

    A ``pyro.markov`` chain of states (:attr:`chain` not ``None``) is scored by its
    forward-backward (:class:`~pyro_mpt.conditionals.forward_backward.MarkovChain`), the
    same values by another exact route, unless ``route`` names an elimination route.

    :param model: the Pyro model; ``args`` and ``kwargs`` are passed to it.
    :param layout: the :class:`~pyro_mpt.tokens.TokenLayout` of the model.
    :param trace: an enumerated trace of the model
        (:func:`~pyro_mpt.conditionals.particles.particle_trace` without particles), used to
        size the work per item; traced here if ``None``.
    :param int max_elements: memory budget, in tensor elements, of one chunk of items;
        ``None``: the default of the data's device
        (:func:`~pyro_mpt.options.resolve_max_elements`).
    :raises ValueError: for a latent that is not enumerated or an observed site whose tokens
        cannot be masked elementwise (a Gaussian with a dense or low-rank covariance).
    """

    telescopes = True

    def __init__(
        self,
        model,
        args: tuple,
        kwargs: dict,
        layout: TokenLayout,
        trace=None,
        max_elements: int | None = None,
    ):
        self.model = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.layout = layout
        self.max_elements = resolve_max_elements(max_elements, layout.device)
        #: ``"auto"`` (the forward-backward of a chain, else fewer eliminations),
        #: ``"forward_backward"``, ``"probe"`` or ``"differences"``
        self.route = "auto"
        missing = [n for n in layout.latents if n not in layout.enumerated]
        if missing:
            raise ValueError(
                f"variable elimination needs every latent enumerated, but {missing} are not "
                "marked infer={'enumerate': 'parallel'}"
            )
        bad = [s.name for s in layout.sites if s.kind != "factorized"]
        if bad:
            raise ValueError(
                f"observed site(s) {bad} are Gaussians with a full or low-rank covariance and "
                "latent discrete parents: their elements cannot be masked one by one for "
                "variable elimination; write them as independent tokens given the latents "
                "(e.g. Normal(...).to_event(1))"
            )
        if trace is None:
            trace = particle_trace(model, self.args, self.kwargs, layout)
        self.item_cost = self._item_cost(trace)
        #: the :class:`~pyro_mpt.conditionals.forward_backward.MarkovChain` when the
        #: enumerated sites form one ``pyro.markov`` chain (an HMM), else ``None``
        self.chain = markov_chain(trace, layout, self.max_elements)

    @property
    def _forward_backward(self):
        """The chain, when it scores (``route`` ``"auto"`` or ``"forward_backward"``)."""
        if self.route == "forward_backward" and self.chain is None:
            raise ValueError(
                "route='forward_backward' needs the enumerated sites to form one pyro.markov "
                "chain of states with emissions; use route='auto'"
            )
        return self.chain if self.route in ("auto", "forward_backward") else None

    # ------------------------------------------------------------------------------------
    # Sizes
    # ------------------------------------------------------------------------------------

    def _item_cost(self, trace):
        """Tensor elements of all log-factors for one evaluation item (all sequences)."""
        cost = 0
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            fn, value = site["fn"], site["value"]
            vshape = (
                tuple(value.shape[: value.dim() - fn.event_dim]) if torch.is_tensor(value) else ()
            )
            cost += math.prod(torch.broadcast_shapes(tuple(fn.batch_shape), vshape))
        # evidence and the output of the contraction
        cost += self.layout.num_sequences * (self.layout.num_tokens + 1)
        return max(1, cost)

    def row_cost(self, shared: bool = False) -> int:
        """Tensor elements one mask row needs at least (two items: :math:`O` and
        :math:`O\\cup\\{j\\}`); rows scoring more tokens need more items, which
        :meth:`__call__` chunks under ``max_elements`` itself. The same whether or not the
        row's mask is ``shared`` by all sequences (the factors span every sequence)."""
        if self._forward_backward is not None:
            return self._forward_backward.row_cost()
        return 2 * self.item_cost

    # ------------------------------------------------------------------------------------
    # Evidence masks and the elimination
    # ------------------------------------------------------------------------------------

    def _to_site(self, site, x):
        """Reshapes ``x`` (B, N, T) to the site's batch layout under the item plate:
        ``(mode, tensor)``; ``mode`` is ``"event"`` when tokens are event elements."""
        layout = self.layout
        B, seq_shape = x.shape[0], tuple(layout.seq_shape)
        e = x[..., layout.site_slice(site)]  # (B, N, T_site)
        if layout.token_plate is not None:
            i = layout.max_plate_nesting + layout.token_dim  # the token dim among the plates
            return "batch", e.reshape(B, *seq_shape, site.num_tokens).movedim(-1, 1 + i)
        if len(site.event_shape) == 0:
            return "batch", e.reshape(B, *seq_shape)
        return "event", e.reshape(B, *seq_shape, *site.event_shape)

    def _from_site(self, site, x, B):
        """The inverse of :meth:`_to_site`: ``(B, N, T_site)``."""
        layout = self.layout
        N, seq_shape = layout.num_sequences, tuple(layout.seq_shape)
        if layout.token_plate is not None:
            i = layout.max_plate_nesting + layout.token_dim
            full = (B, *seq_shape[:i], site.num_tokens, *seq_shape[i:])
            return x.expand(full).movedim(1 + i, -1).reshape(B, N, site.num_tokens)
        if len(site.event_shape) == 0:
            return x.expand(B, *seq_shape).reshape(B, N, 1)
        return x.expand(B, *seq_shape, *site.event_shape).reshape(B, N, site.num_tokens)

    def _site_masks(self, evidence):
        """Splits ``evidence`` (B, N, T) into per-site masks shaped for the item plate."""
        return {site.name: self._to_site(site, evidence) for site in self.layout.sites}

    def _items_trace(self, B, messenger):
        P = self.layout.max_plate_nesting
        model = self.model

        def items_model(*args, **kwargs):
            with pyro.plate(MASK_PLATE, B, dim=-P - 1):
                with messenger:
                    return model(*args, **kwargs)

        enum_model = poutine.enum(items_model, first_available_dim=-P - 2)
        return poutine.trace(enum_model).get_trace(*self.args, **self.kwargs)

    def _probe_gradients(self, items: torch.Tensor, reduce) -> tuple:
        r"""``(grad, log c)``, both shaped like ``items`` (bool ``(I, N, T)``, the observed
        tokens of each item): one elimination with a probe :math:`t_u` on every unobserved
        token's factor, and the gradient of ``reduce(log Z)`` (``(I, N)`` in) with respect to
        the probes at :math:`t = 0`; ``log c`` are the probes' scalings. Differentiable
        (double backward) when gradients are enabled."""
        layout, num_items = self.layout, items.shape[0]
        create_graph = torch.is_grad_enabled()
        store = {}
        with torch.enable_grad():
            t = torch.zeros(items.shape, dtype=layout.dtype, device=items.device)
            t.requires_grad_(True)
            entries = {}
            for site in layout.sites:
                mode, obs = self._to_site(site, items)
                entries[site.name] = (mode, obs, self._to_site(site, t)[1])
            tr = self._items_trace(num_items, ProbeMessenger(entries, store))
            logz = contract_evidence(tr, layout, MASK_PLATE, num_items)
            (grad,) = torch.autograd.grad(
                reduce(logz).sum(), t, create_graph=create_graph, allow_unused=True
            )
        if grad is None:  # nothing unobserved: the result is masked out by the caller
            grad = torch.ones_like(t)
        sites = layout.sites
        logc = torch.cat([self._from_site(site, store[site.name], num_items) for site in sites], -1)
        return grad, logc

    def log_conditionals(self, observed: torch.Tensor) -> torch.Tensor:
        r"""``(B, N, T)``: :math:`\log p(x_{n,t} \mid x_{n,O_b})` for every token not in
        ``observed`` (bool ``(B, N, T)``; 0 at observed tokens), from ONE elimination per
        item: each unobserved token's factor becomes :math:`1 + t\,p(x_t \mid z)/c` and

        .. math:: p(x_t \mid x_O) = c\,\frac{\partial \log Z}{\partial t}\Big|_{t=0},
            \qquad Z(t) = \sum_z p(z, x_O) \prod_{u \notin O} (1 + t_u\,p(x_u \mid z)/c_u).

        Differentiable (double backward) when gradients are enabled."""
        grad, logc = self._probe_gradients(observed, lambda logz: logz)
        # observed tokens have no probe (gradient 0), nor have tokens a site's own mask drops
        # (ragged lengths): keep log(0) out of the graph (0 * inf would be a NaN gradient)
        tiny = torch.finfo(grad.dtype).tiny
        out = torch.where(observed, torch.ones_like(grad), grad).clamp_min(tiny).log() + logc
        return torch.where(observed, out.new_zeros(()), out)

    def log_evidence(self, evidence: torch.Tensor) -> torch.Tensor:
        r"""``(B, N)``: :math:`\log p(x_{n, E_b})` for the evidence sets
        ``evidence`` (bool ``(B, N, T)``), by variable elimination, one traced run per
        chunk of items under ``max_elements`` (an item's factors, their contraction and
        its temporaries: ``EVIDENCE_FACTOR`` times ``item_cost``).

        :raises ValueError: naming ``max_elements`` when not even one item fits."""
        if self._forward_backward is not None:  # a chain: its forward pass
            return self._forward_backward.log_evidence(evidence)
        B = evidence.shape[0]
        need = EVIDENCE_FACTOR * self.item_cost
        if need > self.max_elements:
            raise ValueError(
                f"max_elements={self.max_elements} is too small for conditionals='enumerate': "
                f"one evidence item over every sequence needs about {need} elements "
                f"({EVIDENCE_FACTOR} x {self.item_cost}); pass max_elements >= {need}, or "
                "fewer sequences per call"
            )
        chunk = self.max_elements // need
        if B > chunk:  # a loop over chunks of items, each one traced run
            parts = [self.log_evidence(evidence[i : i + chunk]) for i in range(0, B, chunk)]
            return torch.cat(parts, 0)
        tr = self._items_trace(B, EvidenceMessenger(self._site_masks(evidence)))
        return contract_evidence(tr, self.layout, MASK_PLATE, B)

    def _by_differences(self, observed, scored, chunk):
        r""":math:`\log p(x_{O\cup\{j\}}) - \log p(x_O)`, one elimination per evidence set."""
        R, N, T = observed.shape
        device = observed.device
        # pos[r, n, t]: rank of scored token t among the scored tokens of (r, n); -1 if not
        # scored. Item 0 of row r has evidence O_r; item k >= 1 adds the k-th scored token.
        pos = torch.where(scored, scored.long().cumsum(-1) - 1, -1)
        per_row = 1 + scored.sum(-1).amax(-1)  # (R,) items per row
        offsets = torch.cumsum(per_row, 0) - per_row  # index of each row's item 0
        num_items = int(per_row.sum())
        item_row = torch.repeat_interleave(torch.arange(R, device=device), per_row)
        item_k = torch.arange(num_items, device=device) - offsets[item_row]
        logz = []
        for start in range(0, num_items, chunk):
            rows = item_row[start : start + chunk]
            k = item_k[start : start + chunk].view(-1, 1, 1)
            evidence = observed[rows] | (scored[rows] & (pos[rows] == k - 1))
            # Many items share an evidence set (the chain's O_i + j_i is O_{i+1}; an
            # exhaustive sweep meets every subset up to T + 1 times): eliminate each once.
            unique, inverse = torch.unique(
                evidence.reshape(evidence.shape[0], -1), dim=0, return_inverse=True
            )
            logz.append(self.log_evidence(unique.reshape(-1, N, T))[inverse])
        logz = torch.cat(logz, 0) if len(logz) > 1 else logz[0]  # (I, N)
        seq = torch.arange(N, device=device).view(1, N, 1)
        base = offsets.view(R, 1, 1)
        log_num = logz[base + 1 + pos, seq]  # non-scored tokens read item 0: difference 0
        log_den = logz[base.expand(R, N, 1), seq]
        return log_num - log_den

    def __call__(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        r""":param observed: bool ``(R, N, T)``, the conditioning tokens :math:`O`.
        :param scored: bool ``(R, N, T)``, the tokens :math:`j` to score (disjoint from
            ``observed``; tokens in neither are marginalised). Masks shared by all
            sequences may be passed as ``(R, 1, T)``.
        :returns: ``(R, N, T)``: :math:`\log p(x_{n,j} \mid x_{n,O_r})` where ``scored``,
            0 elsewhere."""
        R, _, T = observed.shape
        N = self.layout.num_sequences
        observed, scored = observed.expand(R, N, T), scored.expand(R, N, T)  # shared masks
        device = observed.device
        if R == 0 or not bool(scored.any()):
            return torch.zeros(R, N, T, dtype=self.layout.dtype, device=device)
        observed, scored = observed.bool(), scored.bool()
        if self._forward_backward is not None:  # a chain: every row in one sweep each way
            return self._forward_backward(observed, scored)
        # Two exact routes; take the one with fewer eliminations. A probe costs one
        # elimination and one backward pass (about 3 eliminations, more when the result must
        # stay differentiable) per distinct conditioning set and scores every masked token
        # at once; differences cost one elimination per conditioning set plus one per scored
        # token, so they win when rows score one token (the chain estimator).
        unique, inverse = torch.unique(observed.reshape(R, -1), dim=0, return_inverse=True)
        unique = unique.reshape(-1, N, T)
        probe_chunk = max(1, self.max_elements // (4 * self.item_cost))
        diff_chunk = max(1, self.max_elements // self.item_cost)
        num_diff_items = R + int(scored.sum(-1).amax(-1).sum())
        probe_cost = -(-unique.shape[0] // probe_chunk) * (5 if torch.is_grad_enabled() else 3)
        use_probe = probe_cost < -(-num_diff_items // diff_chunk)
        if self.route != "auto":
            use_probe = self.route == "probe"
        if use_probe:
            out = torch.cat(
                [
                    self.log_conditionals(unique[start : start + probe_chunk])
                    for start in range(0, unique.shape[0], probe_chunk)
                ],
                0,
            )[inverse]
        else:
            out = self._by_differences(observed, scored, diff_chunk)
        return torch.where(scored, out, out.new_zeros(()))

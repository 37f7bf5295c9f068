r"""Exact conditionals for structured discrete latents by tensor variable elimination.

When the enumerated latents of a model form a structure whose joint support is too large to
list (an HMM chain under :func:`pyro.markov`, whose joint support grows as :math:`C^T`), the
particle mixture of :mod:`pyro_mpt.conditionals.base` does not scale. Instead every
conditional is a ratio of two marginal likelihoods of *partial evidence*,

.. math::
    \log p(x_j \mid x_O) = \log p(x_{O \cup \{j\}}) - \log p(x_O),
    \qquad
    \log p(x_E) = \log \sum_z p(z) \prod_{t \in E} p(x_t \mid z),

and each :math:`\log p(x_E)` is computed by variable elimination over the enumerated latents
with the evidence of the tokens outside :math:`E` removed (their log-probabilities set to
zero, which marginalises them exactly: :math:`\sum_{x_t} p(x_t \mid z) = 1`). This is
THEORY.md, section 2b. For a chain the elimination is linear in :math:`T`.

Batched over masks: the model runs once per chunk inside an extra plate ``"_mpt_masks"``
(left of the model's plates) whose index :math:`b` enumerates *evaluation items*. For mask
row :math:`r` there is one item with evidence :math:`O_r` and one item per scored token
:math:`j` with evidence :math:`O_r \cup \{j\}`. A messenger applies each item's evidence mask
to every observed site (``msg["mask"]`` like :func:`pyro.poutine.mask` when a token is a whole
batch element; an elementwise mask of the base distribution of a ``.to_event`` site when a
token is an event element). Pyro's own machinery then does the elimination:
:func:`pyro.poutine.enum`, :meth:`~pyro.poutine.Trace.compute_log_prob`,
:meth:`~pyro.poutine.Trace.pack_tensors` and :func:`pyro.ops.contract.contract_to_tensor`
with the mask plate and the sequence plates as target ordinal, exactly as
:class:`~pyro.infer.TraceEnum_ELBO` gathers its log-factors. Everything is differentiable
in the model's parameters.

References

[1] P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
Likelihood", NeurIPS 2023, arXiv:2306.00520.

[2] F. Obermeyer, E. Bingham, M. Jankowiak, J. Chiu, N. Pradhan, A. Rush, N. Goodman,
"Tensor Variable Elimination for Plated Factor Graphs", ICML 2019 (Pyro's
``TraceEnum_ELBO``).
"""

from collections import OrderedDict

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.util import broadcast_shape
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, constraints

from .base import DEFAULT_MAX_ELEMENTS, Scorer, particle_trace

__all__ = ["EliminationScorer", "MASK_PLATE", "contract_evidence"]

#: Name of the plate whose index enumerates the evaluation items (evidence sets).
MASK_PLATE = "_mpt_masks"


def _numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _mask_elements(fn, mask):
    """Masks the event elements of a (possibly nested) ``Independent`` distribution: the
    innermost base distribution is masked elementwise (its batch shape ends in the token
    dims, which ``mask`` also ends in), then the ``Independent`` wrappers are restored."""
    if isinstance(fn, Independent):
        inner = _mask_elements(fn.base_dist, mask)
        return dist.Independent(inner, fn.reinterpreted_batch_ndims)
    return dist.MaskedDistribution(fn, mask)


class _EvidenceMessenger(Messenger):
    """Applies each evaluation item's evidence mask to the observed sites.

    :param dict masks: site name -> ``(mode, mask)``; ``mode`` is ``"batch"`` (the mask is
        combined into ``msg["mask"]``, as :class:`~pyro.poutine.mask_messenger.MaskMessenger`
        does) or ``"event"`` (the distribution's event elements are masked).

    It sits outside the model's plates, so it sees ``fn`` already broadcast over them; the
    item plate, outside it, broadcasts afterwards.
    """

    def __init__(self, masks):
        super().__init__()
        self.masks = masks

    def _pyro_sample(self, msg):
        entry = self.masks.get(msg["name"])
        if entry is None or not msg["is_observed"]:
            return
        mode, mask = entry
        if mode == "batch":
            msg["mask"] = mask if msg["mask"] is None else msg["mask"] & mask
        else:
            msg["fn"] = _mask_elements(msg["fn"], mask)


class _Probe(TorchDistribution):
    r"""Evidence of one item for an elementwise distribution: observed elements keep their
    log-density :math:`\ell`; every other element becomes the factor
    :math:`1 + t\,e^{\ell - \log c}` with :math:`t = 0`, i.e. no evidence (it is
    marginalised), but with :math:`\partial \log Z / \partial t = p(x_j \mid x_O) / c`.
    :math:`\log c` is the largest :math:`\ell` over the enumerated values (a constant in
    them, for range), stored in ``store[key]``."""

    arg_constraints = {}

    def __init__(self, base_dist, observed, probe, store, key):
        batch_shape = broadcast_shape(observed.shape, base_dist.batch_shape)
        if base_dist.batch_shape != batch_shape:
            base_dist = base_dist.expand(batch_shape)
        self.base_dist = base_dist
        self._observed, self._probe, self._store, self._key = observed, probe, store, key
        super().__init__(base_dist.batch_shape, base_dist.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_Probe, _instance)
        new.base_dist = self.base_dist.expand(torch.Size(batch_shape))
        new._observed, new._probe = self._observed, self._probe
        new._store, new._key = self._store, self._key
        super(_Probe, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        return new

    @constraints.dependent_property
    def support(self):
        return self.base_dist.support

    def sample(self, sample_shape=()):
        return self.base_dist.sample(torch.Size(sample_shape))

    def log_prob(self, value):
        lp = self.base_dist.log_prob(value)
        lead = lp.dim() - self._observed.dim()  # enumeration dims, left of the item plate
        logc = lp.detach().amax(tuple(range(lead))) if lead > 0 else lp.detach()
        logc = torch.where(torch.isfinite(logc), logc, torch.zeros_like(logc))
        self._store[self._key] = logc
        probe = torch.log1p(self._probe * torch.exp(lp - logc))
        return torch.where(self._observed, lp, probe)


def _probe_elements(fn, observed, probe, store, key):
    """:class:`_Probe` on the innermost base distribution of ``Independent`` wrappers."""
    if isinstance(fn, Independent):
        inner = _probe_elements(fn.base_dist, observed, probe, store, key)
        return dist.Independent(inner, fn.reinterpreted_batch_ndims)
    return _Probe(fn, observed, probe, store, key)


class _ProbeMessenger(Messenger):
    """Replaces each observed site's distribution by its :class:`_Probe` for the items."""

    def __init__(self, entries, store):
        super().__init__()
        self.entries, self.store = entries, store

    def _pyro_sample(self, msg):
        entry = self.entries.get(msg["name"])
        if entry is None or not msg["is_observed"]:
            return
        mode, observed, probe = entry
        if mode == "batch":
            msg["fn"] = _Probe(msg["fn"], observed, probe, self.store, msg["name"])
        else:
            msg["fn"] = _probe_elements(msg["fn"], observed, probe, self.store, msg["name"])


def contract_evidence(trace, layout, keep_plate, size, latents=()):
    r"""``(size, N)``: :math:`\log \sum_c \prod_f f` over an enumerated trace, keeping the
    plate ``keep_plate`` (of ``size``, left of the model's plates) and the sequence plates.

    The factors are gathered by ordinal as :class:`~pyro.infer.TraceEnum_ELBO` does: the
    enumerated sites' log-probabilities unscaled (their dims :math:`c` are summed out), the
    observed sites' (and the named ``latents``') unscaled with their masks applied inside the
    log-sum-exp, so masked evidence is marginalised. Subsampling scales are the caller's.
    """
    names = set(latents)

    def relevant(name, site):
        return not site_is_subsample(site) and (
            site["is_observed"] or "_enumerate_dim" in site["infer"] or name in names
        )

    trace.compute_log_prob(relevant)
    trace.pack_tensors()
    tree, sum_dims, dim_to_size = OrderedDict(), set(), {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not relevant(name, site):
            continue
        ordinal = frozenset(
            trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
        )
        pk = site["packed"]
        if site["infer"].get("_enumerate_dim") is not None:
            term = pk["unscaled_log_prob"]
            sum_dims.add(site["infer"]["_enumerate_symbol"])
        else:
            term = packed.scale_and_mask(pk["unscaled_log_prob"], mask=pk["mask"])
        dim_to_size.update(zip(term._pyro_dims, term.shape))
        for f in site["cond_indep_stack"]:  # plates of size 1 are not packed
            if f.vectorized:
                dim_to_size.setdefault(trace.plate_to_symbol[f.name], f.size)
        tree.setdefault(ordinal, []).append(term)

    seq_plates = {f.name for s in layout.sites for f in s.frames} - {layout.token_plate}
    target = frozenset(
        trace.plate_to_symbol[name]
        for name in seq_plates | {keep_plate}
        if name in trace.plate_to_symbol
    )
    logz = contract_to_tensor(
        tree, sum_dims, target_ordinal=target, ring=LogRing(dim_to_size=dim_to_size)
    )
    logz = packed.unpack(logz, trace.symbol_to_dim)  # dims -P-1 (kept) .. -1 (plates)
    P = layout.max_plate_nesting
    logz = logz.reshape((1,) * (P + 1 - logz.dim()) + tuple(logz.shape))
    if layout.token_plate is not None:
        logz = logz.squeeze(1 + P + layout.token_dim)  # product-contracted: size 1
    return logz.expand(size, *layout.seq_shape).reshape(size, layout.num_sequences)


class EliminationScorer(Scorer):
    r"""Exact :math:`\log p(x_j \mid x_O)` for models whose latents are all enumerated, by
    variable elimination with partial evidence (see the module docstring):

    .. math:: \log p(x_j \mid x_O) = \log p(x_{O\cup\{j\}}) - \log p(x_O).

    Tokens neither observed nor scored are marginalised (their evidence is dropped), as the
    chain estimator needs.

    :param model: the Pyro model; ``args`` and ``kwargs`` are passed to it.
    :param layout: the :class:`~pyro_mpt.tokens.TokenLayout` of the model.
    :param trace: an enumerated trace of the model (:func:`~pyro_mpt.conditionals.base.particle_trace`
        without particles), used to size the work per item; traced here if ``None``.
    :param int max_elements: memory budget, in tensor elements, of one chunk of items.
    :raises ValueError: for a latent that is not enumerated or an observed site whose tokens
        cannot be masked elementwise (a Gaussian with a dense or low-rank covariance).
    """

    def __init__(self, model, args, kwargs, layout, trace=None, max_elements=DEFAULT_MAX_ELEMENTS):
        self.model = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.layout = layout
        self.max_elements = int(max_elements)
        #: ``"auto"`` (fewer eliminations), ``"probe"`` or ``"differences"``
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
            cost += _numel(torch.broadcast_shapes(tuple(fn.batch_shape), vshape))
        # evidence and the output of the contraction
        cost += self.layout.num_sequences * (self.layout.num_tokens + 1)
        return max(1, cost)

    def row_cost(self, shared=False):
        """Tensor elements one mask row needs at least (two items: :math:`O` and
        :math:`O\\cup\\{j\\}`); rows scoring more tokens need more items, which
        :meth:`__call__` chunks under ``max_elements`` itself. The same whether or not the
        row's mask is ``shared`` by all sequences (the factors span every sequence)."""
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

    def log_conditionals(self, observed):
        r"""``(B, N, T)``: :math:`\log p(x_{n,t} \mid x_{n,O_b})` for every token not in
        ``observed`` (bool ``(B, N, T)``; 0 at observed tokens), from ONE elimination per
        item: each unobserved token's factor becomes :math:`1 + t\,p(x_t \mid z)/c` and

        .. math:: p(x_t \mid x_O) = c\,\frac{\partial \log Z}{\partial t}\Big|_{t=0},
            \qquad Z(t) = \sum_z p(z, x_O) \prod_{u \notin O} (1 + t_u\,p(x_u \mid z)/c_u).

        Differentiable (double backward) when gradients are enabled."""
        layout = self.layout
        B = observed.shape[0]
        create_graph = torch.is_grad_enabled()
        store = {}
        with torch.enable_grad():
            t = torch.zeros(observed.shape, dtype=layout.dtype, device=observed.device)
            t.requires_grad_(True)
            entries = {}
            for site in layout.sites:
                mode, obs = self._to_site(site, observed)
                entries[site.name] = (mode, obs, self._to_site(site, t)[1])
            tr = self._items_trace(B, _ProbeMessenger(entries, store))
            logz = contract_evidence(tr, layout, MASK_PLATE, B)
            (grad,) = torch.autograd.grad(
                logz.sum(), t, create_graph=create_graph, allow_unused=True
            )
        if grad is None:
            grad = torch.ones_like(t)
        logc = torch.cat([self._from_site(site, store[site.name], B) for site in layout.sites], -1)
        # observed tokens have no probe (gradient 0): keep log(0) out of the graph
        out = torch.where(observed, torch.ones_like(grad), grad).log() + logc
        return torch.where(observed, out.new_zeros(()), out)

    def log_evidence(self, evidence):
        r"""``(B, N)``: :math:`\log p(x_{n, E_b})` for the evidence sets
        ``evidence`` (bool ``(B, N, T)``), by variable elimination in one traced run."""
        B = evidence.shape[0]
        tr = self._items_trace(B, _EvidenceMessenger(self._site_masks(evidence)))
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

    def __call__(self, observed, scored):
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

r"""Exact conditionals of a ``pyro.markov`` chain of discrete states by a batched, scaled
forward-backward.

When the enumerated sites of a model form one chain :math:`z_0 \to z_1 \to \dots \to
z_{S-1}` (each state depends on the previous one only, as :func:`pyro.markov` writes an HMM)
and every observed token :math:`x_t` depends on one state :math:`z_{s(t)}`, the conditionals
of every masked token of a mask row come from one forward and one backward pass. The
masked tokens' emissions are dropped (likelihood 1, which marginalises them exactly), so
with :math:`\psi_s(k) = \prod_{t \in O,\, s(t) = s} p(x_t \mid z_s = k)`, the initial
:math:`\pi` and transitions :math:`A_s`,

.. math::
    \hat\alpha_0 \propto \pi \odot \psi_0, \quad
    \hat\alpha_s = \frac{(\hat\alpha_{s-1} A_s) \odot \psi_s}{c_s}, \quad
    \hat\beta_{S-1} = 1, \quad
    \hat\beta_{s-1} = \frac{A_s (\psi_s \odot \hat\beta_s)}{c_s},

with :math:`c_s` the normaliser of :math:`\hat\alpha_s`. Then
:math:`\log p(x_O) = \sum_s \log c_s`, :math:`p(z_s = k \mid x_O) \propto
\hat\alpha_s(k)\,\hat\beta_s(k)` and, for a token :math:`j \notin O`,

.. math:: p(x_j \mid x_O) = \sum_k p(z_{s(j)} = k \mid x_O)\, p(x_j \mid z_{s(j)} = k).

The recursions run in probability space, normalised at every step (a matrix-vector product
per step, batched over mask rows and sequences), not by log-sum-exp; each step's emissions
are shifted by their largest log-likelihood first so that none underflows. Only the
:math:`S` steps loop in Python. Everything is differentiable in the model's parameters
(initial, transition and emission) by ordinary backpropagation.

These are exactly the conditionals of variable elimination
(:mod:`pyro_mpt.conditionals.elimination`) on the same factors: ratios of partial evidences,
:math:`\log p(x_j \mid x_O) = \log p(x_{O \cup \{j\}}) - \log p(x_O)`.

Reference: L. R. Rabiner, "A tutorial on hidden Markov models and selected applications in
speech recognition", Proceedings of the IEEE 77(2), 1989 (the scaled recursions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from pyro.poutine.util import site_is_subsample

from ..compat import enumerate_dim
from ..progress import logger
from ..tokens.masks import imputed_sites, is_deterministic
from .sites import site_token_log_probs

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["FB_FACTOR", "MarkovChain", "markov_chain"]

#: Distributions of enumerated sites whose parameters ``_Tables.shared`` can read.
SHARED_TYPES = (
    dist.Categorical,
    dist.OneHotCategorical,
    dist.Bernoulli,
    torch.distributions.Categorical,
    torch.distributions.OneHotCategorical,
    torch.distributions.Bernoulli,
)

#: Tensor elements one (row, sequence) pair needs per (step or token) x state, with
#: gradients (the emissions, the scaled messages both ways, the posteriors, the mixture and
#: their autograd buffers: 7.9-8.1 measured by peak RSS at N=64, T=100, C=8) and without
#: (3.7 measured).
FB_FACTOR = 8
FB_FACTOR_NO_GRAD = 4


@dataclass
class MarkovChain:
    r"""The factors of a chain of ``S`` discrete states with ``C`` values and ``T`` tokens,
    as log-probabilities, and its masked forward-backward (module docstring).

    :ivar init: ``(N|1, C)``, :math:`\log p(z_0)`.
    :ivar trans: ``(S - 1, N|1, C, C)``, :math:`\log p(z_s = k \mid z_{s-1} = k')` at
        ``[s - 1, n, k', k]``.
    :ivar emission: ``(N, T, C)``, :math:`\log p(x_t \mid z_{s(t)} = k)` (0 at absent
        tokens).
    :ivar step: ``(T,)`` long, :math:`s(t)`, the state each token depends on.
    :ivar int max_elements: memory budget of one chunk of mask rows, in tensor elements.
    """

    init: torch.Tensor
    trans: torch.Tensor
    emission: torch.Tensor
    step: torch.Tensor
    max_elements: int
    #: one token per step, in order (an HMM): the steps' emissions need no summing
    in_order: bool = field(init=False)

    def __post_init__(self):
        T = self.step.shape[0]
        steps = torch.arange(T, device=self.step.device)
        self.in_order = self.num_steps == T and bool((self.step == steps).all())

    @property
    def num_steps(self) -> int:
        return self.trans.shape[0] + 1

    def row_cost(self) -> int:
        """Tensor elements one mask row (all sequences) needs (fewer without gradients)."""
        N, T, C = self.emission.shape
        factor = FB_FACTOR if torch.is_grad_enabled() else FB_FACTOR_NO_GRAD
        return factor * N * (self.num_steps + T) * C

    def _sequences(self, start: int, stop: int) -> MarkovChain:
        """The chain of sequences ``start:stop`` (tables shared by all sequences stay)."""

        def pick(t, dim):
            return t if t.shape[dim] == 1 else t.narrow(dim, start, stop - start)

        init, trans = pick(self.init, 0), pick(self.trans, 1)
        return MarkovChain(init, trans, self.emission[start:stop], self.step, self.max_elements)

    def _map(self, fn, observed: torch.Tensor) -> torch.Tensor:
        """``fn(chain, observed piece)`` over pieces of rows and sequences under
        ``max_elements`` (all sequences at once when one row of them fits, else sequences in
        chunks, one row at a time), concatenated sequence-major: ``(N, R, ...)``.

        :raises ValueError: naming ``max_elements`` when not even one row of one sequence
            fits."""
        R, N = observed.shape[0], self.emission.shape[0]
        unit = self.row_cost() // N  # one row of one sequence
        if unit > self.max_elements:
            raise ValueError(
                f"max_elements={self.max_elements} is too small for the forward-backward of "
                f"conditionals='enumerate': one mask row of one sequence needs about {unit} "
                f"elements; pass max_elements >= {unit}"
            )
        rows = max(1, self.max_elements // (unit * N))
        seqs = min(N, self.max_elements // unit)
        msg = "pyro_mpt: forward-backward, %d row(s) of %d sequence(s) per chunk (of %d x %d)"
        logger.debug(msg, min(rows, R), seqs, R, N)
        pieces = []
        for n0 in range(0, N, seqs):  # one piece unless one row of all sequences is too big
            chain = self if seqs == N else self._sequences(n0, min(n0 + seqs, N))
            part = [fn(chain, observed[i : i + rows, n0 : n0 + seqs]) for i in range(0, R, rows)]
            pieces.append(torch.cat(part, 1))
        return torch.cat(pieces, 0)

    def _step_log_lik(self, observed: torch.Tensor) -> torch.Tensor:
        """``(N, R, S, C)``: each step's summed emission log-likelihood of the observed
        tokens (0 where none is observed: the masked tokens are marginalised)."""
        e = self.emission.unsqueeze(1)  # (N, 1, T, C)
        # torch.where, not a product: an impossible emission (-inf) times 0 would be NaN
        lik = torch.where(observed.transpose(0, 1).unsqueeze(-1), e, e.new_zeros(()))
        if self.in_order:
            return lik
        N, R, _, C = lik.shape
        return lik.new_zeros(N, R, self.num_steps, C).index_add(2, self.step, lik)

    @staticmethod
    def _transition(A: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        """``message @ A``, ``(N, R, C)``: one matrix product when ``A`` (``(N|1, C, C)``)
        is shared by the sequences, else one batched product over them (the messages are
        kept sequence-major for it)."""
        return message @ A[0] if A.shape[0] == 1 else torch.bmm(message, A)

    def _forward_backward(self, observed: torch.Tensor, need_posterior: bool) -> tuple:
        r"""``(log p(x_O) (N, R), log p(z_s | x_O) (N, R, S, C) or None)`` for the
        observed tokens ``observed`` (bool ``(R, N, T)``), by the scaled recursions."""
        L = self._step_log_lik(observed)
        # each step's emissions relative to their largest: no underflow in exp; a step whose
        # every state is impossible keeps shift 0 (its normaliser is then 0, log p = -inf)
        shift = L.detach().amax(-1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        # unbind once: indexing a step per iteration would backpropagate a full-size zero
        # tensor per step (quadratic in S)
        psi = (L - shift).exp().unbind(2)  # S x (N, R, C)
        A = self.trans.exp()
        S = len(psi)
        # a normaliser of 0 (data impossible under every state) divides as the smallest
        # positive number: the messages stay 0, not NaN, and log p(x_O) is -inf
        tiny = torch.finfo(psi[0].dtype).tiny
        alphas, norms = [], []
        alpha = self.init.exp().unsqueeze(1) * psi[0]
        forward = A.unbind(0)
        for s in range(S):  # the only Python loop: the chain's steps
            if s > 0:
                alpha = self._transition(forward[s - 1], alphas[-1]) * psi[s]
            c = alpha.sum(-1, keepdim=True)
            alphas.append(alpha / c.clamp_min(tiny))
            norms.append(c)
        log_evidence = (torch.cat(norms, -1).log() + shift.squeeze(-1)).sum(-1)
        if not need_posterior:
            return log_evidence, None
        backward = A.mT.contiguous().unbind(0)  # A_s @ m as m @ A_s^T, rows as vectors
        beta, betas = torch.ones_like(alphas[-1]), [None] * S
        for s in range(S - 1, -1, -1):
            betas[s] = beta
            if s > 0:
                beta = self._transition(backward[s - 1], psi[s] * beta) / norms[s].clamp_min(tiny)
        gamma = torch.stack(alphas, 2) * torch.stack(betas, 2)  # (N, R, S, C)
        # log of a posterior that underflowed to 0: a floor keeps inf * 0 out of the gradient
        log_post = gamma.clamp_min(tiny).log() - gamma.sum(-1, keepdim=True).clamp_min(tiny).log()
        return log_evidence, log_post

    def log_evidence(self, observed: torch.Tensor) -> torch.Tensor:
        r"""``(R, N)``: :math:`\log p(x_{n, O_r})`, the forward pass alone.

        :param observed: bool ``(R, N, T)``."""
        if observed.shape[0] == 0:
            return self.emission.new_zeros(0, self.emission.shape[0])
        out = self._map(lambda chain, obs: chain._forward_backward(obs, False)[0], observed)
        return out.transpose(0, 1)

    def _conditionals(self, observed: torch.Tensor) -> torch.Tensor:
        r"""``(N, R, T)``: every token's :math:`\log p(x_t \mid x_O)` (the observed ones'
        too, discarded by the caller)."""
        _, log_post = self._forward_backward(observed, True)
        log_post = log_post.index_select(2, self.step)  # (N, R, T, C): each token's state
        return torch.logsumexp(log_post + self.emission.unsqueeze(1), -1)

    def __call__(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        r""":param observed: bool ``(R, N, T)``, the conditioning tokens :math:`O_r`.
        :param scored: bool ``(R, N, T)``, the tokens :math:`j` to score.
        :returns: ``(R, N, T)``: :math:`\log p(x_{n,j} \mid x_{n,O_r})` where ``scored``, 0
            elsewhere; in pieces under ``max_elements``."""
        out = self._map(lambda chain, obs: chain._conditionals(obs), observed).transpose(0, 1)
        return torch.where(scored, out, out.new_zeros(()))


# ----------------------------------------------------------------------------------------
# Recognising the chain in an enumerated trace
# ----------------------------------------------------------------------------------------


class _Tables:
    """Reads log-factor tensors of an enumerated trace (enumeration dims left of the plates)
    into per-sequence tables."""

    def __init__(self, layout: TokenLayout):
        self.layout = layout
        self.P = layout.max_plate_nesting
        # the sequence dims of a table: the plates less the token plate (moved or squeezed)
        self.Pq = self.P - (1 if layout.token_plate is not None else 0)

    def shared(self, site) -> bool:
        """Whether an enumerated site's log-density is the same function of the parameters
        for every sequence: its distribution is a ``Categorical``, ``OneHotCategorical`` or
        ``Bernoulli`` (parameters shaped batch + event) whose every tensor is a broadcast
        view (stride 0) or of size 1 along the sequence plates (a transition matrix that a
        plate expanded), as is its value. Any other distribution counts as varying."""
        fn = site["fn"]
        if type(fn) not in SHARED_TYPES:
            return False
        batch = len(fn.batch_shape)
        tensors = [(site["value"], site["value"].dim() - fn.event_dim)]
        tensors += [(v, batch) for v in vars(fn).values() if torch.is_tensor(v)]
        for v, lead in tensors:  # ``lead``: where the batch dims of ``v`` end
            plates = [lead - i for i in range(1, min(self.P, batch) + 1) if lead - i >= 0]
            if v.dim() < lead or any(v.shape[d] != 1 and v.stride(d) != 0 for d in plates):
                return False
        return True

    def latent(self, site) -> torch.Tensor | None:
        """An enumerated site's log-density, ``(*enum dims, *sequence dims)``, with sequence
        dims of size 1 when it is :meth:`shared`; ``None`` when it varies along the token
        plate (one state per token is no chain of sequences)."""
        fn = site["fn"]
        shared, cached = self.shared(site), set(vars(fn))
        lp = fn.log_prob(site["value"])
        for name in set(vars(fn)) - cached:  # lazy parameters log_prob computed, full size
            delattr(fn, name)
        if self.layout.token_plate is not None:
            lp = lp.reshape((1,) * max(0, self.P - lp.dim()) + tuple(lp.shape))
            if lp.shape[self.layout.token_dim] != 1:
                return None
            lp = lp.squeeze(self.layout.token_dim)
        if shared:  # one copy, not a view that would keep the full-size tensor alive
            for k in range(1, min(self.Pq, lp.dim()) + 1):
                lp = lp.narrow(-k, 0, 1)
            lp = lp.clone(memory_format=torch.contiguous_format)
        return lp

    def depends(self, t: torch.Tensor, extra: int) -> dict:
        """``{enumeration dim: size}`` of the enumeration dims along which ``t`` varies (its
        dims left of the sequence dims and ``extra`` trailing dims)."""
        lead = t.dim() - self.Pq - extra
        return {i - lead - self.P: n for i, n in enumerate(t.shape[: max(0, lead)]) if n > 1}

    def gather(self, t: torch.Tensor, dims: list, sizes: list, extra: int) -> torch.Tensor:
        """``(N|1, *sizes, *extra)``: ``t`` with the enumeration ``dims`` (expanded to
        ``sizes``) after one sequence dim; its other enumeration dims have size 1."""
        depth = max([t.dim() - self.Pq - extra] + [-(d + self.P) for d in dims])
        t = t.reshape((1,) * (depth + self.Pq + extra - t.dim()) + tuple(t.shape))
        k = len(dims)
        t = t.movedim([depth + d + self.P for d in dims], list(range(k)))
        t = t.reshape(*t.shape[:k], *t.shape[depth:])
        seq, tail = t.shape[k : k + self.Pq], tuple(t.shape[k + self.Pq :])
        if all(n == 1 for n in seq):  # shared by the sequences: keep one copy
            t = t.expand(*sizes, *seq, *tail).reshape(*sizes, 1, *tail)
        else:
            shape = (*sizes, *self.layout.seq_shape, *tail)
            t = t.expand(shape).reshape(*sizes, self.layout.num_sequences, *tail)
        return t.movedim(list(range(k)), list(range(1, k + 1)))


def _skipped(name, site, layout, imputed) -> bool:
    """Sites that are no factor of the elimination (as in ``contract_evidence``)."""
    return (
        site["type"] != "sample"
        or site_is_subsample(site)
        or name in layout.fixed
        or name in imputed
        or is_deterministic(site)
    )


def _state_size(site, d: int) -> int:
    value, event_dim = site["value"], site["fn"].event_dim
    return int(value.shape[d - event_dim]) if value.dim() - event_dim >= -d else 1


def markov_chain(trace, layout: TokenLayout, max_elements: int) -> MarkovChain | None:
    r"""The :class:`MarkovChain` of an enumerated trace (``poutine.enum`` without particles)
    whose enumerated sites form one chain, or ``None`` when they do not (then variable
    elimination scores the model).

    A chain: every enumerated site :math:`z_s` (in trace order) has ``C`` values, sits in the
    sequence plates and its log-density varies only along its own dim and that of
    :math:`z_{s-1}`; every observed site is a factorized token site whose log-density
    varies only along the dim of the latest state (or none); no other latent.

    :param trace: the enumerated trace.
    :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout`.
    :param int max_elements: the memory budget of one chunk of mask rows.
    """
    if any(s.kind != "factorized" for s in layout.sites):
        return None
    tables, imputed = _Tables(layout), imputed_sites(trace)
    seq_plates = {f.name for s in layout.sites for f in s.frames} - {layout.token_plate}
    token_sites = {s.name: s for s in layout.sites}
    bound, states, emissions, C = {}, [], {}, None  # bound: enumeration dim -> state index
    for name, site in trace.nodes.items():
        if _skipped(name, site, layout, imputed):
            continue
        plates = {f.name for f in site["cond_indep_stack"] if f.vectorized}
        if plates - {layout.token_plate} != seq_plates:
            return None
        d = enumerate_dim(site)
        if d is not None:
            lp = tables.latent(site)
            C = C or _state_size(site, d)
            if lp is None or _state_size(site, d) != C:
                return None
            prev = [e for e in tables.depends(lp, 0) if e != d]
            if any(bound.get(e) != len(states) - 1 for e in prev) or len(prev) > 1:
                return None
            if not states:
                states.append(tables.gather(lp, [d], [C], 0))  # (N|1, C)
            elif prev:
                states.append(tables.gather(lp, [prev[0], d], [C, C], 0))  # (N|1, C, C)
            else:  # independent of the previous state: the same row for every k'
                states.append(tables.gather(lp, [d], [C], 0).unsqueeze(-2).expand(-1, C, -1))
            bound[d] = len(states) - 1
        elif site["is_observed"] and name in token_sites:
            lp = site_token_log_probs(site, layout)  # (*enum dims, *sequence dims, T_site)
            deps = list(tables.depends(lp, 1))
            if deps and (len(deps) > 1 or bound.get(deps[0]) != len(states) - 1):
                return None
            table = tables.gather(lp, deps, [C] * len(deps), 1)  # (N|1, [C,] T_site)
            table = table.movedim(1, -1) if deps else table.unsqueeze(-1)
            emissions[name] = (max(len(states) - 1, 0), table)
        else:  # a continuous latent, or an observed factor that is not a token
            return None
    if not states or len(emissions) != len(token_sites):
        return None
    return _assemble(states, emissions, layout, C, max_elements)


def _assemble(states, emissions, layout, C, max_elements) -> MarkovChain:
    """Stacks the tables of :func:`markov_chain` into a :class:`MarkovChain`."""
    N = layout.num_sequences
    emission, step = [], []
    for info in sorted(layout.sites, key=lambda s: s.offset):
        s, table = emissions[info.name]
        emission.append(table.expand(N, info.num_tokens, C))
        step.extend([s] * info.num_tokens)
    emission = torch.cat(emission, 1)
    if layout.present is not None:  # absent tokens are never observed nor scored
        emission = torch.where(layout.present.unsqueeze(-1), emission, emission.new_zeros(()))
    init = states[0]
    trans = states[1:]
    if trans:
        width = max(t.shape[0] for t in trans)
        trans = torch.stack([t.expand(width, C, C) for t in trans])
    else:
        trans = init.new_zeros(0, 1, C, C)
    step = torch.tensor(step, dtype=torch.long, device=emission.device)
    return MarkovChain(init, trans, emission, step, max_elements)

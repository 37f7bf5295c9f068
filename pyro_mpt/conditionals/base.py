r"""The interface between mask estimators and conditional backends.

A backend (:class:`Conditionals`) answers one batched question: given the conditioning tokens
:math:`O` of every mask row, what is :math:`\log p(x_j \mid x_O)` for the scored tokens
:math:`j`? It does so through a :class:`Scorer` built once per step from the model's trace,
so that all masks of a step reuse one table of particles (or one elimination plan).

The masked averages :math:`S(m)` of these conditionals sum to the log marginal likelihood
(the theory page of the docs, section 2):

.. math::
    \log p(x) = \sum_{m=1}^{T} S(m), \qquad
    S(m) = \mathbb E_{|M| = m}\Big[\tfrac{1}{m} \sum_{j \in M} \log p(x_j \mid x_{\bar M})\Big].

The particle machinery (:class:`~pyro_mpt.conditionals.particles.ParticleScorer`,
:func:`~pyro_mpt.conditionals.particles.particle_trace`, ...) lives in
:mod:`pyro_mpt.conditionals.particles` and the reading of observed sites into token kernels
in :mod:`pyro_mpt.conditionals.sites`; their names stay importable from here.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from ..tokens import TokenLayout

__all__ = ["Conditionals", "Scorer"]


class Scorer:
    r"""Scores the mask rows of one step; built by :meth:`Conditionals.scorer`.

    Masks are bool tensors ``(R, N, T)``: ``R`` mask rows, ``N`` sequences, ``T`` tokens
    (``(R, 1, T)`` where a row is shared by all sequences). ``observed`` marks the
    conditioning set :math:`O_r`, ``scored`` the tokens :math:`j` whose conditionals are
    wanted (disjoint from ``observed``; tokens in neither are marginalised).

    Example::

        log_probs = scorer(batch.observed, batch.scored)   # batch: a MaskBatch, -> (R, N, T)
    """

    #: the model's token layout (``num_sequences``, ``num_tokens``, sites, device)
    layout: TokenLayout

    #: Whether every conditional is a ratio of this scorer's own evidences,
    #: :math:`\log p(x_j \mid x_O) = \log p(x_{O\cup\{j\}}) - \log p(x_O)` with
    #: :meth:`log_evidence`, for every ``O`` and ``j``. Then the chain rule along any order
    #: telescopes exactly, :math:`\sum_k \log p(x_{\pi_k} \mid x_{\pi_{<k}}) =
    #: \log p(x_{1..T}) - \log p(x_\emptyset)`, and the engine scores a chain draw with
    #: two evidences instead of ``T`` rows. False unless a backend says so (a masked
    #: language model's predictions are not ratios of one joint).
    telescopes: ClassVar[bool] = False

    def row_cost(self, shared: bool = False) -> int:
        """Tensor elements one mask row needs, for chunking rows under a memory budget.

        :param shared: the row's mask is shared by all sequences (``(R, 1, T)``).
        """
        raise NotImplementedError

    def __call__(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        r"""The per-token conditionals of every mask row.

        :param observed: bool ``(R, N, T)``, the conditioning tokens :math:`O_r`.
        :param scored: bool ``(R, N, T)``, the tokens to score.
        :returns: ``(R, N, T)``: :math:`\log p(x_{n,t} \mid x_{n,O_r})` where ``scored``
            and 0 elsewhere.
        """
        raise NotImplementedError

    def row_scores(self, observed: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        r"""``(R, N)``: the sum over the scored tokens of each row's conditionals,

        .. math:: s_{r,n} = \sum_{j \in M_r} \log p(x_{n,j} \mid x_{n,O_r}).

        Masks may be shared by all sequences (``(R, 1, T)``); backends override this where
        the sum is cheaper than the per-token conditionals.
        """
        R, _, T = observed.shape
        N = self.layout.num_sequences
        return self(observed.expand(R, N, T), scored.expand(R, N, T)).sum(-1)

    def log_evidence(self, observed: torch.Tensor) -> torch.Tensor:
        r"""``(R, N)``: :math:`\log p(x_{n,O_r}) = \log \sum_z p(z) \prod_{t \in O_r}
        p(x_{n,t} \mid z)`, the evidence of each row's observed tokens (the others
        marginalised). The exact reference calls it with every token observed. Backends
        that can give it override this.

        :param observed: bool ``(R, N, T)``.
        """
        raise NotImplementedError(f"{type(self).__name__} gives no evidence of the observed part")


class Conditionals:
    r"""A conditional backend, looked up by :attr:`name` in
    :data:`pyro_mpt.conditionals.CONDITIONALS`.

    :meth:`scorer` runs the model as the backend needs (with particles, enumerated, on a
    grid) and returns a :class:`Scorer` giving :math:`\log p(x_j \mid x_O)` for the scored
    tokens :math:`j` of each mask row.

    Example::

        MaskedELBO(conditionals=QuadratureConditionals(num_points=40))   # an instance
        MaskedELBO(conditionals="quadrature")                             # or its name
    """

    #: the backend's name in :data:`~pyro_mpt.conditionals.CONDITIONALS`
    name: ClassVar[str | None] = None

    #: whether the backend runs the model on a batch of latent values (particles, grid
    #: points) in a plate at dim -2, so the model must broadcast over it
    draws_latents: ClassVar[bool] = False

    #: the options of :func:`~pyro_mpt.conditionals.get_conditionals` this backend is built
    #: from: option name -> keyword of the constructor
    options: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_options(cls, **options: Any) -> Conditionals:
        """The backend built from the subset of ``options`` it takes (see :attr:`options`)."""
        return cls(**{keyword: options[option] for option, keyword in cls.options.items()})

    def check(self, layout: TokenLayout, trace) -> None:
        """Raises ``ValueError`` naming the site if this backend cannot score the model.

        :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout`.
        :param trace: a plain trace of the model (:class:`pyro.poutine.Trace`).
        """

    def scorer(self, model, args: tuple, kwargs: dict, layout: TokenLayout, trace) -> Scorer:
        """The :class:`~pyro_mpt.conditionals.base.Scorer` of one step.

        :param model: the Pyro model; ``args`` and ``kwargs`` are passed to it.
        :param layout: the model's :class:`~pyro_mpt.tokens.TokenLayout`.
        :param trace: a plain trace of the model, already run.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# Names that lived here before the particle machinery moved out; importable from here still.
_MOVED = {
    "DEFAULT_CUDA_MAX_ELEMENTS": "pyro_mpt.options",
    "DEFAULT_MAX_ELEMENTS": "pyro_mpt.options",
    "resolve_max_elements": "pyro_mpt.options",
    "ParticleScorer": "pyro_mpt.conditionals.particles",
    "PerTokenLatent": "pyro_mpt.conditionals.particles",
    "combine_log_weights": "pyro_mpt.conditionals.particles",
    "enumerated_dims": "pyro_mpt.conditionals.particles",
    "flatten_particles": "pyro_mpt.conditionals.particles",
    "latent_log_prob": "pyro_mpt.conditionals.particles",
    "particle_shape": "pyro_mpt.conditionals.particles",
    "particle_trace": "pyro_mpt.conditionals.particles",
    "_SetValues": "pyro_mpt.conditionals.particles",
    "build_kernels": "pyro_mpt.conditionals.sites",
    "site_token_log_probs": "pyro_mpt.conditionals.sites",
}


def __getattr__(name: str):
    # Re-exports, resolved on first use: the modules that define them import this one.
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_MOVED))

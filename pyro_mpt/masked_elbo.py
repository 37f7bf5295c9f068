r"""``MaskedELBO``: masked self-supervision as a guide-free Pyro objective.

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520; E. Fong, C. Holmes, "On the marginal
likelihood and cross-validation", Biometrika 107(2), 2020.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyro.poutine as poutine
import torch
from pyro.infer import ELBO

from .engine import MPTEstimate, MPTOptions, prepare, score, summarize
from .options import check_bool, check_positive_int, renamed_keyword, resolve_max_elements
from .particle_error import degenerate, particle_terms
from .tokens.checks import (
    check_bounds,
    check_draws_memory,
    check_plate_options,
    forget_new_params_on_error,
    model_errors,
    nonfinite_sites,
)

if TYPE_CHECKING:
    from .estimators import MaskEstimator

__all__ = ["MaskedELBO"]


class MaskedELBO(ELBO):
    r"""Trains a Pyro model by masked pre-training (MPT), scored cumulatively over every
    mask size so that the objective's expectation is the log marginal likelihood.

    For a sequence :math:`x = (x_1, \dots, x_T)`, a mask :math:`M` of :math:`m` tokens and
    :math:`O` the others, the masked score is
    :math:`s(M) = \frac1m \sum_{j\in M}\log p(x_j \mid x_O)` and
    :math:`S(m) = \mathbb E_{|M| = m}[s(M)]`. Moreno-Muñoz et al. (2023) prove

    .. math:: \log p(x) = \sum_{m=1}^{T} S(m).

    The loss is :math:`-\sum_n \widehat{\log p}(x_n)`, on the scale of
    :class:`~pyro.infer.Trace_ELBO` (plate subsampling scales it as Pyro does), where the
    estimate is

    - ``"stratified"`` (default, the paper's): one uniform mask per size,
      :math:`\sum_m s(M_m)`;
    - ``"uniform"``: :math:`m \sim \mathcal U\{1..T\}`, :math:`T\,s(M)`;
    - ``"chain"``: one random order, :math:`\sum_i \log p(x_{\pi_i}\mid x_{\pi_{<i}})`; zero
      variance with exact conditionals;
    - ``"fixed"``: BERT's fixed rate, :math:`T\,s(M)` with :math:`m = \mathrm{round}(rT)`;
      **biased**: its expectation is :math:`T S(m) \ne \log p(x)`.

    With exact conditionals (``"gaussian"``, ``"enumerate"``) the unbiased estimators and
    their gradients are unbiased for :math:`\log p(x)` and its gradient. ``"importance"``
    (self-normalised, prior draws) is consistent as ``num_samples`` grows, and
    ``"quadrature"`` exact up to the grid's error. The conditionals
    :math:`\log p(x_j \mid x_O)` come from a backend of :mod:`pyro_mpt.conditionals`.

    The guide is ignored (pass ``None``): every latent is integrated by the backend. A
    guide that could do something (anything but ``None`` or a function that refers to no
    name, such as ``def guide(*args): pass``) is warned about once per ``MaskedELBO``: it is
    never run, so its parameters are never created. A trained guide can still serve as the
    particles' proposal, by an explicit opt-in:
    ``conditionals=ImportanceConditionals(proposal=guide)``
    (:mod:`~pyro_mpt.conditionals.proposal`).

    Data must be torch tensors (NumPy arrays and lists are refused with a ``TypeError``,
    as Pyro's ELBOs need tensors too); continuous sites need float32 or float64 data, and
    float32 data with float64 parameters are scored in float64. A loss that is not finite
    is returned with a ``UserWarning`` naming the observed sites whose log-density is not
    finite (as Pyro's ELBOs warn through ``warn_if_nan``).

    Example::

        from pyro.infer import SVI
        from pyro.optim import Adam
        from pyro_mpt import MaskedELBO
        from pyro_mpt.models import ppca_collapsed

        svi = SVI(lambda X: ppca_collapsed(X, 2), None, Adam({"lr": 0.05}),
                  loss=MaskedELBO(estimator="stratified"))
        for _ in range(200):
            svi.step(X)

    :param str estimator: ``"stratified"``, ``"uniform"``, ``"chain"`` or ``"fixed"`` (see
        :data:`pyro_mpt.estimators.ESTIMATORS`), or a
        :class:`~pyro_mpt.estimators.MaskEstimator`.
    :param float mask_rate: the rate of ``"fixed"``, in :math:`(0, 1]`. Default 0.15.
    :param int num_masks: independent draws averaged per step (variance / ``num_masks``);
        passed to Pyro's :class:`~pyro.infer.ELBO` as its ``num_particles`` (Pyro's meaning:
        independent estimates averaged).
    :param int num_samples: prior draws for ``"importance"`` conditionals.
    :param str conditionals: ``"auto"`` (default), ``"gaussian"``, ``"enumerate"``,
        ``"linear_gaussian"``, ``"importance"`` or ``"quadrature"``, or a
        :class:`~pyro_mpt.conditionals.Conditionals`.
    :param str token_plate: mask along this plate (its elements are the tokens of one
        sequence) instead of along event elements. Needed when a global latent couples
        the data points.
    :param int max_plate_nesting: the model's plate depth; found by tracing if omitted.
    :param int quadrature_points: grid points per latent dimension (``"quadrature"``).
    :param tuple quadrature_bounds: ``(low, high)`` of each grid axis.
    :param int max_elements: memory budget, in tensor elements, of one chunk of masks
        and, for ``"importance"`` and ``"quadrature"``, of one chunk of particles
        (:mod:`~pyro_mpt.conditionals.chunked`; a budget below one particle over every
        sequence is refused); default (``None``) ``2**24`` on the CPU and ``2**28`` on a
        GPU. It bounds each chunk: under autograd the graph of every chunk is kept.
    :param bool share_masks: give every sequence of a step the same masks (default
        ``False``: masks are drawn independently per sequence). Still unbiased, but the
        sequences' errors become correlated; the low-rank Gaussian backend then scores a
        mask for all sequences by matrix products, much faster for long sequences.
    :param str masks: ``"auto"``, ``"independent"``, ``"nested"`` or ``"affine"`` masks of
        the stratified estimator (see :class:`~pyro_mpt.estimators.StratifiedEstimator`);
        ``None``: the estimator's own (``"auto"``: affine, or independent for ragged
        sequences).
    :param int num_particles: deprecated old name of ``num_samples``.
    :param bool vectorize_particles: Pyro's keyword; accepted and always in effect: the
        ``num_masks`` draws (Pyro's particles) are scored as one batched tensor expression
        (chunked to ``max_elements``), never in a Python loop, so ``False`` gives the same
        draws. The model needs no extra particle plate (``max_plate_nesting`` unchanged).
    :param bool retain_graph: Pyro's meaning: keep the autograd graph after the backward
        pass of :meth:`loss_and_grads` (default ``None``: freed), e.g. when the model uses
        a tensor computed once from parameters outside it.
    :param bool ignore_jit_warnings: Pyro's keyword of its ``JitTrace_*`` ELBOs; there is no
        JIT variant of ``MaskedELBO`` (nothing is traced by ``torch.jit``), so there is no
        warning to ignore and the flag has no effect.
    :param dict jit_options: refused unless ``None``: there is no JIT variant of
        ``MaskedELBO`` for the options to reach.

    .. note:: Names against Pyro's. Pyro's ``num_particles`` (independent estimates
        averaged per step) is ``num_masks`` here, and ``elbo.num_particles`` reads it.
        ``num_samples`` is something Pyro's ELBOs lack: the prior draws inside the
        ``"importance"`` conditionals for one conditional :math:`\log p(x_j \mid x_O)`
        (a self-normalised estimate; its bias falls as ``num_samples`` grows), not the
        number of estimates averaged.
    """

    def __init__(
        self,
        estimator: str | MaskEstimator = "stratified",
        mask_rate: float = 0.15,
        num_masks: int = 1,
        num_samples: int = 256,
        conditionals: str = "auto",
        token_plate: str | None = None,
        max_plate_nesting: float = float("inf"),
        quadrature_points: int = 20,
        quadrature_bounds: tuple[float, float] = (-5.0, 5.0),
        max_elements: int | None = None,
        share_masks: bool = False,
        masks: str | None = None,
        num_particles: int | None = None,
        vectorize_particles: bool = False,
        retain_graph: bool | None = None,
        ignore_jit_warnings: bool = False,
        jit_options: dict | None = None,
    ) -> None:
        _check_pyro_keywords(vectorize_particles, retain_graph, ignore_jit_warnings, jit_options)
        if num_particles is not None:
            check_positive_int("num_particles", num_particles)
        num_samples = renamed_keyword(
            "MaskedELBO", "num_particles", "num_samples", num_particles, num_samples, 256
        )
        check_plate_options(token_plate, max_plate_nesting)
        quadrature_bounds = check_bounds(quadrature_bounds)
        self.options = MPTOptions(
            estimator=estimator,
            mask_rate=mask_rate,
            num_masks=num_masks,
            num_samples=num_samples,
            conditionals=conditionals,
            token_plate=token_plate,
            max_plate_nesting=max_plate_nesting,
            quadrature_points=quadrature_points,
            quadrature_bounds=quadrature_bounds,
            max_elements=max_elements,
            share_masks=share_masks,
            masks=masks,
        )
        super().__init__(
            num_particles=self.options.num_masks,
            max_plate_nesting=max_plate_nesting,
            retain_graph=retain_graph,
            ignore_jit_warnings=ignore_jit_warnings,
        )
        # set after Pyro's __init__, which would add a particle plate to max_plate_nesting
        self.vectorize_particles = bool(vectorize_particles)

    @property
    def estimator(self) -> MaskEstimator:
        """The :class:`~pyro_mpt.estimators.MaskEstimator` in use."""
        return self.options.estimator

    def estimate(
        self, model: Callable, guide: Callable | None, *args: Any, **kwargs: Any
    ) -> MPTEstimate:
        r"""The masked estimate of :math:`\sum_n \log p(x_n)` with its draws and standard
        error, differentiable in the model's parameters.

        With importance conditionals the standard error includes the particles' error
        (:mod:`pyro_mpt.particle_error`); the training losses skip that extra work.

        :returns: :class:`~pyro_mpt.engine.MPTEstimate`.
        """
        return self._checked_estimate(model, guide, args, kwargs, errors=True)

    def _checked_estimate(self, model, guide, args, kwargs, errors):
        self._warn_guide(guide)
        with forget_new_params_on_error():
            estimate = self._estimate(model, args, kwargs, errors)
        if not torch.isfinite(estimate.total.detach()):
            _warn_nonfinite(estimate.total, model, args, kwargs)
        return estimate

    def _estimate(self, model, args, kwargs, errors=True):
        opts = self.options
        with model_errors(args, kwargs):
            layout, scorer, backend = prepare(model, args, kwargs, opts)
        budget = resolve_max_elements(opts.max_elements, layout.device)
        check_draws_memory("num_masks", opts.num_masks, layout.num_sequences, budget, layout.dtype)
        with model_errors(args, kwargs):
            draws, _ = score(
                layout,
                scorer,
                opts.estimator,
                opts.num_masks,
                max_elements=opts.max_elements,
                share_masks=opts.share_masks,
            )
            # the particles' error, which the masks' spread does not see
            particle_var, ess = (None, None)
            if errors:
                particle_var, ess = particle_terms(scorer, backend, layout, opts)
        estimate = summarize(draws, layout, opts.estimator, backend, opts.share_masks, particle_var)
        estimate.particle_ess = ess
        estimate.reliable = not degenerate(ess)
        estimate.num_tokens = layout.num_tokens
        return estimate

    def _warn_guide(self, guide):
        if _is_inert(guide) or getattr(self, "_guide_warned", False):
            return
        self._guide_warned = True
        warnings.warn(
            f"MaskedELBO ignores the guide {getattr(guide, '__name__', type(guide).__name__)}: "
            "it is never run and its parameters are never created (every latent is "
            "integrated by the conditionals); pass guide=None, e.g. SVI(model, None, ...). To "
            "draw the particles from a trained guide, opt in with conditionals="
            "ImportanceConditionals(proposal=guide) (or SMCConditionals(proposal=guide))",
            UserWarning,
            stacklevel=4,
        )

    def _get_trace(self, model, guide, args, kwargs):
        """The model's trace and an empty guide trace: MaskedELBO runs no guide."""
        return poutine.trace(model).get_trace(*args, **kwargs), poutine.Trace()

    def differentiable_loss(
        self, model: Callable, guide: Callable | None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Minus the masked estimate of :math:`\\sum_n \\log p(x_n)`, as a tensor."""
        return -self._checked_estimate(model, guide, args, kwargs, errors=False).total

    def loss(self, model: Callable, guide: Callable | None, *args: Any, **kwargs: Any) -> float:
        """The loss as a float, without gradients."""
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(
        self, model: Callable, guide: Callable | None, *args: Any, **kwargs: Any
    ) -> float:
        """The loss as a float; backpropagates it into the model's parameters."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return loss.item()

    def __repr__(self):
        o = self.options
        return (
            f"MaskedELBO(estimator={o.estimator.name!r}, num_masks={o.num_masks}, "
            f"conditionals={o.conditionals!r}, token_plate={o.token_plate!r})"
        )


def _check_pyro_keywords(vectorize_particles, retain_graph, ignore_jit_warnings, jit_options):
    """Pyro's ELBO keywords: bools as Pyro takes them; ``jit_options`` refused."""
    check_bool("vectorize_particles", vectorize_particles)
    check_bool("retain_graph", retain_graph, allow_none=True)
    check_bool("ignore_jit_warnings", ignore_jit_warnings)
    if jit_options is not None:
        raise ValueError(
            f"MaskedELBO: jit_options={jit_options!r}, but MaskedELBO has no JIT variant "
            "(it is not traced by torch.jit, so the options would reach nothing); drop "
            "jit_options"
        )


def _is_inert(guide) -> bool:
    """``None``, or a plain function that refers to no global, attribute or closure
    variable (``def guide(*args): pass``), so cannot sample or create a parameter."""
    if guide is None:
        return True
    code = getattr(guide, "__code__", None)
    return (
        isinstance(guide, types.FunctionType)
        and not code.co_names
        and not code.co_freevars
        and not any(isinstance(c, types.CodeType) for c in code.co_consts)
    )


def _warn_nonfinite(total, model, args, kwargs):
    """Warns that the masked estimate is not finite, naming the observed sites whose
    log-density is not finite (in one trace of the model) when there are any."""
    sites = nonfinite_sites(model, args, kwargs)
    where = (
        f"the observed site(s) {', '.join(sites)} have a non-finite log-density"
        if sites
        else "every observed site's log-density is finite in one trace of the model, so a "
        "conditional is not (too few num_samples, or a parameter out of range?)"
    )
    warnings.warn(
        f"MaskedELBO: the masked estimate of log p(x) is {float(total)}: {where}",
        UserWarning,
        stacklevel=4,
    )

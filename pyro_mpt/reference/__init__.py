r"""Reference log marginal likelihoods: the number a masked estimate is checked against.

:func:`log_marginal_likelihood` returns :math:`\log p(X) = \sum_n \log p(x_n)` of a Pyro
model and data, per sequence (the sequences of :mod:`pyro_mpt.tokens`), by one of the
methods in :data:`METHODS`, one module each:

- ``"exact"`` (:mod:`~pyro_mpt.reference.exact`): observed sites without latents, and
  discrete latents marked ``infer={"enumerate": "parallel"}`` summed out exactly;
- ``"importance"`` (:mod:`~pyro_mpt.reference.importance`): per-sequence importance
  sampling with the prior or a guide as proposal,
  :math:`\log p(x_n) \approx \log \frac1S \sum_s w_{s,n}`, with standard errors, ESS and
  Pareto :math:`\hat k`;
- ``"quadrature"`` (:mod:`~pyro_mpt.reference.quadrature`): a midpoint grid of
  :math:`G^d` points over the continuous latents (:math:`d \le 3` per sequence);
- ``"gaussian"`` (:mod:`~pyro_mpt.reference.gaussian`): linear-Gaussian models (normal
  latents with means affine in their parents and scales free of latents, normal
  observations likewise), their tokens' joint Gaussian computed exactly;
- ``"smc"`` (:mod:`~pyro_mpt.reference.smc`): independent data-annealed SMC runs per
  sequence, standard error over the runs;
- ``"smc_importance"`` (:mod:`~pyro_mpt.reference.smc_importance`): short SMC sweeps whose
  final clouds are fitted by Student-t proposals, then importance sampling from their
  mixture (k-hat, ESS and a delta-method standard error as for ``"importance"``);
- ``"conjugate"`` (:mod:`~pyro_mpt.reference.conjugate`): one conjugate latent and its
  tokens (Beta-Bernoulli/Binomial, Dirichlet-Categorical, Gamma-Poisson/Exponential),
  integrated in closed form;
- ``"auto"``: ``"exact"`` when every latent is enumerated (or there is none),
  ``"conjugate"`` for one conjugate latent, ``"gaussian"`` for a linear-Gaussian model,
  otherwise ``"importance"``, escalating to ``"smc_importance"`` when importance fails its
  diagnostics and to ``"smc"`` when that fails too
  (:func:`~pyro_mpt.reference.smc.auto_ladder`; the messages say which rung answered).

A method is a function ``(problem, options, messages) -> LMLEstimate``
(:class:`~pyro_mpt.reference.problem.Problem`,
:class:`~pyro_mpt.reference.problem.ReferenceOptions`, a list of messages to extend); a new
one is a module registered with :func:`register_method`. The sampling methods stream their
particles in chunks of bounded memory (:mod:`~pyro_mpt.reference.streaming`), optionally
compiled (:mod:`~pyro_mpt.reference.compile`).

Reference: P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the
Marginal Likelihood", NeurIPS 2023, arXiv:2306.00520.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..conditionals.conjugate import detect_conjugate
from ..conditionals.linear_gaussian import detect_linear_gaussian
from ..conditionals.probe import probe_particles
from ..options import check_choice, renamed_keyword, resolve_max_elements
from ..progress import logger
from ..tokens import read_layout
from ..tokens.checks import forget_new_params_on_error, trace_model
from ..tokens.dependencies import check_semantics
from ..tokens.subsample import replay_subsample, subsample_message
from .conjugate import conjugate_reference
from .exact import exact_reference
from .gaussian import gaussian_reference
from .importance import importance_reference
from .problem import Problem, ReferenceOptions, check_options
from .quadrature import quadrature_reference
from .result import LMLEstimate
from .smc import auto_ladder, smc_reference
from .smc_importance import smc_importance_reference

__all__ = [
    "LMLEstimate",
    "METHODS",
    "Problem",
    "ReferenceOptions",
    "log_marginal_likelihood",
    "register_method",
]

#: The methods of :func:`log_marginal_likelihood`, by name (``"auto"`` chooses among them).
METHODS: dict[str, Callable] = {
    "conjugate": conjugate_reference,
    "exact": exact_reference,
    "gaussian": gaussian_reference,
    "importance": importance_reference,
    "quadrature": quadrature_reference,
    "smc": smc_reference,
    "smc_importance": smc_importance_reference,
}

_DEFAULT_NUM_SAMPLES = 4096


def register_method(name: str, method: Callable) -> None:
    """Adds ``method`` (``(problem, options, messages) -> LMLEstimate``) as
    ``log_marginal_likelihood(..., method=name)``.

    :raises ValueError: for ``"auto"`` or a name already registered."""
    if not isinstance(name, str) or name == "auto" or name in METHODS:
        raise ValueError(f"method name {name!r} is taken or invalid; taken: {_valid_methods()}")
    METHODS[name] = method


def _valid_methods() -> list:
    return ["auto", *METHODS]


def _choose_auto(problem, messages, max_elements=None) -> str:
    """``"exact"`` when every latent is enumerated (or there is none), ``"conjugate"`` for one
    conjugate latent, ``"gaussian"`` for a linear-Gaussian model, else ``"importance"``; says why in ``messages``."""
    continuous, layout = problem.continuous, problem.layout
    if continuous:
        why = "not linear-Gaussian: it mixes enumerated and continuous latents"
        if not layout.enumerated:
            kernel, conjugate_why = detect_conjugate(
                problem.model, problem.args, problem.kwargs, layout, problem.trace
            )
            if kernel is not None:
                messages.append(f"method='auto' chose 'conjugate': {conjugate_why}")
                return "conjugate"
            logger.info("method='auto': %s", conjugate_why)
            budget = resolve_max_elements(max_elements, layout.device)
            compiled, why = detect_linear_gaussian(
                problem.model, problem.args, problem.kwargs, layout, problem.trace, budget
            )
            if compiled is not None:
                messages.append(f"method='auto' chose 'gaussian': {why}")
                return "gaussian"
        messages.append(
            f"method='auto' chose 'importance': the latent site(s) {continuous} are not "
            f"enumerated and the model is {why}, so no exact value is available"
        )
        if layout.enumerated:  # mixed latents: draws of the continuous ones only
            messages.append(
                f"importance: the enumerated site(s) {layout.enumerated} are summed out "
                "exactly for each draw of the others (variable elimination per draw)"
            )
        return "importance"
    why = (
        "the model has no latent sites"
        if not layout.latents
        else f"every latent site ({layout.enumerated}) is enumerated"
    )
    messages.append(f"method='auto' chose 'exact': {why}")
    return "exact"


def log_marginal_likelihood(
    model: Callable,
    *args: Any,
    method: str = "auto",
    num_samples: int = _DEFAULT_NUM_SAMPLES,
    guide: Callable | None = None,
    chunk_size: int | None = None,
    token_plate: str | None = None,
    max_plate_nesting: float = float("inf"),
    quadrature_points: int = 20,
    quadrature_bounds: tuple[float, float] = (-5.0, 5.0),
    max_elements: int | None = None,
    progress: bool | None = None,
    compile: bool | str | None = None,
    num_particles: int | None = None,
    **kwargs: Any,
) -> LMLEstimate:
    r"""A reference :math:`\log p(X) = \sum_n \log p(x_n)` of a Pyro model and its data, per
    sequence, with its Monte Carlo standard error and, for importance sampling, the effective
    sample size and Pareto :math:`\hat k` of each sequence's weights (see
    :mod:`pyro_mpt.reference.importance` for the estimators and their error).

    Example::

        from pyro.infer import SVI, Trace_ELBO
        from pyro.infer.autoguide import AutoNormal
        from pyro_mpt.reference import log_marginal_likelihood

        ref = log_marginal_likelihood(model, X)                   # exact, or prior IS
        guide = AutoNormal(model)                                 # a better proposal
        ...  # train guide with SVI(model, guide, optim, Trace_ELBO())
        ref = log_marginal_likelihood(model, X, guide=guide, num_samples=100_000)
        print(ref)            # says NOT TRUSTWORTHY when k-hat or the ESS fail

    The estimate is a reference, not an objective: importance and quadrature run under
    :func:`torch.no_grad` (``"exact"`` stays differentiable). Distribution argument
    validation runs on the first trace of the model only, not on every chunk. Every option
    is checked before the model is run.

    :param model: a Pyro model; ``*args`` and ``**kwargs`` are passed to it (so they must
        not use the keyword names below).
    :param str method: ``"auto"`` (default: exact where possible, else importance, else
        ``"smc_importance"`` when importance fails its diagnostics, else SMC), or a name in
        :data:`METHODS`:
        ``"conjugate"``, ``"exact"``, ``"gaussian"``, ``"importance"``, ``"quadrature"``,
        ``"smc"``, ``"smc_importance"``.
    :param int num_samples: :math:`S`, draws per sequence for importance sampling.
    :param guide: a proposal for ``"importance"`` and ``"smc"`` (e.g. an
        :class:`~pyro.infer.autoguide.AutoNormal` trained by SVI) sampling exactly the
        model's continuous latent sites, inside the sequence plates; the prior if ``None``.
        SMC starts from its draws (a quarter from the prior, defensively) weighted by
        :math:`p(z)/\tilde q(z)` (:mod:`pyro_mpt.conditionals.proposal`).
    :param int chunk_size: particles per chunk; by default as many as ``max_elements``
        allows.
    :param str token_plate: mask along this plate (see :func:`pyro_mpt.tokens.read_layout`):
        its elements are the tokens of one sequence; needed when a global latent couples
        the data points.
    :param int max_plate_nesting: the model's plate depth; found by tracing if omitted.
    :param int quadrature_points: :math:`G`, grid points per latent dimension.
    :param tuple quadrature_bounds: ``(low, high)`` of every grid axis, on the unconstrained
        scale of each latent's support (log of a positive latent, logit of a probability).
    :param int max_elements: memory budget of one chunk (of the enumeration, for
        ``"exact"``), in elements of its largest tensor (for the streamed methods,
        :data:`~pyro_mpt.reference.streaming.REFERENCE_CHUNK_FACTOR` times it); by default
        :func:`pyro_mpt.options.resolve_max_elements` of the data's device.
    :param bool progress: a tqdm bar over the chunks; by default shown when there is more
        than one chunk and stderr is a terminal.
    :param compile: ``None`` (default: ``"graph"`` on CUDA when :math:`S N T \ge 10^{12}`,
        else off), ``False``, ``True`` or ``"graph"`` (capture each chunk, model included,
        and compile it; later calls with the same model and arguments reuse the graph), or
        ``"log_prob"`` (compile the observed sites' log-densities only); see
        :mod:`pyro_mpt.reference.compile`. Any failure falls back to eager evaluation with
        a message.
    :param int num_particles: deprecated name of ``num_samples``.
    :returns: an :class:`LMLEstimate`.
    :raises ValueError: for an unknown ``method``, bad sizes, a model ``"exact"`` or
        ``"quadrature"`` cannot handle, or a guide that does not match the model.
    :raises TypeError: for an option of the wrong kind (``progress="yes"``), or data that
        are not torch tensors of a dtype the sites can score (NumPy arrays and lists are
        refused, as by Pyro's ELBOs: pass ``torch.as_tensor(data)``).

    A failing call leaves the param store as it found it. float32 data are scored in
    float64 by ``"exact"`` (see :mod:`~pyro_mpt.reference.exact`); importance sampling
    with continuous latents and fewer than 100 draws is flagged not trustworthy.

    :warns UserWarning: when importance sampling is unreliable for some sequence
        (:math:`\hat k` above the threshold, or a small ESS) or a quadrature grid cuts
        off posterior mass.
    """
    num_samples = renamed_keyword(
        "log_marginal_likelihood",
        "num_particles",
        "num_samples",
        num_particles,
        num_samples,
        _DEFAULT_NUM_SAMPLES,
    )
    method = check_choice("method", method, _valid_methods())
    options = check_options(
        num_samples=num_samples,
        guide=guide,
        chunk_size=chunk_size,
        quadrature_points=quadrature_points,
        quadrature_bounds=quadrature_bounds,
        max_elements=max_elements,
        progress=progress,
        compile=compile,
        token_plate=token_plate,
        max_plate_nesting=max_plate_nesting,
    )
    with forget_new_params_on_error():
        trace = trace_model(model, args, kwargs)
        model = replay_subsample(model, trace)  # one subsample per call, in every trace
        layout = read_layout(trace, token_plate=token_plate, max_plate_nesting=max_plate_nesting)
        problem = Problem(model, tuple(args), dict(kwargs), trace, layout)
        messages = [m for m in [subsample_message(trace)] if m]
        check_semantics(model, problem.args, problem.kwargs, trace, layout)
        if guide is not None:  # the guide's subsampled plates take the model's indices
            options = dataclasses.replace(options, guide=replay_subsample(guide, trace))
        auto = method == "auto"
        if auto:
            method = _choose_auto(problem, messages, options.max_elements)
        if problem.continuous and method in ("importance", "quadrature", "smc", "smc_importance"):
            # particles will be drawn: a model not vectorised over them fails now, clearly
            probe_particles(model, problem.args, problem.kwargs, layout, trace)
        if guide is not None and method not in ("importance", "smc"):
            messages.append(f"guide ignored: method={method!r} does not sample from a proposal")
        logger.info("log_marginal_likelihood: method %r", method)
        if auto and method == "importance":  # escalates if importance fails
            return auto_ladder(problem, options, messages)
        return METHODS[method](problem, options, messages)

r"""The exact reference: :math:`\log p(x_n)` without sampling error, for observed sites
without latents (their log-density, Gaussians with a dense or low-rank covariance
included) and for discrete latents marked ``infer={"enumerate": "parallel"}``, summed out
exactly (enumeration of the joint support, or variable elimination for Markov chains:
:mod:`pyro_mpt.conditionals.elimination`). Differentiable: it runs with gradients.

Data of a lower precision than float64 (float32) are scored in float64 and the result cast
back: the model is run again with its floating arguments and ``pyro.param`` values cast to
float64 (float32 arithmetic loses tens of nats on an ill-conditioned covariance). A model
that cannot run in float64 is scored in its own dtype, with a message saying so. A value
that is not finite is flagged, naming the observed sites whose log-density is not finite.
"""

from __future__ import annotations

import torch
from pyro.poutine.messenger import Messenger

from ..conditionals.base import ParticleScorer
from ..conditionals.enumerate import EnumerateConditionals
from ..options import resolve_max_elements
from ..tokens import read_layout
from ..tokens.checks import nonfinite_sites, trace_model
from .problem import Problem
from .result import LMLEstimate, fixed_estimate, flag_unreliable
from .sampler import masked_log_prob, per_sequence

__all__ = ["exact_reference"]


def _cannot_integrate(problem):
    continuous = problem.continuous
    nodes = problem.trace.nodes
    discrete = [n for n in continuous if nodes[n]["fn"].support.is_discrete]
    hint = (
        f" The discrete site(s) {discrete} can be summed out exactly: mark them "
        "infer={'enumerate': 'parallel'}."
        if discrete
        else ""
    )
    return ValueError(
        f"method='exact' cannot integrate the latent site(s) {continuous}: it covers "
        "observed sites without latents (Gaussians included) and discrete latents marked "
        "infer={'enumerate': 'parallel'}." + hint + " Use method='importance' (any model; "
        "pass a trained guide for a better proposal) or method='quadrature' (latent "
        "dimension <= 3 per sequence), or integrate the latent out in the model (as "
        "pyro_mpt.models.ppca_collapsed does)"
    )


def _exact_per_sequence(problem, max_elements, messages):
    layout, trace = problem.layout, problem.trace
    if not layout.latents:
        per_seq = 0.0
        for info in layout.sites:
            lp = masked_log_prob(trace.nodes[info.name])
            per_seq = per_seq + per_sequence(lp, layout, 1, info.name)[0]
        messages.append("exact: the model's log-density (no latent sites)")
        return per_seq
    budget = resolve_max_elements(max_elements, layout.device)
    scorer = EnumerateConditionals(budget).scorer(
        problem.model, problem.args, problem.kwargs, layout, trace
    )
    observed = layout.present_tokens().unsqueeze(0)  # masked-out tokens marginalised
    if isinstance(scorer, ParticleScorer):
        messages.append(
            f"exact: enumeration of the joint support of {layout.enumerated} "
            f"({scorer.num_particles} configurations)"
        )
    else:
        messages.append(
            f"exact: variable elimination over the enumerated sites {layout.enumerated}"
        )
    return scorer.log_evidence(observed)[0]


class _ParamsToFloat64(Messenger):
    """Casts the value of every floating ``pyro.param`` to float64 (the store is untouched;
    the cast is differentiable)."""

    def _pyro_post_param(self, msg):
        value = msg["value"]
        if torch.is_tensor(value) and value.is_floating_point():
            msg["value"] = value.to(torch.float64)


def _to_float64(x):
    return x.to(torch.float64) if torch.is_tensor(x) and x.is_floating_point() else x


def _float64_problem(problem) -> Problem:
    """The problem with its floating arguments and parameters in float64."""
    model = _ParamsToFloat64()(problem.model)
    args = tuple(_to_float64(a) for a in problem.args)
    kwargs = {k: _to_float64(v) for k, v in problem.kwargs.items()}
    layout = problem.layout
    trace = trace_model(model, args, kwargs)
    layout64 = read_layout(
        trace, token_plate=layout.token_plate, max_plate_nesting=layout.max_plate_nesting
    )
    return Problem(model, args, kwargs, trace, layout64)


def _low_precision_per_sequence(problem, max_elements, messages):
    """The exact values of float32 (or coarser) data, computed in float64 if the model
    runs in float64, and cast back."""
    dtype = problem.layout.dtype
    try:
        problem64 = _float64_problem(problem)
        per_seq = _exact_per_sequence(problem64, max_elements, messages).to(dtype)
    except (RuntimeError, TypeError, ValueError) as e:
        messages.append(
            f"exact: computed in {dtype}: the model failed in float64 ({str(e).splitlines()[0]});"
            " an ill-conditioned covariance may lose precision in this dtype"
        )
        return _exact_per_sequence(problem, max_elements, messages)
    messages.append(f"exact: computed in float64 from the {dtype} data, then cast back")
    return per_seq


def exact_reference(problem, options, messages) -> LMLEstimate:
    """The exact :math:`\\log p(x_n)` of each sequence.

    :raises ValueError: for a model with a latent that is not enumerated, saying which
        methods can handle it."""
    if problem.continuous:
        raise _cannot_integrate(problem)
    layout = problem.layout
    if layout.dtype in (torch.float32, torch.float16, torch.bfloat16):
        per_seq = _low_precision_per_sequence(problem, options.max_elements, messages)
    else:
        per_seq = _exact_per_sequence(problem, options.max_elements, messages)
    estimate = fixed_estimate(per_seq, layout.scale, "exact", messages, layout.device)
    if not torch.isfinite(estimate.total.detach()):
        sites = nonfinite_sites(problem.model, problem.args, problem.kwargs)
        estimate.trustworthy = flag_unreliable(
            messages,
            f"the exact log p(X) is {float(estimate.total)}: "
            + (
                f"the observed site(s) {', '.join(sites)} have a non-finite log-density"
                if sites
                else "a sequence has probability zero (or NaN) under the model"
            ),
        )
    return estimate

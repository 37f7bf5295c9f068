r"""Subsampled plates: the indices are drawn once per call and replayed in every trace.

``pyro.plate("data", 200, subsample_size=32)`` draws fresh indices each time the model runs.
pyro_mpt runs a model several times per call (a plain trace, then particle or enumerated
traces), so it draws the indices in its first trace and replays them in all the others, as
Pyro's ELBOs replay the guide's subsample in the model. The estimate is then that of the
subsample, scaled as Pyro scales it,

.. math:: \frac{N}{B} \sum_{n \in \text{batch}} \log p(x_n),

an unbiased estimate of :math:`\log p(x_{1..N})` over the subsample's draw, never the
exact value for the full data.
"""

from __future__ import annotations

from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

__all__ = ["replay_subsample", "subsample_message", "subsampled_plates"]


def subsampled_plates(trace) -> dict:
    """``{plate name: (batch size, full size)}`` of the plates ``trace`` subsampled."""
    out = {}
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and site_is_subsample(site):
            fn = site["fn"]
            if fn.subsample_size is not None and fn.subsample_size < fn.size:
                out[name] = (int(fn.subsample_size), int(fn.size))
    return out


class _ReplaySubsample(Messenger):
    """Sets each subsampled plate's indices to those of a first trace."""

    def __init__(self, indices: dict):
        super().__init__()
        self.indices = indices

    def _pyro_sample(self, msg):
        if site_is_subsample(msg) and msg["name"] in self.indices:
            msg["value"] = self.indices[msg["name"]]
            msg["done"] = True


def replay_subsample(model, trace):
    """``model`` with the subsample indices of ``trace`` replayed (``model`` itself when no
    plate of ``trace`` is subsampled).

    :param model: a Pyro model.
    :param trace: a trace of it whose subsample indices every later run should use.
    """
    plates = subsampled_plates(trace)
    if not plates:
        return model
    indices = {name: trace.nodes[name]["value"] for name in plates}
    return _ReplaySubsample(indices)(model)


def subsample_message(trace) -> str | None:
    """A sentence saying the estimate is of a subsample, or ``None`` without one."""
    plates = subsampled_plates(trace)
    if not plates:
        return None
    what = ", ".join(f"plate {n!r}: {b} of {f}" for n, (b, f) in plates.items())
    return (
        f"subsample ({what}): the estimate is log p of this call's subsample scaled by "
        "full size / subsample size, as Pyro scales it; an estimate of log p of the full "
        "data, not its exact value"
    )

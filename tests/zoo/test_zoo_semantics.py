"""Zoo: models that lean on Pyro's semantics, as :class:`~tests.zoo.common.ZooCase` entries
(the models are those of the semantics test files, imported, not copied):

- the capture-recapture (Cormack-Jolly-Seber) model of Pyro's examples/capture_recapture,
  its mask mutated in place after the sample statements, survival and recapture fixed by
  ``poutine.condition``; exact by ``TraceEnum_ELBO`` with an empty guide;
- a per-sequence Gaussian mixture with missing values marked by ``obs_mask``; exact by hand
  over the present values;
- examples/hmm.py's model_1 (probabilities fixed) minibatched with ``batch_size``: each
  call draws its own subsample, replayed in every internal trace, and its estimate is that
  of the subsample scaled by full size / batch size, as Pyro scales it; exact by a forward
  algorithm for the subsample the call saw."""

from __future__ import annotations

import pytest
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from tests import test_pyro_semantics as masks
from tests import test_semantics_lazy_mask as lazy
from tests import test_semantics_subsample as sub

from .common import ZooCase, check_case, in_float64, run_case

CJS_HISTORY = in_float64(lazy._history)
CJS = poutine.condition(lazy.cjs, data={"phi": lazy.PHI.double(), "rho": lazy.RHO.double()})


def cjs_exact():
    """``TraceEnum_ELBO`` with an empty guide; the conditioned Uniform(0, 1) sites add
    log 1 = 0, so its value is log p(history | phi, rho)."""
    return float(-TraceEnum_ELBO(max_plate_nesting=1).loss(CJS, lambda h: None, CJS_HISTORY))


MISSING_X, PRESENT = in_float64(masks._data)


def obs_mask_exact():
    return float(masks._mixture_log_p(MISSING_X, PRESENT))


SUB_DATA = in_float64(sub._hmm_data)
SEEN: list = []  # the subsamples the model drew, most recent last


def subsample_exact():
    """The exact value for the subsample of the most recent call (every trace of one call
    draws the same indices: checked by tests/test_semantics_subsample.py)."""
    return float(sub._subsample_exact(SEEN[-1], SUB_DATA))


CASES = [
    ZooCase("capture-recapture (CJS)", CJS, (CJS_HISTORY,), cjs_exact, "exact"),
    ZooCase(
        "mixture with obs_mask (missing)",
        masks.mixture_obs_mask,
        (MISSING_X, PRESENT),
        obs_mask_exact,
        "exact",
        {"token_plate": "tokens"},
    ),
    ZooCase(
        "hmm.py model_1, batch_size subsample",
        sub.hmm_model_1,
        (SUB_DATA[4], SUB_DATA[3], SUB_DATA[:3], sub.BATCH, SEEN),
        subsample_exact,
        "exact",
        {"token_plate": "tones"},
        per_run_exact=True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_semantics_zoo(case):
    check_case(case, run_case(case))


def test_subsample_case_sees_one_subsample_per_call():
    """The per-run exact values are those of distinct subsamples, one per call, each of
    ``BATCH`` sequences: the subsample case is not a full-data case in disguise."""
    case = CASES[-1]
    SEEN.clear()
    result = run_case(case, seed=3)
    check_case(case, result)
    batches = {tuple(b.tolist()) for b in SEEN}
    assert len(batches) == 3 and all(len(b) == sub.BATCH for b in batches)
    full = sum(
        float(sub._forward(*SUB_DATA[:3], SUB_DATA[4][n], int(SUB_DATA[3][n])))
        for n in range(sub.NUM_SEQ)
    )
    assert abs(result["exact"] - full) > 1e-3  # the scaled subsample is not the full value
    exacts = {result["exact"], result["exact_chain"], result["exact_stratified"]}
    assert len(exacts) == 3  # each estimate was checked against its own subsample

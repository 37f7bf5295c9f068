"""The options of ``evaluate`` / ``compare`` (pyro_mpt.evaluator_options): checked values,
and the keyword arguments handed to the reference, the MaskedELBOs and the curve."""

import numpy as np
import pytest

from pyro_mpt import models
from pyro_mpt.evaluator_options import (
    check_models_and_guides,
    check_rates,
    check_run_options,
    estimator_list,
)

GOOD = dict(
    reference="auto",
    reference_samples=100,
    mpt_samples=8,
    conditionals="auto",
    token_plate=None,
    share_masks=False,
    progress=None,
    guides={"guide": None},
    reference_options=None,
    mpt_options=None,
)


def test_estimator_list_names_and_order():
    assert list(estimator_list(("chain", "stratified"))) == ["chain", "stratified"]
    assert list(estimator_list("uniform")) == ["uniform"]
    with pytest.raises(TypeError, match="sequence of estimator names"):
        estimator_list(3)


def test_check_rates():
    assert check_rates((0.15, 1, np.float64(0.5))) == [0.15, 1.0, 0.5]
    assert check_rates(()) == []
    with pytest.raises(ValueError, match=r"fixed_rates\[0\]: mask_rate must lie in \(0, 1\]"):
        check_rates((True,))


def test_run_options_hand_on_the_keywords():
    opts = check_run_options(
        **dict(GOOD, reference_options={"chunk_size": 10}, mpt_options={"max_elements": 99})
    )
    guide = object()
    assert opts.reference_kwargs(guide) == dict(
        method="auto",
        num_samples=100,
        guide=guide,
        token_plate=None,
        progress=None,
        chunk_size=10,
    )
    assert opts.curve_kwargs(3) == dict(
        num_masks=3,
        conditionals="auto",
        num_samples=8,
        token_plate=None,
        share_masks=False,
        max_elements=99,
    )
    elbo = opts.masked_elbo("chain", 5)
    assert (
        repr(elbo)
        == "MaskedELBO(estimator='chain', num_masks=5, conditionals='auto', token_plate=None)"
    )
    assert opts.settings() == dict(
        reference="auto",
        reference_samples=100,
        conditionals="auto",
        mpt_samples=8,
        token_plate=None,
        share_masks=False,
    )
    # NumPy integers are integers
    assert check_run_options(**dict(GOOD, reference_samples=np.int64(7))).reference_samples == 7


def test_run_options_refuse_keys_the_caller_sets():
    with pytest.raises(TypeError, match=r"reference_options has unknown keys \['guide'\]"):
        check_run_options(**dict(GOOD, reference_options={"guide": None}))
    with pytest.raises(TypeError, match=r"mpt_options has unknown keys \['share_masks'\]"):
        check_run_options(**dict(GOOD, mpt_options={"share_masks": True}))
    with pytest.raises(TypeError, match="mpt_options must be a dict"):
        check_run_options(**dict(GOOD, mpt_options=[("max_elements", 1)]))


def test_models_and_guides():
    guides = check_models_and_guides({"a": models.ppca_collapsed}, None)
    assert guides == {}
    with pytest.raises(TypeError, match=r"models\['a'\] must be a callable Pyro model, got 3"):
        check_models_and_guides({"a": 3}, None)

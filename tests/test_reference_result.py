"""LMLEstimate and the one UNRELIABLE flag (pyro_mpt.reference.result)."""

import math
import warnings

import pytest
import torch

from pyro_mpt.reference.result import (
    LMLEstimate,
    fixed_estimate,
    flag_nonfinite,
    flag_unreliable,
)
from tests.conftest import assert_close


def test_flag_unreliable_records_and_warns():
    messages = ["ran"]
    with pytest.warns(UserWarning, match="^UNRELIABLE: the grid is too small$") as caught:
        assert flag_unreliable(messages, "the grid is too small") is False
    assert messages == ["ran", "UNRELIABLE: the grid is too small"]
    # the warning points at the caller outside the package (this file)
    assert caught[0].filename == __file__


def test_flag_nonfinite_counts_the_sequences():
    messages = []
    assert flag_nonfinite(torch.tensor([0.0, -1.0]), messages) is True and messages == []
    with pytest.warns(UserWarning, match=r"^UNRELIABLE: 2 of 3 sequences have a non-finite"):
        ok = flag_nonfinite(torch.tensor([-math.inf, 1.0, math.nan]), messages)
    assert ok is False and len(messages) == 1


def test_fixed_estimate_and_deprecated_num_particles():
    per_seq = torch.tensor([-1.0, -2.0, -3.5])
    est = fixed_estimate(per_seq, 2.0, "quadrature", ["m"], None, num_samples=400)
    assert_close(est.total, -13.0, atol=0.0)  # the subsampling scale times the sum
    assert_close(est.per_sequence_stderr, torch.zeros(3), atol=0.0)
    assert est.stderr == 0.0 and est.num_samples == 400
    with pytest.warns(DeprecationWarning, match="use LMLEstimate.num_samples"):
        assert est.num_particles == 400
    assert str(est) == "log p(x) = -13.0000 (quadrature, 400 grid points)"


def test_str_lists_the_unreliable_messages():
    est = LMLEstimate(
        total=torch.tensor(-1.5),
        per_sequence=torch.tensor([-1.5]),
        stderr=0.25,
        per_sequence_stderr=torch.tensor([0.25]),
        method="importance",
        num_samples=100,
        ess=torch.tensor([12.0]),
        khat=torch.tensor([0.9]),
        trustworthy=False,
        messages=["importance: ...", "UNRELIABLE: k-hat 0.90"],
    )
    assert str(est) == (
        "log p(x) = -1.5000 +- 0.2500 (importance, S=100, min ESS 12.0, max k-hat 0.90)"
        " -- NOT TRUSTWORTHY: UNRELIABLE: k-hat 0.90"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        str(est)  # no deprecated attribute is read

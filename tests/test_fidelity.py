"""The verdicts of ``pyro-mpt reproduce`` (pyro_mpt.experiments.fidelity) on hand cases, and
the report's verdict column."""

import math

import pytest

from pyro_mpt.experiments.fidelity import (
    CONSISTENT,
    NOT_CONSISTENT,
    NOT_DISTINGUISHABLE,
    SeedSpread,
    combine,
    verdict,
)
from pyro_mpt.experiments.reproduce import PRESETS, SEEDS, reproduce
from pyro_mpt.experiments.rows import ROWS


@pytest.mark.parametrize(
    "mean, stderr, claim, critical, expected",
    [
        # positive claim: interval [mean - c se, mean + c se] above, below or around 0
        (1.0, 0.4, "positive", 2.0, CONSISTENT),  # [0.2, 1.8]
        (1.0, 0.6, "positive", 2.0, NOT_DISTINGUISHABLE),  # [-0.2, 2.2]
        (-1.0, 0.4, "positive", 2.0, NOT_CONSISTENT),  # [-1.8, -0.2]
        (0.0, 0.0, "positive", 2.0, NOT_DISTINGUISHABLE),  # exactly 0 is not > 0
        (0.5, 0.0, "positive", 2.0, CONSISTENT),  # exact and positive
        (1.0, 0.4, "positive", 3.0, NOT_DISTINGUISHABLE),  # [-0.2, 2.2] with c = 3
        # zero claim: consistent iff the interval holds 0
        (0.5, 0.3, "zero", 2.0, CONSISTENT),  # [-0.1, 1.1]
        (0.7, 0.3, "zero", 2.0, NOT_CONSISTENT),  # [0.1, 1.3]
        (-0.7, 0.3, "zero", 3.0, CONSISTENT),  # [-1.6, 0.2]
        (0.0, 0.0, "zero", 2.0, CONSISTENT),
        # a spread that is not known decides nothing
        (1.0, math.nan, "positive", 2.0, NOT_DISTINGUISHABLE),
        (math.inf, 1.0, "zero", 2.0, NOT_DISTINGUISHABLE),
    ],
)
def test_verdict_hand_cases(mean, stderr, claim, critical, expected):
    assert verdict(mean, stderr, claim, critical) == expected


def test_verdict_bad_input():
    with pytest.raises(ValueError, match="claim='bigger' is not one of"):
        verdict(1.0, 0.1, "bigger")
    with pytest.raises(ValueError, match="stderr=-0.1 is negative"):
        verdict(1.0, -0.1)
    with pytest.raises(ValueError, match="critical=0 must be > 0"):
        verdict(1.0, 0.1, critical=0)
    with pytest.raises(ValueError, match="no verdicts given"):
        combine([])
    with pytest.raises(ValueError, match="no values given"):
        SeedSpread.of([])


def test_combine():
    assert combine([CONSISTENT, CONSISTENT]) == CONSISTENT
    assert combine([CONSISTENT, NOT_DISTINGUISHABLE]) == NOT_DISTINGUISHABLE
    assert combine([NOT_DISTINGUISHABLE, NOT_CONSISTENT, CONSISTENT]) == NOT_CONSISTENT


def test_seed_spread_against_hand_computation():
    # values 1, 2, 3, 4, 5: mean 3, sd sqrt(2.5), se sqrt(2.5 / 5) = sqrt(0.5)
    s = SeedSpread.of([1, 2, 3, 4, 5])
    assert (s.n, s.mean) == (5, 3.0)
    assert s.sd == pytest.approx(math.sqrt(2.5), abs=1e-12)
    assert s.stderr == pytest.approx(math.sqrt(0.5), abs=1e-12)
    # t_{0.975, 4} = 2.7764451: 3 - 2.776 * 0.7071 = 1.037 > 0
    assert s.verdict("positive") == CONSISTENT
    assert s.verdict("zero") == NOT_CONSISTENT
    # mean 0.4, sd 0.5477, se 0.2449: 0.4 - 2.776 * 0.2449 = -0.28 < 0 < 1.08
    noisy = SeedSpread.of([0.0, 1.0, 0.0, 1.0, 0.0])
    assert noisy.verdict("positive") == NOT_DISTINGUISHABLE
    assert noisy.verdict("zero") == CONSISTENT
    # with the normal's 1.96 instead of t's 2.776 the first case would still be decided;
    # this one needs the t: mean 1, se 0.4 -> 1 - 2.776 * 0.4 < 0 < 1 - 1.96 * 0.4
    # (values 1 + a x, x = -2..2: sd = a sqrt(10 / 4), se = a sqrt(1/2), so a = 0.4 sqrt(2))
    t_case = SeedSpread.of([1 + 0.4 * math.sqrt(2) * x for x in (-2, -1, 0, 1, 2)])
    assert t_case.stderr == pytest.approx(0.4, abs=1e-12)
    assert t_case.verdict("positive") == NOT_DISTINGUISHABLE
    assert verdict(t_case.mean, t_case.stderr, "positive", 1.96) == CONSISTENT
    # one seed: no spread, no verdict
    assert SeedSpread.of([2.0]).verdict("positive") == NOT_DISTINGUISHABLE
    assert "± 0.548 (sd over 5 seeds)" in noisy.text()


def test_every_report_row_has_a_verdict_over_seeds(tmp_path):
    assert SEEDS["quick"] >= 5 and SEEDS["full"] >= 5
    results = reproduce(str(tmp_path), _preset="_tiny", progress=False, only=["binary", "mlm"])
    assert set(results) == {"binary", "mlm"}
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| Verdict |" in report
    rows = [l for l in report.splitlines() if l.startswith("| binary") or l.startswith("| mlm")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.replace("\\|", "").split("|")]
        assert cells[4] in (CONSISTENT, NOT_CONSISTENT, NOT_DISTINGUISHABLE), cells
        assert f"over {SEEDS['_tiny']} seeds" in row
    assert f"seeds 0..{SEEDS['_tiny'] - 1}" in report
    assert set(ROWS) == set(PRESETS["quick"])

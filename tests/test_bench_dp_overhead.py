"""The DP overhead benchmark: its paired headline worked by hand, and a quick run end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_dp_overhead import TARGET_RATIO, PairedRatio, headline_row, turn_order  # noqa: E402
from suite_rows import KEYS, finish_rows  # noqa: E402

# Five turns: plain and hooks step times in seconds, the hooks/plain ratio of each turn
# being 1.3, 0.9, 1.1, 1.7, 1.0 (sorted: 0.9, 1.0, 1.1, 1.3, 1.7).
PLAIN = [2.0, 1.0, 4.0, 1.0, 2.0]
HOOKS = [2.6, 0.9, 4.4, 1.7, 2.0]


def test_paired_ratio_is_the_median_of_per_turn_ratios_with_quartiles_and_range() -> None:
    # Execute
    paired = PairedRatio.of(HOOKS, PLAIN)

    # Assert: median = 3rd of 5 = 1.1; inclusive quartiles sit on the 2nd and 4th order
    # statistics ((5 - 1) / 4 = 1 step apart): 1.0 and 1.3; range 0.9-1.7.
    assert paired.pairs == 5
    assert paired.median == pytest.approx(1.1)
    assert (paired.q1, paired.q3) == (pytest.approx(1.0), pytest.approx(1.3))
    assert (paired.low, paired.high) == (pytest.approx(0.9), pytest.approx(1.7))
    assert "IQR 1.000-1.300x" in paired.describe() and "range 0.900-1.700x" in paired.describe()


def test_paired_ratio_refuses_one_pair_and_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="at least 2 pairs"):
        PairedRatio.of([1.0], [1.0])
    with pytest.raises(ValueError):
        PairedRatio.of([1.0, 2.0], [1.0])


def test_headline_row_is_the_paired_ratio_against_the_target() -> None:
    # Execute
    raw = headline_row(HOOKS, PLAIN)
    row = finish_rows([raw])[0]

    # Assert: value = paired median 1.1, not the ratio of medians (2.0 / 2.0 = 1.0) nor of
    # best steps (0.9 / 1.0); 1.1 / 1.15 = 0.9565 <= 1, so it meets the target.
    assert tuple(row) == KEYS
    assert row["name"] == "dp_overhead_hooks_b64_vs_target" and row["section"] == "1 DP overhead"
    assert row["value"] == pytest.approx(1.1) and row["limit_or_peer"] == TARGET_RATIO == 1.15
    assert row["ratio"] == pytest.approx(1.1 / 1.15) and row["verdict"] == "meets" and row["unit"] == "x"
    for fragment in (
        "median of 5 paired ratios 1.100x",
        "IQR 1.000-1.300x",
        "range 0.900-1.700x",
        "ratio of best steps 0.900x",
        "of medians 1.000x",
    ):
        assert fragment in row["note"]


def test_headline_row_misses_above_the_target() -> None:
    # Every turn 1.2x: median 1.2 > 1.15
    row = finish_rows([headline_row([1.2, 2.4, 3.6], [1.0, 2.0, 3.0])])[0]
    assert row["value"] == pytest.approx(1.2) and row["verdict"] == "misses"


def test_turn_order_keeps_plain_and_hooks_back_to_back_and_alternates_the_first() -> None:
    # Prepare: plain, the client's mode, and two other modes (units: [p, h], e, g)
    variants = ["p", "h", "e", "g"]

    # Execute
    orders = [turn_order(variants, i) for i in range(7)]  # type: ignore[arg-type]

    # Assert: the pair flips every turn, the units rotate every two turns; period 6.
    assert orders[:6] == [
        ["p", "h", "e", "g"],
        ["h", "p", "e", "g"],
        ["e", "g", "p", "h"],
        ["e", "g", "h", "p"],
        ["g", "p", "h", "e"],
        ["g", "h", "p", "e"],
    ]
    assert orders[6] == orders[0]
    assert turn_order(["p", "h"], 1) == ["h", "p"]  # type: ignore[list-item]


# Its quick run end to end: tests/test_bench_suite.py (bench_suite.py --quick runs it with the same flags).

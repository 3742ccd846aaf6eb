"""The aggregation benchmark times the real strategy: its replies, its checks, its rows by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_aggregation import average_only, flower, make_round, ours, run  # noqa: E402
from suite_rows import KEYS, finish_rows  # noqa: E402

from fedretrain.arrays import from_array_record  # noqa: E402
from strategies.validation import TRAIN_METRICS  # noqa: E402


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """make_round stands in for the ServerApp's TaskIdentity; undo it after each test."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def three_sites(third: float = 6.0) -> np.ndarray:
    # K=3 updates of P=128 params (64 tensors of 2): all 1s, all 2s, all `third`s.
    return np.array([[1.0] * 128, [2.0] * 128, [third] * 128], np.float32)


def test_ours_is_the_strategy_accepting_every_reply_with_equal_weights() -> None:
    # Prepare
    strategy, replies = make_round(three_sites())

    # Execute
    got = from_array_record(ours(strategy, replies))

    # Assert: equal weights, (1 + 2 + 6) / 3 = 3 in each of the 64 tensors; Flower and the
    # unchecked average agree; the strategy validated and logged all three sites.
    assert len(got) == 64 and all(v.shape == (2,) for v in got.values())
    assert all(np.array_equal(v, [3.0, 3.0]) for v in got.values())
    assert all(np.array_equal(v.numpy(), [3.0, 3.0]) for v in flower(replies).values())
    assert all(np.array_equal(v, [3.0, 3.0]) for v in average_only(replies).values())
    accepted = strategy.round_log[1].accepted
    assert sorted(accepted) == ["site-000", "site-001", "site-002"]
    assert set(TRAIN_METRICS) <= set(accepted["site-000"])


def test_ours_runs_the_reply_checks() -> None:
    # Prepare: the third site's values are over the shipped max_abs_value (100)
    strategy, replies = make_round(three_sites(third=200.0))

    # Execute / Assert: the timed path refuses it, so the checks are part of what is timed
    with pytest.raises(SystemExit, match="left replies out"):
        ours(strategy, replies)
    (rejected,) = strategy.round_log[1].rejected
    assert rejected.site_id == "site-002" and "exceed the bound of 100" in rejected.reason


def test_run_rows_are_ratios_of_the_same_timings(capsys) -> None:
    # Execute: K=3 x 4096 params, one timed round
    rows = {row["name"]: row for row in finish_rows(run(3, 4096, 1))}

    # Assert: ours (checks included) is one figure against both peers; the unchecked
    # average is against Flower too; memory = replies held + aggregation extra.
    ours_copy, ours_flower = rows["agg_ours_vs_copy_gbps"], rows["agg_ours_vs_flower_gbps"]
    unchecked = rows["agg_ours_vs_flower_gbps_without_checks"]
    assert all(tuple(row) == KEYS for row in rows.values())
    assert ours_copy["value"] == ours_flower["value"] > 0
    assert ours_copy["limit_or_peer"] == rows["agg_copy_gbps"]["value"]
    assert ours_flower["limit_or_peer"] == unchecked["limit_or_peer"] == rows["agg_flower_gbps"]["value"]
    for row in (ours_copy, ours_flower, unchecked):
        assert math.isclose(row["ratio"], row["value"] / row["limit_or_peer"], rel_tol=1e-12)
    assert "aggregate_train" in ours_flower["note"] and "no reply checks" in unchecked["note"]
    assert rows["agg_max_abs_diff_vs_flower"]["value"] <= 1e-5
    assert rows["agg_peak_server_bytes"]["limit_or_peer"] == 3 * 4096 * 4
    assert "(c) ours, aggregate_train" in capsys.readouterr().out


# Its quick run end to end: tests/test_bench_suite.py (bench_suite.py --quick runs it with the same flags).

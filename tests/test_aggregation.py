"""weighted_average, reply validation and FedAvgLoRA on hand-made reply Messages.

Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import logging
import math
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedretrain.arrays import AdapterSpec, from_array_record, to_array_record
from fedretrain.errors import ReplyRejected
from strategies import CheckedStrategy, FedAvg, FedAvgLoRA, aggregation, build_strategy
from strategies.aggregation import weighted_average
from strategies.validation import validate_train_reply

SPEC = AdapterSpec(entries=(("lora_A", (1, 2), "float32"), ("lora_B", (2, 1), "float32")))


def adapter(a: list[float], b: list[float]) -> dict[str, np.ndarray]:
    return {
        "lora_A": np.array([a], np.float32),
        "lora_B": np.array([[v] for v in b], np.float32),
    }


def train_metrics(**override) -> dict[str, int | float]:
    metrics = {
        "epsilon": 2.0,
        "epsilon-ceiling": 8.0,
        "delta": 1e-5,
        "noise-multiplier": 1.1,
        "sample-rate": 0.05,
        "steps": 5,
    }
    metrics.update(override)
    return metrics


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """Flower 1.41 builds an instruction Message from the process's TaskIdentity
    (run, node, task), which the ServerApp runtime sets; stand in for it here.
    """
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _instruction(node_id: int, message_type: str) -> Message:
    return Message(RecordDict(), dst_node_id=node_id, message_type=message_type)


def make_reply(node_id, arrays, metrics, site_id, message_type=MessageType.TRAIN) -> Message:
    """A reply as the SuperLink hands it back: src_node_id is the replying node."""
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": site_id})})
    if arrays is not None:
        content["arrays"] = to_array_record(arrays)
    return Message(content, reply_to=_instruction(node_id, message_type))


def make_error_reply(node_id: int, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=_instruction(node_id, MessageType.TRAIN))


# --- weighted_average --------------------------------------------------------------


def test_weighted_average_by_hand():
    # Prepare: weights 1 and 2 -> (x0 * 1 + x1 * 2) / 3
    x0 = {"w": np.array([1.0, 2.0], np.float32), "m": np.array([[3.0, 0.0]], np.float32)}
    x1 = {"w": np.array([4.0, 8.0], np.float32), "m": np.array([[0.0, 6.0]], np.float32)}

    # Execute
    out = weighted_average([x0, x1], [1, 2])

    # Assert: w = ((1 + 8) / 3, (2 + 16) / 3) = (3, 6); m = (3 / 3, 12 / 3) = (1, 4)
    np.testing.assert_allclose(out["w"], [3.0, 6.0], rtol=1e-6)
    np.testing.assert_allclose(out["m"], [[1.0, 4.0]], rtol=1e-6)
    assert out["w"].dtype == np.float32


def test_weighted_average_normalises_weights_and_upcasts_to_float32():
    # Prepare: weights 3 and 1 -> 0.75, 0.25; float16 inputs
    x0, x1 = {"w": np.array([4.0], np.float16)}, {"w": np.array([8.0], np.float16)}

    # Execute
    out = weighted_average([x0, x1], [3.0, 1.0])

    # Assert: 0.75 * 4 + 0.25 * 8 = 5
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], [5.0])


def test_weighted_average_restores_torch_threads():
    # Prepare
    before = torch.get_num_threads()
    torch.set_num_threads(2)

    # Execute
    weighted_average([{"w": np.ones(3, np.float32)}], [1.0])

    # Assert: the single-threaded loop hands the process setting back
    assert torch.get_num_threads() == 2
    torch.set_num_threads(before)


def test_weighted_average_zero_weight_input_does_not_poison():
    # Prepare: a zero-weight input holding NaN must not make 0 * NaN = NaN
    x0, x1 = {"w": np.array([2.0], np.float32)}, {"w": np.array([np.nan], np.float32)}

    # Execute / Assert
    np.testing.assert_array_equal(weighted_average([x0, x1], [5, 0])["w"], [2.0])


@pytest.mark.parametrize(
    ("arrays", "weights", "message"),
    [
        ([], [], "at least one input"),
        ([{"w": np.ones(1)}], [-1.0], "non-negative"),
        ([{"w": np.ones(1)}], [math.nan], "finite"),
        ([{"w": np.ones(1)}, {"w": np.ones(1)}], [0.0, 0.0], "positive"),
        ([{"w": np.ones(1)}], [1.0, 1.0], "1 inputs but 2 weights"),
        ([{"w": np.ones(1)}, {"v": np.ones(1)}], [1, 1], "keys"),
        ([{"w": np.ones(1)}, {"w": np.ones(2)}], [1, 1], "shape"),
    ],
)
def test_weighted_average_rejects_bad_inputs(arrays, weights, message):
    with pytest.raises(ValueError, match=message):
        weighted_average(arrays, weights)


# --- validate_train_reply ----------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        (train_metrics(epsilon=math.inf), "'epsilon' is not finite"),
        (train_metrics(steps=[1, 2]), "'steps' is not a scalar"),
        ({"epsilon": 1.0}, "metrics missing"),
    ],
)
def test_validate_train_reply_rejects_bad_metrics(metrics, message):
    msg = make_reply(1, adapter([1, 2], [3, 4]), metrics, "site-a")
    with pytest.raises(ReplyRejected, match=message):
        validate_train_reply(msg, SPEC)


def test_validate_train_reply_rejects_missing_records():
    # Prepare: no "arrays" ArrayRecord; then an empty site-id
    no_arrays = make_reply(1, None, train_metrics(), "site-a")
    no_site = make_reply(1, adapter([1, 2], [3, 4]), train_metrics(), "")

    # Execute / Assert
    with pytest.raises(ReplyRejected, match="missing ArrayRecord 'arrays'"):
        validate_train_reply(no_arrays, SPEC)
    with pytest.raises(ReplyRejected, match="site-id must be a non-empty string"):
        validate_train_reply(no_site, SPEC)


# --- FedAvgLoRA.aggregate_train ----------------------------------------------------


def honest_replies() -> list[Message]:
    return [
        make_reply(1, adapter([1, 2], [0, 3]), train_metrics(), "site-a"),
        make_reply(2, adapter([4, 8], [6, 0]), train_metrics(), "site-b"),
    ]


def bad_replies() -> list[Message]:
    nan = adapter([1, 2], [0, 3])
    nan["lora_A"][0, 1] = np.nan
    wrong_shape = {**adapter([1, 2], [0, 3]), "lora_B": np.zeros((3, 1), np.float32)}
    missing_key = {"lora_A": np.ones((1, 2), np.float32)}
    return [
        make_reply(3, nan, train_metrics(), "site-c"),
        make_reply(4, wrong_shape, train_metrics(), "site-d"),
        make_reply(5, missing_key, train_metrics(), "site-e"),
        # A site claiming a huge record count gains nothing: no count is read.
        make_reply(6, adapter([1e3, 1e3], [1e3, 1e3]), train_metrics(**{"num-examples": 10**9}), "site-f"),
        make_error_reply(7, "privacy budget exhausted: epsilon 8.0 reached"),
    ]


def test_aggregate_train_leaves_out_bad_replies_and_averages_the_rest(caplog):
    # Prepare
    strategy = FedAvgLoRA(spec=SPEC, max_abs_value=100.0)
    replies = honest_replies() + bad_replies()

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert: equal weights -> lora_A = ([1,2] + [4,8]) / 2 = [2.5, 5],
    # lora_B = ([0,3] + [6,0]) / 2 = [3, 1.5]; site-f's claimed count buys it nothing and its
    # values of 1e3 are past the bound of 100.
    out = from_array_record(arrays)
    np.testing.assert_allclose(out["lora_A"], [[2.5, 5.0]], rtol=1e-6)
    np.testing.assert_allclose(out["lora_B"], [[3.0], [1.5]], rtol=1e-6)
    assert (metrics["accepted-replies"], metrics["rejected-replies"]) == (2, 5)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = {
        3: "'lora_A': 1 NaN/Inf",
        4: "'lora_B': shape (3, 1)",
        5: "missing ['lora_B']",
        6: "lora_A: values exceed the bound of 100",
        7: "error reply (code 0): 'privacy budget exhausted",
    }
    for node, reason in expected.items():
        prefix = f"round 1: reply from node {node} left out: "
        assert any(line.startswith(prefix) and reason in line for line in lines), (node, lines)
    # An error reply keeps its code in the round log (the command's exit status reads it).
    assert {r.node_id: r.code for r in strategy.round_log[1].rejected} == {3: None, 4: None, 5: None, 6: None, 7: 0}


def test_aggregate_train_keeps_a_plain_data_round_log():
    # Prepare
    strategy = FedAvgLoRA(spec=SPEC, max_abs_value=100.0)
    replies = honest_replies() + bad_replies()
    sent_up = sum(m.content["arrays"].count_bytes() for m in replies if m.has_content())

    # Execute
    strategy.aggregate_train(3, replies)

    # Assert
    entry = strategy.round_log[3]
    assert sorted(entry.accepted) == ["site-a", "site-b"]
    assert entry.accepted["site-b"]["node-id"] == 2
    assert entry.accepted["site-b"]["sample-rate"] == 0.05
    assert [(r.node_id, r.site_id) for r in entry.rejected] == [
        (3, "site-c"),
        (4, "site-d"),
        (5, "site-e"),
        (6, "site-f"),
        (7, None),
    ]
    assert entry.bytes_up == sent_up
    assert entry.to_dict()["rejected"][4]["node_id"] == 7


def test_aggregate_train_with_nothing_valid_returns_none(caplog):
    strategy = FedAvgLoRA(spec=SPEC, max_abs_value=100.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.aggregate_train(2, bad_replies())
    assert result == (None, None)
    assert "round 2: no valid train reply" in caplog.text


def test_aggregate_train_counts_one_reply_per_site_whatever_it_claims():
    # Prepare: site-a replies twice (second from node 9); site-b claims 10^9 records
    strategy = FedAvgLoRA(spec=SPEC)
    twice = make_reply(9, adapter([100, 100], [100, 100]), train_metrics(), "site-a")
    claims = make_reply(2, adapter([4, 8], [6, 0]), train_metrics(**{"num-examples": 10**9}), "site-b")

    # Execute
    arrays, _ = strategy.aggregate_train(1, [honest_replies()[0], twice, claims])

    # Assert: node 9 is refused; site-b weighs what site-a weighs: ([1,2] + [4,8]) / 2
    np.testing.assert_allclose(from_array_record(arrays)["lora_A"], [[2.5, 5.0]])
    reasons = [r.reason for r in strategy.round_log[1].rejected]
    assert len(reasons) == 1 and "already replied" in reasons[0]


def test_configure_train_records_sampled_sites_and_bytes_down():
    # Prepare: two connected nodes; one 2-float adapter and an empty config
    strategy = FedAvgLoRA(spec=SPEC)
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [11, 12]
    arrays = to_array_record({"w": np.zeros(2, np.float32)})

    # Execute
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))

    # Assert: per message, the .npy bytes (128 header + 8 data) + key "w" (1) + the
    # config FedAvg adds, "server-round" (12) + an int (8), + the global adapter's
    # digest, "global-hash" (11) + 64 hex digits = 232; two messages = 464
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]
    assert strategy.round_log[1].sampled == 2
    assert strategy.round_log[1].bytes_down == 464


# --- FedAvgLoRA.aggregate_evaluate -------------------------------------------------


def eval_reply(node_id: int, site_id: str, examples: float, diff_sum: float, diff_sumsq: float, std: float = 0.5):
    metrics = {
        "num-examples": examples,
        "diff-sum": diff_sum,
        "diff-sumsq": diff_sumsq,
        "num-examples-std": std,
        "diff-sum-std": std,
        "diff-sumsq-std": std,
        "eval-clip": 1.0,
    }
    return make_reply(node_id, None, metrics, site_id, MessageType.EVALUATE)


def test_aggregate_evaluate_pools_noised_sums_and_skips_bad_replies(caplog):
    # Prepare
    strategy = FedAvgLoRA(spec=SPEC)
    replies = [
        eval_reply(1, "site-a", 10.0, -2.0, 1.0),
        eval_reply(2, "site-b", 30.0, -6.0, 3.0),
        eval_reply(3, "site-c", 10.0, math.nan, 1.0),
        eval_reply(5, "site-e", 10.0, -1.0, 1.0, std=0.0),
        make_error_reply(4, "data file failed its schema"),
    ]

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        metrics = strategy.aggregate_evaluate(1, replies)

    # Assert: n = 40, sum = -8, sumsq = 4, mean change = -8 / 40 = -0.2
    assert metrics["num-examples"] == pytest.approx(40.0)
    assert metrics["diff-sum"] == pytest.approx(-8.0)
    assert metrics["diff-sumsq"] == pytest.approx(4.0)
    assert metrics["mean-change"] == pytest.approx(-0.2)
    assert (metrics["accepted-replies"], metrics["rejected-replies"]) == (2, 3)
    assert sorted(strategy.round_log[1].evaluation) == ["site-a", "site-b"]
    assert "round 1: evaluate reply from node 3 left out: metric 'diff-sum'" in caplog.text
    assert "evaluate reply from node 5 left out: num-examples-std must be > 0" in caplog.text
    assert "evaluate reply from node 4 left out: error reply" in caplog.text


def test_configure_evaluate_sends_the_baseline_beside_the_candidate():
    # Prepare
    baseline = to_array_record({"w": np.ones(2, np.float32)})
    strategy = FedAvgLoRA(spec=SPEC, baseline=baseline)
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [11, 12]

    # Execute
    messages = list(
        strategy.configure_evaluate(1, to_array_record({"w": np.zeros(2, np.float32)}), ConfigRecord(), grid)
    )

    # Assert
    assert len(messages) == 2
    for msg in messages:
        np.testing.assert_array_equal(from_array_record(msg.content["baseline"])["w"], [1.0, 1.0])
        np.testing.assert_array_equal(from_array_record(msg.content["arrays"])["w"], [0.0, 0.0])


def test_aggregate_evaluate_with_nothing_valid_returns_none():
    strategy = FedAvgLoRA(spec=SPEC)
    assert strategy.aggregate_evaluate(1, [make_error_reply(4, "refused")]) is None


# --- registry -----------------------------------------------------------------------


def test_build_strategy_builds_fedavg_and_lists_names_for_unknown():
    built = build_strategy("fedavg", spec=SPEC)
    assert isinstance(built, CheckedStrategy) and isinstance(built.algorithm, FedAvg)
    with pytest.raises(ValueError, match="unknown strategy 'krums'; valid names: bulyan, fedadagrad"):
        build_strategy("krums", spec=SPEC)


def test_fedavg_lora_refuses_options_it_fixes_itself():
    with pytest.raises(ValueError, match="FedAvg: weighted_by_key must be 'num-examples' behind the reply checks"):
        FedAvgLoRA(spec=SPEC, weighted_by_key="steps")


def test_aggregate_train_leaves_out_an_update_past_the_magnitude_bound(caplog):
    # Prepare: finite but absurd values (a scaled update) from one site; the bound is 100.
    strategy = FedAvgLoRA(spec=SPEC, max_abs_value=100.0)
    scaled = make_reply(3, adapter([1e30, 0], [0, 1]), train_metrics(), "site-c")

    # Execute
    arrays, metrics = strategy.aggregate_train(1, honest_replies() + [scaled])

    # Assert: the honest average is the one of test_..._averages_the_rest: equal weights.
    out = from_array_record(arrays)
    np.testing.assert_allclose(out["lora_A"], [[2.5, 5.0]], rtol=1e-6)
    assert metrics["rejected-replies"] == 1
    assert "lora_A: values exceed the bound of 100" in strategy.round_log[1].rejected[0].reason


def test_weighted_average_splits_keys_into_cache_sized_groups(monkeypatch):
    # Prepare: a 16-byte budget groups a (2 floats, 8 B) with b (8 B, total 16 B); c (12 B) starts
    # a group of its own. Weights 1 and 3 -> 0.25, 0.75.
    monkeypatch.setattr(aggregation, "ACC_GROUP_BYTES", 16)
    x0 = {
        "a": np.array([4.0, 0.0], np.float32),
        "b": np.array([0.0, 8.0], np.float32),
        "c": np.array([1.0, 2.0, 3.0], np.float32),
    }
    x1 = {
        "a": np.array([0.0, 4.0], np.float32),
        "b": np.array([8.0, 0.0], np.float32),
        "c": np.array([5.0, 6.0, 7.0], np.float32),
    }

    # Execute
    groups = aggregation._key_groups(x0, list(x0))
    out = weighted_average([x0, x1], [1, 3])

    # Assert: a = (1, 3); b = (6, 2); c = 0.25 * (1, 2, 3) + 0.75 * (5, 6, 7) = (4, 5, 6); key order kept
    assert groups == [["a", "b"], ["c"]]
    assert list(out) == ["a", "b", "c"]
    np.testing.assert_allclose(out["a"], [1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [6.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(out["c"], [4.0, 5.0, 6.0], rtol=1e-6)

"""The update norm bound: the pure function by hand, then FedAvgLoRA against the issue's attack.

Expected values are worked out by hand in the comments. Every adapter here has four
values (lora_A 1x2, lora_B 2x1), so an update that moves each value by v has norm 2|v|.
"""

from __future__ import annotations

import logging
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedretrain.arrays import AdapterSpec, from_array_record, to_array_record
from fedretrain.config import compose_config
from fedretrain.config.schema import StrategyConfig
from fedretrain.errors import ConfigError
from strategies import FedAvgLoRA
from strategies.checked import RoundLog
from strategies.update_bound import bound_update_norms, update_norm

SPEC = AdapterSpec(entries=(("lora_A", (1, 2), "float32"), ("lora_B", (2, 1), "float32")))
METRICS = {
    "epsilon": 1.0,
    "epsilon-ceiling": 8.0,
    "delta": 1e-5,
    "noise-multiplier": 1.1,
    "sample-rate": 0.05,
    "steps": 5,
}


def adapter(a: list[float], b: list[float]) -> dict[str, np.ndarray]:
    return {"lora_A": np.array([a], np.float32), "lora_B": np.array([[v] for v in b], np.float32)}


def filled(value: float) -> dict[str, np.ndarray]:
    return adapter([value, value], [value, value])


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """Flower builds instruction Messages from the ServerApp's TaskIdentity; stand in for it."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def train_round(strategy: FedAvgLoRA, global_value: float, sent: dict[int, tuple[str, dict, dict]]):
    """Round 1 sent to the nodes of ``sent`` with a global adapter of ``global_value``
    everywhere; node -> (site id, adapter, extra metrics) replies as a site would."""
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = sorted(sent)
    strategy.min_train_nodes = strategy.min_available_nodes = len(sent)
    instructions = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(1, to_array_record(filled(global_value)), ConfigRecord(), grid)
    }
    replies = []
    for node, (site_id, arrays, extra) in sent.items():
        echo = instructions[node].content["config"]
        content = RecordDict(
            {
                "arrays": to_array_record(arrays),
                "metrics": MetricRecord({**METRICS, **extra}),
                "site": ConfigRecord(
                    {"site-id": site_id, "server-round": echo["server-round"], "global-hash": echo["global-hash"]}
                ),
            }
        )
        reply = Message(content, reply_to=instructions[node])
        reply.metadata.__dict__["_src_node_id"] = node  # as the SuperLink stamps the replying node
        replies.append(reply)
    return replies


# --- bound_update_norms, by hand ---------------------------------------------------------


def test_an_oversized_update_is_scaled_to_exactly_c_times_the_median():
    # Prepare: G = 1 everywhere; distances 5 (3,4,0,0), 10 (0,0,6,8) and 50 (30,40,0,0).
    g = filled(1.0)
    u1, u2, u3 = adapter([4, 5], [1, 1]), adapter([1, 1], [7, 9]), adapter([31, 41], [1, 1])

    # Execute: c = 3
    out, bound = bound_update_norms(g, [u1, u2, u3], 3.0)

    # Assert: M = median(5, 10, 50) = 10, limit 30; u3 scaled by 30/50 = 0.6:
    # G + (30, 40, 0, 0) * 0.6 = (19, 25, 1, 1), at distance 30 = c*M exactly.
    assert bound.norms == pytest.approx([5.0, 10.0, 50.0])
    assert (bound.median, bound.limit) == (pytest.approx(10.0), pytest.approx(30.0))
    assert bound.factors == [1.0, 1.0, pytest.approx(0.6)]
    np.testing.assert_allclose(out[2]["lora_A"], [[19.0, 25.0]], rtol=1e-6)
    np.testing.assert_allclose(out[2]["lora_B"], [[1.0], [1.0]], rtol=1e-6)
    assert update_norm(out[2], g) == pytest.approx(30.0, rel=1e-6)
    assert out[0] is u1 and out[1] is u2  # honest updates are passed through, not copied


def test_updates_within_the_bound_are_untouched_even_at_the_limit():
    # Prepare: distances 2, 4 and 12 from G = 0; M = 4, limit 3 * 4 = 12: the third is at it.
    updates = [filled(1.0), filled(2.0), filled(6.0)]

    # Execute
    out, bound = bound_update_norms(filled(0.0), updates, 3.0)

    # Assert
    assert bound.factors == [1.0, 1.0, 1.0]
    assert all(o is u for o, u in zip(out, updates, strict=True))


def test_with_two_updates_nothing_is_clipped_at_c_of_two_or_more():
    # Two sites: M is the mean of both distances, so the larger is at most 2M. With 1 and
    # 99 from G = 0: norms 2 and 198, M = 100, limit 300: the bound cannot tell who is honest.
    _, bound = bound_update_norms(filled(0.0), [filled(1.0), filled(99.0)], 3.0)
    assert bound.factors == [1.0, 1.0] and bound.median == pytest.approx(100.0)


def test_when_most_sites_send_the_global_adapter_back_a_moving_one_is_scaled_to_it():
    # M = median(0, 0, 2) = 0, limit 0: the third update (norm 2) gets factor 0, i.e. G.
    out, bound = bound_update_norms(filled(5.0), [filled(5.0), filled(5.0), filled(6.0)], 3.0)
    assert bound.factors[2] == 0.0
    np.testing.assert_array_equal(out[2]["lora_A"], [[5.0, 5.0]])


@pytest.mark.parametrize("ratio", [0.5, float("nan"), float("inf")])
def test_bound_update_norms_refuses_a_ratio_below_one_or_not_finite(ratio):
    with pytest.raises(ValueError, match="ratio must be a finite number >= 1"):
        bound_update_norms(filled(0.0), [filled(1.0)], ratio)


def test_bound_update_norms_refuses_keys_or_shapes_other_than_the_global_adapters():
    with pytest.raises(ValueError, match="keys differ"):
        bound_update_norms(filled(0.0), [{"lora_A": np.zeros((1, 2), np.float32)}], 3.0)
    with pytest.raises(ValueError, match="'lora_B': update shape"):
        bound_update_norms(filled(0.0), [{**filled(1.0), "lora_B": np.zeros((1, 2), np.float32)}], 3.0)


# --- FedAvgLoRA: the attack ------------------------------------------------------


def test_a_site_sending_99s_moves_the_average_by_at_most_its_capped_share(caplog):
    # Prepare: global 0; site-a and site-b send 1.0, site-z sends 99 (under max_abs_value=100).
    strategy = FedAvgLoRA(spec=SPEC, max_abs_value=100.0, max_update_norm_ratio=3.0)
    replies = train_round(
        strategy, 0.0, {1: ("site-a", filled(1.0), {}), 2: ("site-b", filled(1.0), {}), 3: ("site-z", filled(99.0), {})}
    )

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert: norms 2, 2, 198; M = 2, limit c*M = 6; site-z is scaled by 6/198 = 1/33 to
    # 99/33 = 3.0 per value. Average (1 + 1 + 3) / 3 = 5/3 per value, against 101/3 = 33.67
    # unbounded (and 98.99 when it could claim 10^9 records). site-z's term in the average,
    # 3.0/3 = 1.0 per value, has norm 2 = c*M/K: its capped share; the honest average is 1.0.
    out = from_array_record(arrays)
    np.testing.assert_allclose(out["lora_A"], [[5 / 3, 5 / 3]], rtol=1e-6)
    np.testing.assert_allclose(out["lora_B"], [[5 / 3], [5 / 3]], rtol=1e-6)
    assert metrics["accepted-replies"] == 3
    record = strategy.round_log[1].bounded
    assert list(record) == ["site-z"]
    assert record["site-z"]["node-id"] == 3
    assert record["site-z"]["factor"] == pytest.approx(1 / 33)
    assert (record["site-z"]["norm"], record["site-z"]["limit"]) == (pytest.approx(198.0), pytest.approx(6.0))
    assert "update of site site-z (node 3) scaled by 0.0303" in caplog.text


def test_without_the_bound_the_same_attack_moves_the_average_to_a_third_of_99():
    # The control: max_update_norm_ratio=None -> (1 + 1 + 99) / 3 = 101/3 per value.
    strategy = FedAvgLoRA(spec=SPEC, max_abs_value=100.0, max_update_norm_ratio=None)
    replies = train_round(
        strategy, 0.0, {1: ("site-a", filled(1.0), {}), 2: ("site-b", filled(1.0), {}), 3: ("site-z", filled(99.0), {})}
    )
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(from_array_record(arrays)["lora_A"], [[101 / 3, 101 / 3]], rtol=1e-6)
    assert strategy.round_log[1].bounded == {}


def test_the_bound_is_centred_on_the_global_adapter_the_round_sent():
    # Prepare: global 10; honest sites at 11 (distance 2), site-z at 99 (distance 2 * 89 = 178).
    strategy = FedAvgLoRA(spec=SPEC, max_abs_value=100.0)
    replies = train_round(
        strategy,
        10.0,
        {1: ("site-a", filled(11.0), {}), 2: ("site-b", filled(11.0), {}), 3: ("site-z", filled(99.0), {})},
    )

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: M = 2, limit 6, factor 6/178: site-z -> 10 + 89 * 6/178 = 13; average (11+11+13)/3 = 35/3.
    # (Measured from zero instead: norms 22, 22, 198, factor 1/3, 33, average 55/3.)
    np.testing.assert_allclose(from_array_record(arrays)["lora_A"], [[35 / 3, 35 / 3]], rtol=1e-6)
    assert strategy.round_log[1].bounded["site-z"]["factor"] == pytest.approx(6 / 178)


def test_a_site_claiming_a_billion_records_gains_no_weight():
    # Prepare: site-z claims num-examples = 10^9 and sends 2.0, inside the bound (norm 4 <= 3 * 2).
    strategy = FedAvgLoRA(spec=SPEC, max_abs_value=100.0)
    replies = train_round(
        strategy,
        0.0,
        {
            1: ("site-a", filled(1.0), {}),
            2: ("site-b", filled(1.0), {}),
            3: ("site-z", filled(2.0), {"num-examples": 10**9}),
        },
    )

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: equal weights, no count read: (1 + 1 + 2) / 3 = 4/3 (weighted by the claim: ~2.0).
    np.testing.assert_allclose(from_array_record(arrays)["lora_A"], [[4 / 3, 4 / 3]], rtol=1e-6)
    assert strategy.round_log[1].bounded == {}


def test_fedavg_lora_refuses_a_ratio_below_one():
    with pytest.raises(ValueError, match="max_update_norm_ratio must be a number >= 1 or None"):
        FedAvgLoRA(spec=SPEC, max_update_norm_ratio=0.9)


def test_a_round_log_without_bounded_updates_loads_as_before():
    # A checkpoint written before the bound existed has no "bounded" key.
    old = {
        "sampled": 2,
        "bytes_down": 1,
        "bytes_up": 1,
        "accepted": {},
        "rejected": [],
        "evaluation": {},
        "evaluation_rejected": [],
    }
    entry = RoundLog.from_dict(old)
    assert entry.bounded == {}
    entry.bounded["site-z"] = {"node-id": 3, "norm": 198.0, "limit": 6.0, "factor": 1 / 33}
    assert RoundLog.from_dict(entry.to_dict()) == entry


# --- config ------------------------------------------------------------------------------


def test_the_shipped_config_bounds_updates_at_three_times_the_median_and_null_turns_it_off():
    assert compose_config([]).strategy.max_update_norm_ratio == 3.0
    assert compose_config(["strategy.max_update_norm_ratio=null"]).strategy.max_update_norm_ratio is None


@pytest.mark.parametrize("ratio", [0.5, 0, -1.0, float("nan"), True, "3"])
def test_strategy_config_refuses_a_bad_ratio_naming_the_key(ratio):
    with pytest.raises(ConfigError, match="max_update_norm_ratio: must be a number >= 1"):
        StrategyConfig(max_update_norm_ratio=ratio)

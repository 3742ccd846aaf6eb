"""Replies that must never reach the average: oversized ones (refused before they are
parsed), stale or replayed ones from another round, a second reply from one node; and a
site asked again for a round it already trained, which answers without spending again.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import strategies.validation
from client.round.site import train_round
from fedretrain.arrays import AdapterSpec, record_digest, to_array_record
from fedretrain.config import Job, SiteConfig, compose_config
from fedretrain.modeling.lora_model import adapter_arrays, load_lora_model
from fedretrain.privacy.ledger import PrivacyLedger
from strategies import FedAvgLoRA
from strategies.validation import max_reply_bytes

SPEC = AdapterSpec(entries=(("lora_A", (1, 2), "float32"), ("lora_B", (2, 1), "float32")))
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "site-a"
METRICS = {
    "epsilon": 2.0,
    "epsilon-ceiling": 8.0,
    "delta": 1e-5,
    "noise-multiplier": 1.1,
    "sample-rate": 0.05,
    "steps": 5,
}


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def adapter(value: float) -> dict[str, np.ndarray]:
    return {"lora_A": np.full((1, 2), value, np.float32), "lora_B": np.full((2, 1), value, np.float32)}


def reply_to(instruction: Message, node_id: int, site_id: str, arrays: dict[str, np.ndarray]) -> Message:
    """What a site sends back: its adapter, metrics, and the echo of the instruction's round and digest."""
    config = instruction.content["config"]
    content = RecordDict(
        {
            "arrays": to_array_record(arrays),
            "metrics": MetricRecord(METRICS),
            "site": ConfigRecord(
                {"site-id": site_id, "server-round": config["server-round"], "global-hash": config["global-hash"]}
            ),
        }
    )
    reply = Message(content, reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = node_id  # as the SuperLink stamps the replying node
    return reply


def configured_round(
    strategy: FedAvgLoRA, server_round: int, global_adapter: dict[str, np.ndarray], nodes: list[int]
) -> dict[int, Message]:
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = nodes
    messages = strategy.configure_train(server_round, to_array_record(global_adapter), ConfigRecord(), grid)
    return {m.metadata.dst_node_id: m for m in messages}


def test_an_oversized_reply_is_refused_before_it_is_parsed(monkeypatch, caplog):
    # Prepare: one honest reply and one that carries 10x the adapter's bytes.
    strategy = FedAvgLoRA(spec=SPEC)
    sent = configured_round(strategy, 1, adapter(0.0), [1, 2])
    honest = reply_to(sent[1], 1, "site-a", adapter(1.0))
    bloated = reply_to(sent[2], 2, "site-b", adapter(9.0))
    bloated.content["arrays"]["padding"] = to_array_record({"p": np.zeros(10 * SPEC.nbytes, np.uint8)})["p"]
    parsed = []
    real_parse = strategies.validation.from_array_record
    monkeypatch.setattr(strategies.validation, "from_array_record", lambda r: parsed.append(r) or real_parse(r))

    # Execute
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, [honest, bloated])

    # Assert: only the honest reply was parsed and averaged; the refusal names the sizes.
    assert len(parsed) == 1
    assert strategy.round_log[1].rejected[0].node_id == 2
    assert f"over the {max_reply_bytes(SPEC)}" in strategy.round_log[1].rejected[0].reason
    assert "refused before loading" in caplog.text
    assert float(arrays["lora_A"].numpy()[0, 0]) == 1.0


def test_a_reply_from_an_earlier_round_is_refused_as_replayed(caplog):
    # Prepare: round 1 on the initial adapter; round 2 on the averaged one. Node 2 sends
    # its round-1 reply again in round 2 (same bytes, same site).
    strategy = FedAvgLoRA(spec=SPEC)
    round1 = configured_round(strategy, 1, adapter(0.0), [1, 2])
    old = reply_to(round1[2], 2, "site-b", adapter(5.0))
    round2 = configured_round(strategy, 2, adapter(3.0), [1, 2])
    fresh = reply_to(round2[1], 1, "site-a", adapter(1.0))
    replayed = Message(old.content, reply_to=round2[2])
    replayed.metadata.__dict__["_src_node_id"] = 2

    # Execute
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(2, [fresh, replayed])

    # Assert: the replay is refused and logged with both rounds; the average is the fresh reply alone.
    reason = strategy.round_log[2].rejected[0].reason
    assert reason.startswith("stale or replayed reply: it answers round 1")
    assert "this is round 2" in reason and "node 2 left out" in caplog.text
    assert metrics["accepted-replies"] == 1
    assert float(arrays["lora_B"].numpy()[1, 0]) == 1.0


def test_a_reply_to_another_global_adapter_is_refused():
    # A reply that echoes the right round but another model's digest trained on something else.
    strategy = FedAvgLoRA(spec=SPEC, min_train_nodes=1, min_available_nodes=1)
    sent = configured_round(strategy, 1, adapter(0.0), [1])
    forged = reply_to(sent[1], 1, "site-a", adapter(1.0))
    forged.content["site"]["global-hash"] = record_digest(to_array_record(adapter(7.0)))

    arrays, _ = strategy.aggregate_train(1, [forged])

    assert arrays is None
    assert "stale or replayed" in strategy.round_log[1].rejected[0].reason


def test_a_second_reply_from_one_node_in_a_round_is_refused():
    # Node 1 answers twice under two site names; only its first reply counts: (1 + 3) / 2 = 2.
    strategy = FedAvgLoRA(spec=SPEC)
    sent = configured_round(strategy, 1, adapter(0.0), [1, 2])
    first = reply_to(sent[1], 1, "site-a", adapter(1.0))
    again = reply_to(sent[1], 1, "site-z", adapter(100.0))
    other = reply_to(sent[2], 2, "site-b", adapter(3.0))

    arrays, metrics = strategy.aggregate_train(1, [first, again, other])

    assert metrics["accepted-replies"] == 2
    assert strategy.round_log[1].rejected[0].reason == "node 1 already replied this round"
    assert float(arrays["lora_A"].numpy()[0, 1]) == pytest.approx(2.0)


def test_the_average_does_not_depend_on_the_order_replies_arrive_in():
    strategy = FedAvgLoRA(spec=SPEC)
    sent = configured_round(strategy, 1, adapter(0.0), [1, 2, 3])
    replies = [reply_to(sent[n], n, f"site-{n}", adapter(v)) for n, v in ((1, 0.1), (2, 0.7), (3, 1e-8))]
    forward, _ = strategy.aggregate_train(1, replies)
    backward, _ = FedAvgLoRA(spec=SPEC).aggregate_train(1, replies[::-1])
    assert forward["lora_A"].numpy().tobytes() == backward["lora_A"].numpy().tobytes()


@pytest.mark.slow
def test_a_site_asked_again_for_a_round_it_trained_sends_the_same_update_without_spending(tmp_path):
    # Prepare: a site and a small job; the coordinator's digest of the global adapter.
    cfg = compose_config(["experiment=smoke", "train.local_steps=2", "train.batch_size=8", "rounds=2"])
    job = Job.from_config(cfg, run_id="resumed-run")
    initial = adapter_arrays(load_lora_model(job.model, job.lora, seed=job.seed, device="cpu").model)
    digest = record_digest(to_array_record(initial))
    shutil.copytree(EXAMPLE, tmp_path / "site")
    site = SiteConfig(site_id="site-a", data_dir=str(tmp_path / "site"), epsilon_ceiling=8.0, delta=1e-5)

    # Execute: round 1 twice (a resumed coordinator), then round 2.
    first = train_round(site, job, initial, 1, global_hash=digest)
    again = train_round(site, job, initial, 1, global_hash=digest)
    train_round(site, job, first.adapter, 2, global_hash=record_digest(to_array_record(first.adapter)))

    # Assert: the same bytes and figures, and one ledger entry per round, not two for round 1.
    assert all(np.array_equal(first.adapter[k], again.adapter[k]) for k in first.adapter)
    assert again.metrics == first.metrics
    ledger = PrivacyLedger.load(site.ledger_path, site_id="site-a", accountant="rdp", delta=1e-5)
    assert [(e.run_id, e.round) for e in ledger.entries] == [("resumed-run", 1), ("resumed-run", 2)]

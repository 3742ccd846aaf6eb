"""A reply counts only for the site whose key its node proved (server/sites/roster.py, server/sites/grid.py).

Replies are hand-made as Flower's grids return them: each answers the instruction it
names (``reply_to_message_id``); Flower's SuperLink answers for a node it lost with an
error reply of its own (source node 1).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedretrain.arrays import AdapterSpec, from_array_record, to_array_record
from fedretrain.errors import DeployError
from server.sites.grid import CLAIMS_ANOTHER_SITE, UNREGISTERED_NODE, BoundGrid, PromptGrid
from server.sites.live import LiveFile
from server.sites.roster import Roster, record_node
from simulation.federation import FederationSites
from strategies import FedAvgLoRA
from strategies.checked import RejectedReply

SPEC = AdapterSpec(entries=(("lora_A", (1, 2), "float32"),))
TRAIN_METRICS = {
    "epsilon": 1.0,
    "epsilon-ceiling": 8.0,
    "delta": 1e-5,
    "noise-multiplier": 1.1,
    "sample-rate": 0.05,
    "steps": 5,
}
ROSTER = Roster({11: "site-a", 12: "site-b", 13: "site-c"})


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(autouse=True)
def propagating_logs(monkeypatch):
    monkeypatch.setattr(logging.getLogger("fedretrain"), "propagate", True)


class ScriptedGrid:
    """Answers each node as ``script[node](instruction)`` says (None: silent)."""

    def __init__(self, script) -> None:
        self.script = script

    def get_node_ids(self):
        return list(self.script)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            reply = self.script[msg.metadata.dst_node_id](msg)
            if reply is not None:
                replies.append(reply)
        return replies


def train_reply(site_id: str, value: float):
    """A valid train reply claiming ``site_id`` with an adapter of ``value``s, from the addressed node."""

    def answer(instruction: Message) -> Message:
        config = instruction.content["config"]
        content = RecordDict(
            {
                "arrays": to_array_record({"lora_A": np.full((1, 2), value, np.float32)}),
                "metrics": MetricRecord(TRAIN_METRICS),
                "site": ConfigRecord(
                    {"site-id": site_id, "server-round": config["server-round"], "global-hash": config["global-hash"]}
                ),
            }
        )
        reply = Message(content, reply_to=instruction)
        reply.metadata.__dict__["_src_node_id"] = instruction.metadata.dst_node_id
        return reply

    return answer


def lost_by_superlink(instruction: Message) -> Message:
    """The error reply Flower's SuperLink writes for a node whose SuperNode it lost."""
    reply = Message(Error(code=0, reason="Message delivery failed: the node is offline"), reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return reply


def instructions(*nodes: int) -> list[Message]:
    return [
        Message(
            RecordDict({"config": ConfigRecord({"server-round": 1, "global-hash": ""})}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
        )
        for node in nodes
    ]


def test_a_node_claiming_another_site_is_refused_and_the_log_names_both(caplog):
    # Prepare: node 12 proved site-b's key but its reply says site-a; node 11 is the real site-a.
    grid = BoundGrid(ScriptedGrid({11: train_reply("site-a", 1.0), 12: train_reply("site-a", 99.0)}), ROSTER)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedretrain.server"):
        honest, posing = grid.send_and_receive(instructions(11, 12))

    # Assert: site-a's own reply passes untouched; the impostor's becomes an error reply from node 12.
    assert not honest.has_error() and honest.content["site"]["site-id"] == "site-a"
    assert posing.has_error() and posing.error.code == CLAIMS_ANOTHER_SITE
    assert posing.metadata.src_node_id == 12
    assert posing.error.reason == (
        "node 12 holds site site-b's key but its reply claims site site-a: not counted for either"
    )
    assert "site site-b's key but its reply claims site site-a" in caplog.text


def test_the_impostor_is_refused_whichever_reply_arrives_first():
    # Prepare: the impostor's reply arrives before the real site-a's (the attack the
    # strategy's "already replied" check let through when the order was this one).
    script = {12: train_reply("site-a", 99.0), 11: train_reply("site-a", 1.0), 13: train_reply("site-c", 1.0)}
    grid = BoundGrid(ScriptedGrid(script), ROSTER)
    strategy = FedAvgLoRA(spec=SPEC, site_of=grid.site_of)
    messages = instructions(12, 11, 13)

    # Execute
    average, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))

    # Assert: site-a and site-c count, each weighing the same: (1 + 1) / 2 = 1.0 (with
    # the impostor in place of site-a it would have been (99 + 1) / 2 = 50).
    assert from_array_record(average)["lora_A"].tolist() == [[1.0, 1.0]]
    assert set(strategy.round_log[1].accepted) == {"site-a", "site-c"}
    assert strategy.round_log[1].accepted["site-a"]["node-id"] == 11
    [refused] = strategy.round_log[1].rejected
    assert (refused.node_id, refused.site_id) == (12, "site-b")
    assert "claims site site-a" in refused.reason


def test_an_unregistered_node_is_not_counted():
    grid = BoundGrid(ScriptedGrid({99: train_reply("site-a", 1.0)}), ROSTER)

    [reply] = grid.send_and_receive(instructions(99))

    assert reply.has_error() and reply.error.code == UNREGISTERED_NODE
    assert reply.error.reason == "node 99 is not registered as any site: its reply is not counted"


def test_the_superlinks_error_for_a_lost_node_is_named_by_that_nodes_site():
    # Prepare: site-c's SuperNode died; Flower's SuperLink answers for it from node 1.
    grid = BoundGrid(ScriptedGrid({11: train_reply("site-a", 1.0), 13: lost_by_superlink}), ROSTER)
    strategy = FedAvgLoRA(spec=SPEC, site_of=grid.site_of, min_train_nodes=1, min_available_nodes=1)
    messages = instructions(11, 13)

    # Execute
    strategy.aggregate_train(1, grid.send_and_receive(messages))

    # Assert: recorded under site-c and node 13, not node 1.
    assert strategy.round_log[1].rejected == [
        RejectedReply(
            node_id=13,
            site_id="site-c",
            reason="error reply (code 0): 'site site-c (node 13): Message delivery failed: the node is offline'",
            code=0,
        )
    ]


def test_a_reply_from_another_node_than_the_addressee_is_not_counted():
    # Flower's SuperLink already refuses to store such a reply; the binding does not rely on it.
    def from_node_12(instruction: Message) -> Message:
        reply = train_reply("site-a", 1.0)(instruction)
        reply.metadata.__dict__["_src_node_id"] = 12
        return reply

    [reply] = BoundGrid(ScriptedGrid({11: from_node_12}), ROSTER).send_and_receive(instructions(11))

    assert reply.has_error() and reply.error.code == CLAIMS_ANOTHER_SITE
    assert reply.metadata.src_node_id == 11
    assert reply.error.reason == "a reply to site site-a (node 11) came from node 12: not counted"


def test_pulling_replies_around_the_binding_is_refused():
    with pytest.raises(TypeError, match="only in send_and_receive"):
        BoundGrid(ScriptedGrid({}), ROSTER).pull_messages(["m0"])


# --- the roster -------------------------------------------------------------------------


def test_a_deployments_roster_is_the_coordinators_sites_file(tmp_path):
    path = tmp_path / "sites.json"
    path.write_text(
        json.dumps(
            {
                "site-00": {"node_id": "4242", "public_key": "/k/site-00.pub"},
                "site-01": {"node_id": "77", "public_key": "/k/site-01.pub"},
            }
        )
    )

    roster = Roster.from_sites_file(path)

    assert (roster.site_of(4242), roster.site_of(77), roster.site_of(1)) == ("site-00", "site-01", None)
    assert roster.node_of("site-01") == 77


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{", "cannot read the registered sites"),
        (json.dumps({"site-00": {"public_key": "k"}}), "KeyError"),
        (json.dumps({"site-00": {"node_id": "5"}, "site-01": {"node_id": "5"}}), "node 5 is registered as two sites"),
    ],
)
def test_a_broken_sites_file_is_refused_naming_it(tmp_path, text, expected):
    path = tmp_path / "sites.json"
    path.write_text(text)

    with pytest.raises(DeployError, match=expected) as err:
        Roster.from_sites_file(path)
    assert str(path) in str(err.value)


def test_a_simulations_roster_is_read_again_for_a_node_it_has_not_seen(tmp_path):
    roster = Roster.from_directory(tmp_path / "roster")
    assert roster.site_of(5) is None

    record_node(tmp_path / "roster", 5, "site-03")

    assert roster.site_of(5) == "site-03"


def test_a_recorded_node_cannot_be_bound_to_another_site(tmp_path):
    record_node(tmp_path, 5, "site-03")
    record_node(tmp_path, 5, "site-03")  # the same binding again is fine

    with pytest.raises(DeployError, match="node 5 is bound to site site-03, not site-04"):
        record_node(tmp_path, 5, "site-04")


def test_the_simulations_site_resolver_binds_a_node_by_its_partition_not_by_its_site_json(tmp_path):
    # Prepare: the virtual site in partition 1 (site-01) whose site.json claims site-00.
    (tmp_path / "federation.json").write_text(json.dumps({"sites": ["site-00", "site-01"]}))
    (tmp_path / "site-01").mkdir()
    (tmp_path / "site-01" / "site.json").write_text(
        json.dumps({"site-id": "site-00", "data-dir": str(tmp_path), "epsilon-ceiling": 8.0, "delta": 1e-5})
    )
    context = type("Context", (), {"node_id": 9001, "node_config": {"partition-id": 1}})()

    # Execute
    site = FederationSites(tmp_path, tmp_path / "roster")(context)

    # Assert: the site says site-00, the roster binds node 9001 to site-01, so its replies are refused.
    assert site.site_id == "site-00"
    assert Roster.from_directory(tmp_path / "roster").site_of(9001) == "site-01"


def test_the_summary_names_the_sites_left_out_of_a_round_that_lost_its_quorum():
    from server.cycle.summary import refusals
    from strategies.checked import RoundLog

    # Round 2 lost its quorum: it was never scored, so only the strategy's round log has it.
    lost = RejectedReply(node_id=13, site_id="site-c", reason="no reply by the 60 s deadline")
    logs = {2: RoundLog(sampled=3, rejected=[lost]), 1: RoundLog(sampled=3)}

    assert refusals(logs) == [
        {"node_id": 13, "site_id": "site-c", "reason": "no reply by the 60 s deadline", "code": None, "round": 2}
    ]


class PushPullGrid:
    """Flower's push/pull: node ``n``'s reply can be pulled ``delays[n]`` s after the push (None: never)."""

    def __init__(self, delays) -> None:
        self.delays, self.ready, self.pulls = delays, {}, 0

    def push_messages(self, messages):
        pushed = time.monotonic()
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            delay = self.delays[msg.metadata.dst_node_id]
            if delay is not None:
                self.ready[msg.metadata.message_id] = (pushed + delay, train_reply("site-a", 1.0)(msg))
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic()
        return [reply for mid, (at, reply) in self.ready.items() if mid in set(message_ids) and at <= now]


def test_the_deployed_grid_looks_for_replies_every_check_and_stops_at_the_last_or_the_deadline():
    # Prepare: two nodes answer after 0.1 and 0.3 s; a third never does.
    answering = PushPullGrid({11: 0.1, 12: 0.3})
    silent = PushPullGrid({11: 0.1, 13: None})

    # Execute
    started = time.monotonic()
    replies = list(PromptGrid(answering, check_s=0.05).send_and_receive(instructions(11, 12), timeout=30))
    took = time.monotonic() - started
    partial = list(PromptGrid(silent, check_s=0.05).send_and_receive(instructions(11, 13), timeout=0.4))

    # Assert: both replies, back within a check of the last one (Flower's own loop waits 3 s);
    # at the deadline, the replies that came and no more.
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 12]
    assert 0.3 <= took < 1.0 and answering.pulls >= 3
    assert [r.metadata.src_node_id for r in partial] == [11]


def test_the_grid_keeps_live_json_as_replies_come_in(tmp_path):
    # Prepare: round 3's train instructions to two nodes answering after 0.1 and 0.3 s.
    snapshots = []

    class Recorded(LiveFile):
        def _write(self) -> None:
            super()._write()
            snapshots.append(json.loads(self.path.read_text()))

    messages = instructions(11, 12)
    for msg in messages:
        msg.metadata.group_id = "3"  # as Flower's strategies and the round loop set it: the server round
    grid = PromptGrid(PushPullGrid({11: 0.1, 12: 0.3}), check_s=0.05, live=Recorded(tmp_path / "live.json"))

    # Execute
    list(grid.send_and_receive(messages, timeout=30))

    # Assert: 0 of 2, then 1, then 2 replies in, with the deadline; then the exchange in the history.
    currents = [s["current"] for s in snapshots]
    assert [c["replied"] for c in currents[:-1]] == [0, 1, 2]
    assert currents[0]["exchange"] == "train" and currents[0]["round"] == 3 and currents[0]["expected"] == 2
    assert 29 < currents[0]["deadline_at"] - currents[0]["sent_at"] <= 30
    (done,) = snapshots[-1]["history"]
    assert snapshots[-1]["current"] is None and done["replied"] == 2 and 0.3 <= done["seconds"] < 1.0

"""server/cycle/rounds.py: the round loop with a deadline and a quorum, driven by a real FedAvgLoRA
through a fake Grid that answers like sites do (no Flower processes, no training).

A fake site "trains" by adding its node id to every value of the global adapter it was
sent; the averages below are worked out by hand from that.
"""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedretrain.arrays import AdapterSpec, from_array_record, to_array_record
from fedretrain.errors import QuorumLost
from server.cycle.rounds import RoundPolicy, random_state, restore_random_state, run_rounds
from server.sites.grid import BoundGrid
from server.sites.roster import Roster
from strategies import FedAvgLoRA
from strategies.checked import RejectedReply

SPEC = AdapterSpec(entries=(("lora_A", (1, 2), "float32"), ("lora_B", (2, 1), "float32")))
# Every accepted site weighs the same; node n adds n to the global value it trains from.
EVALUATE_METRICS = {
    "num-examples": 5.0,
    "diff-sum": -1.0,
    "diff-sumsq": 0.5,
    "num-examples-std": 1.0,
    "diff-sum-std": 1.0,
    "diff-sumsq-std": 1.0,
    "eval-clip": 1.0,
}


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(autouse=True)
def propagating_logs(monkeypatch):
    # `cli.main.main` (run by other test files) turns propagation off on "fedretrain".
    monkeypatch.setattr(logging.getLogger("fedretrain"), "propagate", True)


def adapter(value: float) -> ArrayRecord:
    return to_array_record({"lora_A": np.full((1, 2), value, np.float32), "lora_B": np.full((2, 1), value, np.float32)})


def value_of(arrays: ArrayRecord) -> float:
    """The adapter's single value (every entry of both tensors is the same here)."""
    values = np.concatenate([a.ravel() for a in from_array_record(arrays).values()])
    assert np.all(values == values[0])
    return float(values[0])


class FakeGrid:
    """Flower's Grid as ``run_rounds`` uses it: connected node ids, and one exchange per stage.

    ``silent[r]`` are the nodes that never answer in round ``r``: their replies are
    simply missing when the stage closes.
    """

    def __init__(self, nodes: list[int], silent: dict[int, set[int]] | None = None) -> None:
        self.nodes = nodes
        self.silent = silent or {}
        self.timeouts: list[float | None] = []
        self.sent: list[tuple[str, int, int, float]] = []  # (type, round, node, global value)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"  # as Flower's grids do on push
            config = msg.content["config"]
            node, server_round = msg.metadata.dst_node_id, int(config["server-round"])
            self.sent.append((msg.metadata.message_type, server_round, node, value_of(msg.content["arrays"])))
            if node not in self.silent.get(server_round, set()):
                replies.append(self.answer(msg, node))
        return replies

    @staticmethod
    def answer(instruction: Message, node: int) -> Message:
        config = instruction.content["config"]
        site = ConfigRecord(
            {"site-id": f"site-{node}", "server-round": config["server-round"], "global-hash": config["global-hash"]}
        )
        if instruction.metadata.message_type == MessageType.TRAIN:
            trained = value_of(instruction.content["arrays"]) + node
            metrics = {
                "epsilon": 1.0,
                "epsilon-ceiling": 8.0,
                "delta": 1e-5,
                "noise-multiplier": 1.1,
                "sample-rate": 0.05,
                "steps": 5,
            }
            content = RecordDict({"arrays": adapter(trained), "metrics": MetricRecord(metrics), "site": site})
        else:
            content = RecordDict({"metrics": MetricRecord(EVALUATE_METRICS), "site": site})
        reply = Message(content, reply_to=instruction)
        reply.metadata.__dict__["_src_node_id"] = node  # as the SuperLink stamps the replying node
        return reply


class Recorder:
    """evaluate_fn and on_round_end: (round, the adapter's value) of each call."""

    def __init__(self) -> None:
        self.evaluated: list[tuple[int, float]] = []
        self.ended: list[tuple[int, float]] = []

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.evaluated.append((server_round, value_of(arrays)))
        return None

    def end(self, server_round: int, arrays: ArrayRecord) -> None:
        self.ended.append((server_round, value_of(arrays)))


def run(
    grid: FakeGrid,
    start: float,
    *,
    first_round: int,
    num_rounds: int,
    policy: RoundPolicy,
    recorder: Recorder,
    strategy: FedAvgLoRA | None = None,
) -> ArrayRecord:
    strategy = strategy or FedAvgLoRA(
        spec=SPEC, min_train_nodes=policy.quorum, min_evaluate_nodes=policy.quorum, min_available_nodes=policy.quorum
    )
    return run_rounds(
        grid,
        strategy,
        adapter(start),
        first_round=first_round,
        num_rounds=num_rounds,
        policy=policy,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=recorder.evaluate,
        on_round_end=recorder.end,
    )


def test_a_fresh_run_scores_round_zero_then_each_round_and_reports_each_round_end():
    # Prepare: nodes 1 and 2, from 0.
    grid, recorder = FakeGrid([1, 2]), Recorder()
    policy = RoundPolicy(deadline_s=5.0, quorum=2, wait_for=2)

    # Execute
    final = run(grid, 0.0, first_round=1, num_rounds=2, policy=policy, recorder=recorder)

    # Assert: round 1: ((0+1) + (0+2)) / 2 = 1.5; round 2: ((1.5+1) + (1.5+2)) / 2 = 3.0.
    assert recorder.evaluated == [(0, 0.0), (1, 1.5), (2, 3.0)]
    assert recorder.ended == [(1, 1.5), (2, 3.0)]
    assert value_of(final) == 3.0
    # Each round trains on the old global at both nodes; only the final candidate goes to the
    # sites for evaluation (each evaluation is a charged release at every site).
    assert sorted(grid.sent) == sorted(
        [
            (MessageType.TRAIN, 1, 1, 0.0),
            (MessageType.TRAIN, 1, 2, 0.0),
            (MessageType.TRAIN, 2, 1, 1.5),
            (MessageType.TRAIN, 2, 2, 1.5),
            (MessageType.EVALUATE, 2, 1, 3.0),
            (MessageType.EVALUATE, 2, 2, 3.0),
        ]
    )
    assert [kind for kind, *_ in grid.sent[::2]] == [MessageType.TRAIN, MessageType.TRAIN, MessageType.EVALUATE]


def test_a_resumed_run_runs_only_its_remaining_rounds_and_does_not_score_round_zero():
    # Prepare: resume at round 3 of 3 from a checkpoint's adapter (10.0).
    grid, recorder = FakeGrid([1, 2]), Recorder()
    policy = RoundPolicy(deadline_s=5.0, quorum=2, wait_for=2)

    # Execute
    final = run(grid, 10.0, first_round=3, num_rounds=3, policy=policy, recorder=recorder)

    # Assert: only round 3: (11 + 12) / 2 = 11.5.
    assert recorder.evaluated == [(3, 11.5)]
    assert recorder.ended == [(3, 11.5)]
    assert value_of(final) == 11.5
    assert {server_round for _, server_round, _, _ in grid.sent} == {3}


def test_a_node_that_never_answers_costs_one_deadline_and_the_round_goes_on(caplog):
    # Prepare: node 3 (site-3 by the roster) is connected but never answers; the quorum is 2.
    grid, recorder = FakeGrid([1, 2, 3], silent={1: {3}}), Recorder()
    bound = BoundGrid(grid, Roster({1: "site-1", 2: "site-2", 3: "site-3"}))
    policy = RoundPolicy(deadline_s=8.0, quorum=2, wait_for=3)
    strategy = FedAvgLoRA(
        spec=SPEC, site_of=bound.site_of, min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2
    )

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedretrain.server"):
        final = run(bound, 0.0, first_round=1, num_rounds=1, policy=policy, recorder=recorder, strategy=strategy)

    # Assert: all three were asked; the average is nodes 1 and 2 alone, (1 + 2) / 2 = 1.5
    # (with node 3 it would be (1 + 2 + 3) / 3 = 2).
    assert sorted(node for kind, _, node, _ in grid.sent if kind == MessageType.TRAIN) == [1, 2, 3]
    assert value_of(final) == 1.5
    assert recorder.ended == [(1, 1.5)]
    # Both stages closed at the policy's deadline, and the missing site was logged for each.
    assert grid.timeouts == [8.0, 8.0]
    assert caplog.text.count("1 of 3 sites did not reply by the 8 s deadline (site site-3 (node 3))") == 2
    # ... and recorded under its site and node, in train and in evaluation.
    silent = RejectedReply(
        node_id=3,
        site_id="site-3",
        reason="error reply (code 4203): 'site site-3 (node 3): no reply by the 8 s deadline'",
        code=4203,
    )
    assert strategy.round_log[1].rejected == [silent]
    assert strategy.round_log[1].evaluation_rejected == [silent]


def test_accepted_replies_below_the_quorum_lose_the_round():
    # Prepare: round 1 complete; in round 2 only node 1 answers; the quorum is 2.
    grid, recorder = FakeGrid([1, 2, 3], silent={2: {2, 3}}), Recorder()
    policy = RoundPolicy(deadline_s=5.0, quorum=2, wait_for=3)

    # Execute
    with pytest.raises(QuorumLost) as lost:
        run(grid, 0.0, first_round=1, num_rounds=3, policy=policy, recorder=recorder)

    # Assert: the message names round 2, the count and the quorum; round 1
    # ((1 + 2 + 3) / 3 = 2) was ended, round 2 neither scored nor ended.
    message = str(lost.value)
    assert message.startswith("round 2: 1 accepted train reply")
    assert "the quorum is 2" in message
    assert recorder.ended == [(1, pytest.approx(2.0))]
    assert [r for r, _ in recorder.evaluated] == [0, 1]
    # Round 2's evaluation was never sent, and round 3 never began.
    assert {(kind, r) for kind, r, _, _ in grid.sent if r >= 2} == {(MessageType.TRAIN, 2)}


def test_replies_refused_by_the_strategy_do_not_count_towards_the_quorum():
    # Prepare: node 2's reply echoes another round, so it is refused: 1 accepted < 2.
    class StaleNode2(FakeGrid):
        @staticmethod
        def answer(instruction, node):
            reply = FakeGrid.answer(instruction, node)
            if node == 2:
                reply.content["site"]["server-round"] = 0
            return reply

    grid, recorder = StaleNode2([1, 2]), Recorder()
    policy = RoundPolicy(deadline_s=5.0, quorum=2, wait_for=2)

    # Execute / Assert
    with pytest.raises(QuorumLost, match=r"^round 1: 1 accepted train reply .* the quorum is 2$"):
        run(grid, 0.0, first_round=1, num_rounds=1, policy=policy, recorder=recorder)
    assert recorder.ended == []


def test_too_few_connected_sites_lose_the_round_before_anything_is_sent():
    # Prepare: one node connected, the quorum is 2, a short deadline to wait for the other.
    grid, recorder = FakeGrid([7]), Recorder()
    policy = RoundPolicy(deadline_s=0.2, quorum=2, wait_for=2)

    # Execute
    with pytest.raises(QuorumLost) as lost:
        run(grid, 0.0, first_round=1, num_rounds=2, policy=policy, recorder=recorder)

    # Assert
    assert str(lost.value).startswith("round 1: 1 site(s) connected")
    assert "the quorum is 2" in str(lost.value)
    assert grid.sent == [] and grid.timeouts == []
    assert recorder.ended == []


class ReadyGrid(FakeGrid):
    """FakeGrid whose sites also answer the ready check: ``refuse[n]`` is node n's error code,
    ``absent`` never answer it, ``other_base`` report another base model than the coordinator's ("B")."""

    def __init__(self, nodes: list[int], refuse: dict[int, int], absent: set[int], other_base: set[int] = frozenset()):
        super().__init__(nodes)
        self.refuse, self.absent, self.other_base, self.asked = refuse, absent, other_base, []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != "query.ready":
            return super().send_and_receive(messages, timeout=timeout)
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.asked.append((node, int(msg.content["config"]["server-round"])))
            if node in self.absent:
                continue
            if node in self.refuse:
                refusal = Error(code=self.refuse[node], reason="DataValidationError: train.jsonl:5")
                reply = Message(refusal, reply_to=msg)
            else:
                site = ConfigRecord({"site-id": f"site-{node}", "server-round": msg.content["config"]["server-round"]})
                base = ConfigRecord({"sha256": "A" * 64 if node in self.other_base else "B" * 64})
                content = RecordDict({"metrics": MetricRecord({"ready": 1}), "site": site, "base-model": base})
                reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def run_ready(grid: ReadyGrid, policy: RoundPolicy, strategy: FedAvgLoRA) -> ArrayRecord:
    return run_rounds(
        grid,
        strategy,
        adapter(0.0),
        first_round=1,
        num_rounds=1,
        policy=policy,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=Recorder().evaluate,
        on_round_end=Recorder().end,
        ready_config=ConfigRecord({"run-id": "r1"}),
        base_sha256="B" * 64,
    )


def test_only_the_sites_ready_to_train_are_trained_and_the_rest_are_recorded_with_their_codes():
    # Prepare: node 3's data is bad (4101), node 4 does not answer the ready check, node 5 has
    # another base model than the coordinator's.
    grid = ReadyGrid([1, 2, 3, 4, 5], refuse={3: 4101}, absent={4}, other_base={5})
    policy = RoundPolicy(deadline_s=0.2, quorum=2, wait_for=5)
    strategy = FedAvgLoRA(spec=SPEC, min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)

    # Execute
    arrays = run_ready(grid, policy, strategy)

    # Assert: asked once each for round 1; only 1 and 2 trained ((0 + 1 + 0 + 2) / 2 = 1.5),
    # and the round waited for no more than them.
    assert sorted(grid.asked) == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]
    assert sorted(node for kind, _, node, _ in grid.sent if kind == MessageType.TRAIN) == [1, 2]
    assert value_of(arrays) == pytest.approx(1.5)
    rejected = {r.node_id: r for r in strategy.round_log[1].rejected}
    assert {n: r.code for n, r in rejected.items()} == {3: 4101, 4: None, 5: None}
    assert "its base model (AAAAAAAAAAAA) is not the coordinator's (BBBBBBBBBBBB)" in rejected[5].reason


def test_too_few_ready_sites_abort_the_cycle_before_any_site_trains():
    # Prepare: two of three sites refuse (budget), the quorum is 2.
    grid = ReadyGrid([1, 2, 3], refuse={2: 4102, 3: 4102}, absent=set())
    policy = RoundPolicy(deadline_s=0.2, quorum=2, wait_for=3)
    strategy = FedAvgLoRA(spec=SPEC, min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)

    # Execute
    with pytest.raises(QuorumLost, match=r"before round 1: 1 site\(s\) ready to train .* the quorum is 2; no site"):
        run_ready(grid, policy, strategy)

    # Assert: no train message went out; both refusals are on record, with their codes.
    assert grid.sent == []
    assert [(r.node_id, r.code) for r in strategy.round_log[1].rejected] == [(2, 4102), (3, 4102)]


def test_too_few_connected_sites_abort_the_cycle_without_a_ready_check():
    # Prepare: one node connected, the quorum is 2, a short deadline to wait for the other.
    grid = ReadyGrid([1], refuse={}, absent=set())
    policy = RoundPolicy(deadline_s=0.2, quorum=2, wait_for=2)
    strategy = FedAvgLoRA(spec=SPEC, min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)

    # Execute
    with pytest.raises(QuorumLost, match=r"^before round 1: 1 site\(s\) connected after 0 s, the quorum is 2; no site"):
        run_ready(grid, policy, strategy)

    # Assert: the connected site was not asked to check anything, nor to train.
    assert grid.asked == [] and grid.sent == []


@pytest.mark.usefixtures("keep_global_random_state")
def test_random_state_round_trips_through_json():
    # Prepare: leave a cached Gaussian in Python's and NumPy's generators, so those parts count too.
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    random.gauss(0.0, 1.0)
    np.random.randn()
    state, tensors = random_state()

    def draws() -> tuple[float, ...]:
        return (
            random.random(),
            random.gauss(0.0, 1.0),
            float(np.random.rand()),
            float(np.random.randn()),
            float(torch.rand(1)),
        )

    first = draws()
    then = draws()

    # Execute: through JSON, as a checkpoint keeps it.
    restored = json.loads(json.dumps(state, allow_nan=False))
    restore_random_state(restored, {"torch": tensors["torch"].copy()})

    # Assert: the same draws again (and the generators did move on in between).
    assert draws() == first
    assert draws() == then
    assert first != then

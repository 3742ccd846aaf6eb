"""The coordinator's watch: it polls, logs every alert with its figures, runs one cycle when a
trigger fires (with the sites that can pay, the others listed), never two at once, and keeps
its state below the registry. The cycle itself is the real one elsewhere (e2e); here it is
recorded, not run, so the watch's own decisions can be checked in milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from unittest.mock import Mock

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

import server.watch.loop
from fedretrain.config import compose_config
from fedretrain.errors import CycleBusy
from server.cycle.run import cycle_lock_path
from server.sites.broadcast import broadcast
from server.sites.grid import SiteSubset
from server.watch.loop import Watcher, request_retrain
from server.watch.poll import STATUS_MESSAGE

pytestmark = pytest.mark.usefixtures("instruction_identity")


def status(new=0, js=None, can_afford=1, spent=2.0) -> dict:
    metrics = {
        "new-records": new,
        "reference-records": 100,
        "has-reference": 1,
        "train-records": 100,
        "model-version": 1,
        "epsilon-spent": spent,
        "epsilon-ceiling": 8.0,
        "delta": 1e-5,
        "epsilon-projected": spent + 2.0,
        "can-afford": can_afford,
    }
    if js is not None:
        metrics.update({"drift-js": js, "drift-hidden": 0.1, "loss-new": 3.0, "loss-reference": 3.0})
    return metrics


def status_grid(replies: dict[int, tuple[str, dict] | Error]) -> Mock:
    """A Grid whose nodes answer the status query with the given metrics (or an error)."""
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = sorted(replies)

    def send_and_receive(messages, timeout):
        out = []
        for msg in messages:
            assert msg.metadata.message_type == STATUS_MESSAGE
            answer = replies[msg.metadata.dst_node_id]
            if isinstance(answer, Error):
                out.append(Message(answer, reply_to=msg))
            else:
                site, metrics = answer
                out.append(
                    Message(
                        RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": site})}),
                        reply_to=msg,
                    )
                )
        return out

    grid.send_and_receive.side_effect = send_and_receive
    # Flower's push and pull, as the deployed ServerApp's grid uses them (server.sites.grid.PromptGrid).
    answered: dict[str, Message] = {}

    def push_messages(messages):
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(answered)}"
            (answered[msg.metadata.message_id],) = send_and_receive([msg], None)
        return [msg.metadata.message_id for msg in messages]

    grid.push_messages.side_effect = push_messages
    grid.pull_messages.side_effect = lambda ids: [answered.pop(i) for i in list(ids) if i in answered]
    return grid


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "registry").mkdir()
    return compose_config(
        [
            "experiment=smoke",
            f"registry.root={tmp_path / 'registry'}",
            "registry.signing_key=/unused.key",
            "trigger.drift_js=0.1",
            "trigger.min_interval_s=3600",
            "strategy.min_sites=2",
        ]
    )


@pytest.fixture
def cycles(monkeypatch):
    """Record the cycles the watch starts instead of training."""
    calls = []

    def fake_run(grid, cfg, run_dir, *, config_yaml, validation_path, train_nodes, resume=False):
        calls.append({"train_nodes": sorted(train_nodes), "validation_path": validation_path})
        return {
            "run_id": f"r{len(calls)}",
            "gate": {"decision": "publish", "reasons": ["better"]},
            "published_version": len(calls),
            "pending_version": None,
            "sites": {"site-a": {"epsilon": 4.0}, "site-b": {"epsilon": 4.5}},
        }

    monkeypatch.setattr(server.watch.loop, "run_retraining", fake_run)
    return calls


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_quiet_sites_start_nothing_but_drift_at_one_site_starts_one_cycle(tmp_path, cfg, cycles):
    # Prepare: three sites; a published champion exists (no "initial" trigger)
    watch_dir = Path(cfg.registry.root) / "watch"
    (Path(cfg.registry.root) / "champion.json").write_text('{"version": 1}')
    quiet = status_grid(
        {1: ("site-a", status(30, js=0.02)), 2: ("site-b", status(30, js=0.03)), 3: ("site-c", status(30, js=0.01))}
    )
    watcher = Watcher(quiet, cfg, tmp_path / "runs", "yaml", "val.jsonl")
    watcher.state.last_cycle_at = 0.0

    # Execute: a quiet poll, then one where site-b drifted
    first = watcher.poll_once(10_000.0)
    cycles_after_first = list(cycles)
    watcher.grid = status_grid(
        {1: ("site-a", status(30, js=0.02)), 2: ("site-b", status(30, js=0.25)), 3: ("site-c", status(30, js=0.01))}
    )
    second = watcher.poll_once(20_000.0)

    # Assert: no alert, no cycle; then one drift alert with its figures and one cycle on all three
    assert not first.decision.alerts and not first.decision.start and cycles_after_first == []
    assert [a.trigger for a in second.decision.alerts] == ["drift"] and second.decision.start
    assert cycles == [{"train_nodes": [1, 2, 3], "validation_path": "val.jsonl"}]
    alerts = lines(watch_dir / "alerts.jsonl")
    assert [a["trigger"] for a in alerts] == ["drift"] and alerts[0]["started"] is True
    assert "site-b" in json.dumps(alerts[0]["figures"])
    (record,) = lines(watch_dir / "cycles.jsonl")
    assert record["triggers"] == ["drift"] and record["published_version"] == 1
    assert record["epsilon"]["site-a"] == {"before": 2.0, "after": 4.0, "spent": 2.0}
    assert json.loads((watch_dir / "state.json").read_text()) == {"last_cycle_at": 20_000.0, "polls": 2, "cycles": 1}


def test_a_site_out_of_budget_is_left_out_and_listed(tmp_path, cfg, cycles):
    grid = status_grid(
        {1: ("site-a", status(50)), 2: ("site-b", status(50, can_afford=0, spent=7.5)), 3: ("site-c", status(50))}
    )
    watcher = Watcher(grid, cfg, tmp_path / "runs", "yaml")

    event = watcher.poll_once(0.0)  # nothing published, never trained: the initial cycle

    assert [a.trigger for a in event.decision.alerts] == ["initial"]
    assert cycles[0]["train_nodes"] == [1, 3]
    assert list(event.decision.excluded) == ["site-b"] and "7.50" in event.decision.excluded["site-b"]
    (record,) = lines(Path(cfg.registry.root) / "watch" / "cycles.jsonl")
    assert record["eligible"] == ["site-a", "site-c"] and list(record["excluded"]) == ["site-b"]


def test_an_operator_request_starts_a_cycle_through_the_rate_limit_and_is_used_up(tmp_path, cfg, cycles):
    (Path(cfg.registry.root) / "champion.json").write_text('{"version": 1}')
    grid = status_grid({1: ("site-a", status(5)), 2: ("site-b", status(5))})
    watcher = Watcher(grid, cfg, tmp_path / "runs", "yaml")
    watcher.state.last_cycle_at = 1000.0
    request = request_retrain(cfg.registry.root, "new guideline published")

    started = watcher.poll_once(1060.0)  # 60 s after the last cycle; the rate limit is 3600 s
    again = watcher.poll_once(1120.0)

    assert [(a.trigger, a.message) for a in started.decision.alerts][0][0] == "operator"
    assert "new guideline published" in started.decision.alerts[0].message and len(cycles) == 1
    assert not request.exists() and (request.parent / "done" / request.name).exists()
    assert not again.decision.alerts  # the request was used up


def test_a_cycle_holding_the_lock_in_another_process_holds_the_watch(tmp_path, cfg, cycles):
    grid = status_grid({1: ("site-a", status(5)), 2: ("site-b", status(5))})
    watcher = Watcher(grid, cfg, tmp_path / "runs", "yaml")
    lock = cycle_lock_path(Path(cfg.registry.root))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from fedretrain.atomic import file_lock\n"
                f"with file_lock({str(lock)!r}):\n    print('held', flush=True); time.sleep(30)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        event = watcher.poll_once(0.0)
    finally:
        holder.kill()
        holder.wait()

    assert event.decision.alerts and not event.decision.start
    assert event.decision.held == "a cycle is already running" and cycles == []


def test_a_failed_cycle_is_recorded_and_the_watch_goes_on(tmp_path, cfg, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(server.watch.loop, "run_retraining", broken)
    grid = status_grid(
        {
            1: ("site-a", status(5)),
            2: ("site-b", status(5)),
            3: Error(code=4101, reason="site site-c: DataValidationError: bad file"),
        }
    )
    watcher = Watcher(grid, cfg, tmp_path / "runs", "yaml")

    event = watcher.poll_once(0.0)
    later = watcher.poll_once(60.0)

    assert event.failure == "RuntimeError: CUDA out of memory" and event.cycle is None
    assert [r["node_id"] for r in event.poll.refused] == [3]
    (record,) = lines(Path(cfg.registry.root) / "watch" / "cycles.jsonl")
    assert record["failure"].startswith("RuntimeError") and record["status_refused"][0]["node_id"] == 3
    assert watcher.state.cycles == 1 and not later.decision.start  # it ran (and failed): no second initial


def test_losing_the_race_for_the_cycle_lock_is_a_hold_not_a_cycle(tmp_path, cfg, monkeypatch):
    def busy(*args, **kwargs):
        raise CycleBusy("another retraining cycle is running on this registry")

    monkeypatch.setattr(server.watch.loop, "run_retraining", busy)
    (Path(cfg.registry.root) / "champion.json").write_text('{"version": 1}')
    watcher = Watcher(status_grid({1: ("site-a", status(5)), 2: ("site-b", status(5))}), cfg, tmp_path / "runs", "yaml")
    request = request_retrain(cfg.registry.root, "please")

    event = watcher.poll_once(100.0)

    assert event.decision.held == "a cycle is already running" and not event.decision.start
    assert request.exists()  # still queued for the next poll
    assert watcher.state.cycles == 0 and watcher.state.last_cycle_at is None
    assert not (Path(cfg.registry.root) / "watch" / "cycles.jsonl").exists()


def test_retrain_needs_an_existing_registry(tmp_path):
    from fedretrain.errors import ConfigError

    with pytest.raises(ConfigError, match="registry.root"):
        request_retrain(tmp_path / "nowhere", "x")


def test_the_subset_grid_offers_only_its_nodes_that_are_still_connected():
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [5, 3, 9]
    subset = SiteSubset(grid, [3, 9, 11])
    assert list(subset.get_node_ids()) == [3, 9]
    subset.send_and_receive(["m"], timeout=4)
    grid.send_and_receive.assert_called_once_with(["m"], timeout=4)


def test_two_nodes_speaking_for_one_site_are_both_refused():
    grid = status_grid({1: ("site-a", status(5)), 2: ("site-a", status(900)), 3: ("site-b", status(7))})
    out = broadcast(grid, RecordDict(), STATUS_MESSAGE, 5, lambda s, n, r: dict(r["metrics"]), what="status")
    assert list(out.answered) == ["site-b"]
    assert sorted(r["node_id"] for r in out.refused) == [1, 2]
    assert all("answered from 2 nodes" in r["reason"] for r in out.refused)


def test_run_polls_on_its_interval(tmp_path, cfg, cycles):
    grid = status_grid({1: ("site-a", status(5)), 2: ("site-b", status(5))})
    watcher = Watcher(grid, cfg, tmp_path / "runs", "yaml")
    slept, clock = [], iter([0.0, 60.0, 120.0])

    events = watcher.run(max_polls=3, clock=lambda: next(clock), sleep=slept.append)

    assert [e.at for e in events] == [0.0, 60.0, 120.0] and slept == [60.0, 60.0]
    assert len(cycles) == 1  # the initial cycle only: no other trigger fires on these sites


def test_a_poll_waits_for_sites_still_connecting_but_not_forever():
    from server.sites.grid import wait_for_nodes

    starting = Mock(spec=Grid)
    starting.get_node_ids.side_effect = [[], [4], [4, 2], [4, 2, 9]]
    assert wait_for_nodes(starting, 2, timeout_s=5, poll_s=0.01) == [2, 4]

    absent = Mock(spec=Grid)
    absent.get_node_ids.return_value = [4]
    assert wait_for_nodes(absent, 3, timeout_s=0.05, poll_s=0.01) == [4]


def test_a_watch_that_dies_in_a_cycle_finishes_it_at_its_next_start_and_records_it_once(tmp_path, cfg, monkeypatch):
    # Prepare: the watch process dies (SystemExit stands for the kill) while its cycle runs.
    calls = []

    def dies(grid, cfg, run_dir, *, config_yaml, validation_path, train_nodes, resume=False):
        calls.append({"train_nodes": train_nodes and sorted(train_nodes), "resume": resume, "run_dir": run_dir})
        if not resume:
            raise SystemExit("killed")
        return {
            "run_id": "r1",
            "gate": {"decision": "publish", "reasons": ["better"]},
            "published_version": 1,
            "pending_version": None,
            "sites": {"site-a": {"epsilon": 4.0}, "site-b": {"epsilon": 4.5}},
        }

    monkeypatch.setattr(server.watch.loop, "run_retraining", dies)
    grid = status_grid({1: ("site-a", status(5)), 2: ("site-b", status(5))})
    request = request_retrain(cfg.registry.root, "new guideline")
    watch_dir = Path(cfg.registry.root) / "watch"
    with pytest.raises(SystemExit):
        Watcher(grid, cfg, tmp_path / "runs", "yaml", "val.jsonl").poll_once(100.0)
    assert (watch_dir / "inflight.json").exists() and not (watch_dir / "cycles.jsonl").exists()

    # Execute: a new watch starts (and is asked for no poll).
    Watcher(grid, cfg, tmp_path / "runs", "yaml").run(max_polls=0)

    # Assert: the same cycle (same run directory and sites) resumed, recorded once, the request used up.
    assert [c["resume"] for c in calls] == [False, True] and calls[0]["run_dir"] == calls[1]["run_dir"]
    # Resumed with every connected site (node ids do not survive a simulation; sites refuse what they cannot pay).
    assert calls[0]["train_nodes"] == [1, 2] and calls[1]["train_nodes"] is None
    (record,) = lines(watch_dir / "cycles.jsonl")
    assert record["cycle"] == 1 and set(record["triggers"]) == {"initial", "operator"}
    assert record["published_version"] == 1 and record["epsilon"]["site-a"] == {
        "before": 2.0,
        "after": 4.0,
        "spent": 2.0,
    }
    assert not (watch_dir / "inflight.json").exists() and not request.exists()


def test_an_aborted_cycle_is_recorded_as_aborted(tmp_path, cfg, monkeypatch):
    def aborted(*args, **kwargs):
        return {"run_id": "r1", "gate": None, "aborted": "round 1: 1 site(s) accepted; the quorum is 2",
                "published_version": None, "pending_version": None, "sites": {}}  # fmt: skip

    monkeypatch.setattr(server.watch.loop, "run_retraining", aborted)
    watcher = Watcher(status_grid({1: ("site-a", status(5)), 2: ("site-b", status(5))}), cfg, tmp_path / "runs", "yaml")

    event = watcher.poll_once(0.0)

    (record,) = lines(Path(cfg.registry.root) / "watch" / "cycles.jsonl")
    assert record["decision"] == "aborted" and "the quorum is 2" in record["reasons"][0]
    assert event.failure is None


def test_the_deployed_server_app_in_poll_mode_writes_every_sites_status_for_the_service(tmp_path):
    from flwr.app import Context

    import server.app
    from server.watch.poll import StatusPoll

    grid = status_grid({1: ("site-a", status(5)), 2: ("site-b", status(7, js=0.2))})
    target = tmp_path / "last_poll.json"
    run_config = {
        **dict.fromkeys(("experiment", "run-dir", "sites-file", "train-nodes"), ""),
        "overrides": "experiment=smoke strategy.min_sites=2",
        "resume": False,
        "mode": "poll",
        "poll-file": str(target),
    }

    server.app.main(grid, Context(run_id=9, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))

    poll = StatusPoll.from_dict(json.loads(target.read_text()))
    assert [(s.site_id, s.node_id, s.new_records) for s in poll.statuses] == [("site-a", 1, 5), ("site-b", 2, 7)]
    assert poll.statuses[1].drift_js == 0.2 and poll.statuses[0].drift_js is None


def test_a_poll_file_that_claims_nonsense_is_refused(tmp_path):
    from server.watch.poll import StatusPoll

    with pytest.raises(ValueError, match="not a status poll"):
        StatusPoll.from_dict({"sites": {"a": {"site_id": "a", "node_id": 1, "new_records": -3}}, "refused": [],
                              "no_reply": []})  # fmt: skip


def test_a_deployed_watch_that_loses_sight_of_its_cycle_keeps_it_in_flight_then_records_it_once(
    tmp_path, cfg, monkeypatch
):
    import server.watch.service as service
    from fedretrain.errors import DeployError
    from server.deploy.coordinator import Coordinator
    from server.watch.poll import poll_status

    # Prepare: the SuperLink stops answering while the cycle's Flower run (77) runs.
    submitted = []
    monkeypatch.setattr(service, "submit_run", lambda coord, overrides, **kw: submitted.append(kw) or ("77", None))

    def superlink_gone(*args, **kwargs):
        raise DeployError("flwr ls: connection refused")

    monkeypatch.setattr(service, "wait_for_run", superlink_gone)
    coord = Coordinator(tmp_path / "coord")
    coord.root.mkdir()
    grid = status_grid({1: ("site-a", status(5)), 2: ("site-b", status(5))})

    def watcher() -> service.DeployedWatcher:
        w = service.DeployedWatcher(None, cfg, tmp_path / "runs", "yaml", "val.jsonl", coord=coord)
        monkeypatch.setattr(w, "poll", lambda job, min_nodes: poll_status(grid, job, cfg.monitor, min_nodes=min_nodes))
        return w

    inflight = Path(cfg.registry.root) / "watch" / "inflight.json"
    cycles_file = Path(cfg.registry.root) / "watch" / "cycles.jsonl"

    # Execute: the cycle starts and is lost sight of; a stop while waiting is a stop.
    first = watcher()
    event = first.poll_once(0.0)
    lost_record = json.loads(inflight.read_text())
    first.stop.set()
    with pytest.raises(service.Stopping):
        first.finish_inflight()

    # ... then the SuperLink is back and the run finished: a new watch records it.
    run_dir = Path(lost_record["run_dir"])
    outcome = {"run_id": "c1", "gate": {"decision": "refuse", "reasons": []}, "sites": {}}
    (run_dir / "summary.json").write_text(json.dumps({**outcome, "published_version": None, "pending_version": None}))
    monkeypatch.setattr(service, "run_status", lambda coord, run_id: "finished:completed")
    record = watcher().finish_inflight()

    # Assert: nothing recorded while the run was out of sight; recorded once after, from run 77.
    assert event.failure is None and event.cycle is None and lost_record["flower_run_id"] == "77"
    assert submitted == [{"run_dir": run_dir, "train_nodes": [1, 2]}]
    assert record["run_id"] == "c1" and record["failure"] is None and record["flower_run_id"] == "77"
    assert len(cycles_file.read_text().splitlines()) == 1 and not inflight.exists()


def test_a_deployed_poll_names_every_site_it_did_not_count_and_a_garbled_poll_leaves_the_watch_going(
    tmp_path, cfg, monkeypatch, caplog
):
    import server.watch.service as service
    from server.deploy.coordinator import Coordinator

    # Prepare: four registered sites. The poll run's file: site-a answered, site-b's reply was
    # garbage (refused by the poll run), site-c's node never answered, site-d is not connected.
    coord = Coordinator(tmp_path / "coord")
    coord.root.mkdir()
    registered = {s: {"node_id": str(n)} for s, n in (("site-a", 1), ("site-b", 2), ("site-c", 3), ("site-d", 4))}
    coord.sites_file.write_text(json.dumps(registered))
    answered = {"site_id": "site-a", "node_id": 1, **{k.replace("-", "_"): v for k, v in status(5).items()}}
    polls = [
        {
            "sites": {"site-a": answered},
            "refused": [{"node_id": 2, "site_id": "site-b", "reason": "new-records: not a finite number"}],
            "no_reply": [3],
        },
        "not a poll at all",
    ]

    def submit_poll(coord, overrides, target):
        target.write_text(json.dumps(polls.pop(0)))
        return "5"

    monkeypatch.setattr(service, "submit_poll", submit_poll)
    monkeypatch.setattr(service, "wait_for_run", lambda *a, **k: "finished:completed")
    (Path(cfg.registry.root) / "champion.json").write_text('{"version": 1}')
    at_once = dataclasses.replace(cfg, trigger=dataclasses.replace(cfg.trigger, poll_interval_s=0.01))
    watcher = service.DeployedWatcher(None, at_once, tmp_path / "runs", "yaml", "val.jsonl", coord=coord)

    # Execute: two polls, the second of which the poll run garbled.
    with caplog.at_level("WARNING", logger="fedretrain.server"):
        watcher.serve(max_polls=2)

    # Assert: each site not counted is named with its node and why; the garbled poll is
    # logged and the watch went on to its end (nothing half-written: no cycle, no state lost).
    text = caplog.text
    assert "site site-b (node 2) refused: new-records: not a finite number" in text
    assert "site site-c (node 3) did not answer in time" in text
    assert "site site-d (node 4) is not connected" in text
    assert "poll 2 failed" in text and "not a status poll" in text and "the watch goes on" in text
    assert watcher.state.polls == 1 and not (Path(cfg.registry.root) / "watch" / "inflight.json").exists()
    assert json.loads((coord.root / "watch.json").read_text())["phase"] == "stopped"

"""The coordinator's watch: poll the sites, check the triggers, run a cycle when one fires.

Every poll sends each site a ``query.status`` message (scalars back, server/watch/poll.py),
checks the triggers (server/watch/triggers.py) and, when one fires, runs one retraining cycle
(server/cycle/run.py) with the sites whose privacy budget can pay for it; the cycle ends with a
published version or with the gate's reason for publishing nothing. Everything the watch
decides is written below the registry, so an operator can read it and a restarted watch
goes on where it stopped:

    <registry>/watch/state.json        when the last cycle started, how many polls and cycles
    <registry>/watch/alerts.jsonl      every alert with its figures, and whether it started a cycle
    <registry>/watch/cycles.jsonl      every cycle: why, who took part, who was left out, the outcome
    <registry>/watch/requests/         operator requests (`fedretrain coordinator retrain`), then done/
    <registry>/watch/cycle.lock        held while a cycle runs: never two at once
    <registry>/watch/inflight.json     the cycle under way (its record so far); a watch that
                                       starts and finds it finishes that cycle first

How a poll reaches the sites and how a cycle runs is the only difference between the watch in
one ServerApp (a simulation: :class:`Watcher` on the ServerApp's grid) and the standing
service on a deployment, where each poll and each cycle is a Flower run of its own
(server/watch/service.py).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fedretrain.atomic import atomic_write_json, file_lock
from fedretrain.config import Config, Job
from fedretrain.errors import ConfigError, CycleBusy
from fedretrain.registry.store import Registry
from server.cycle.report import finite_or_null
from server.cycle.run import cycle_lock_path, run_retraining
from server.cycle.rundir import new_run_dir
from server.watch.poll import StatusPoll, poll_status
from server.watch.triggers import TriggerDecision, evaluate_triggers, format_decision

log = logging.getLogger("fedretrain.server")


class CycleUnfollowed(Exception):  # noqa: N818 - not the cycle's failure: the watch lost sight of it
    """The watch cannot tell how a cycle under way is doing (its SuperLink does not answer).

    The cycle is not recorded, neither as finished nor as failed: ``inflight.json`` stays,
    and the watch follows the cycle again later.
    """


def watch_dir(registry_root: str | Path) -> Path:
    return Path(registry_root) / "watch"


def request_retrain(registry_root: str | Path, reason: str, *, now: datetime | None = None) -> Path:
    """Queue an operator's request for a cycle; the watch starts it at its next poll."""
    if not Path(registry_root).is_dir():
        raise ConfigError(f"registry.root: {registry_root} is not a registry directory")
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    path = watch_dir(registry_root) / "requests" / f"{moment:%Y%m%dT%H%M%S}-{secrets.token_hex(4)}.json"
    atomic_write_json(path, {"reason": reason or "operator request", "requested_at": moment.isoformat()})
    return path


@dataclass
class WatchState:
    last_cycle_at: float | None = None
    polls: int = 0
    cycles: int = 0

    @classmethod
    def load(cls, path: Path) -> WatchState:
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
            last = raw["last_cycle_at"]
            return cls(
                last_cycle_at=None if last is None else float(last), polls=int(raw["polls"]), cycles=int(raw["cycles"])
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: not a valid watch state ({err}); move it aside to start afresh") from None


@dataclass(frozen=True)
class WatchEvent:
    """One poll: what the sites said, what the triggers decided, and the cycle it started (its summary)."""

    at: float
    poll: StatusPoll
    decision: TriggerDecision
    cycle: dict[str, Any] | None = None
    failure: str | None = None


@dataclass
class Watcher:
    """Polls the sites on ``grid`` and runs the cycles ``cfg.trigger`` calls for.

    A subclass that reaches the sites another way overrides :meth:`poll` and
    :meth:`run_cycle` (server/watch/service.py; ``grid`` is then None).
    """

    grid: Grid | None
    cfg: Config
    runs_dir: Path
    config_yaml: str
    validation_path: str | None = None
    expected_sites: int | None = None  # sites a poll waits for (up to its timeout); None: strategy.min_sites
    events: list[WatchEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cfg.registry.root:
            raise ConfigError("registry.root: the watch keeps its state in the coordinator's registry; set it")
        self.registry_root = Path(self.cfg.registry.root)
        self.dir = watch_dir(self.registry_root)
        self.state = WatchState.load(self.dir / "state.json")

    def poll_once(self, now: float, *, validation_path: str | None = None) -> WatchEvent:
        """StatusPoll, decide, and run a cycle if the triggers call for one. ``now`` is the triggers' clock (s)."""
        if self.state.last_cycle_at is not None and self.state.last_cycle_at > now:
            # State written under another clock (a simulated scenario on the same registry).
            log.warning(
                "watch state: the last cycle is in the future (%.0f > %.0f); ignoring it", self.state.last_cycle_at, now
            )
            self.state.last_cycle_at = None
        job = Job.from_config(self.cfg, run_id=f"status-{self.state.polls + 1}")
        poll = self.poll(job, min_nodes=self.expected_sites or self.cfg.strategy.min_sites)
        requests = sorted((self.dir / "requests").glob("*.json"))
        with file_lock(cycle_lock_path(self.registry_root), wait=False) as free:
            running = not free
        decision = evaluate_triggers(
            self.cfg.trigger,
            poll.statuses,
            now=now,
            last_cycle_at=self.state.last_cycle_at,
            champion_version=Registry(self.registry_root).champion(),
            operator_requests=[_reason(p) for p in requests],
            cycle_running=running,
            min_sites=self.cfg.strategy.min_sites,
        )
        self.state.polls += 1
        log.info("%s", format_decision(decision))
        self._log_alerts(now, decision)
        event = WatchEvent(at=now, poll=poll, decision=decision)
        if decision.start:
            event = self._cycle(now, poll, decision, requests, validation_path or self.validation_path)
        atomic_write_json(self.dir / "state.json", self.state.__dict__)
        self.events.append(event)
        return event

    def poll(self, job: Job, *, min_nodes: int) -> StatusPoll:
        """Ask every site for its status (the ``query.status`` message on ``grid``)."""
        assert self.grid is not None
        return poll_status(self.grid, job, self.cfg.monitor, min_nodes=min_nodes)

    def run_cycle(
        self, run_dir: Path, nodes: list[int], validation_path: str | None, *, resume: bool = False
    ) -> dict[str, Any]:
        """Run one retraining cycle with ``nodes`` (on ``grid``); its summary.

        Resumed, the cycle trains with every connected site: a simulation's virtual nodes get
        new ids in every run, and a site that cannot pay refuses its round itself.
        """
        assert self.grid is not None
        return run_retraining(
            self.grid,
            self.cfg,
            run_dir,
            config_yaml=self.config_yaml,
            validation_path=validation_path,
            train_nodes=None if resume else nodes,
            resume=resume,
        )

    def run(
        self,
        *,
        max_polls: int | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        stopping: Callable[[], bool] = lambda: False,
    ) -> list[WatchEvent]:
        """StatusPoll every ``trigger.poll_interval_s`` until ``stopping()`` (or ``max_polls``).

        A cycle a previous watch left under way (``inflight.json``) is finished first.
        """
        self.finish_inflight()
        polls = 0
        while (max_polls is None or polls < max_polls) and not stopping():
            if polls:
                sleep(self.cfg.trigger.poll_interval_s)
                if stopping():
                    break
            self.poll_once(clock())
            polls += 1
        return self.events

    def finish_inflight(self) -> dict[str, Any] | None:
        """Finish the cycle an earlier watch started and did not record; its record, or None."""
        path = self.dir / INFLIGHT
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
            run_dir, nodes = Path(record["run_dir"]), [int(n) for n in record["nodes"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: not a cycle record ({err}); move it aside to start afresh") from None
        log.info("cycle %s was under way when the watch stopped: finishing it (%s)", record["cycle"], run_dir)
        summary, failure = None, None
        try:
            summary = self.run_cycle(run_dir, nodes, record.get("validation_path"), resume=True)
        except CycleUnfollowed:
            raise  # not recorded: followed again later
        except Exception as err:  # noqa: BLE001 - a failed cycle is recorded; the watch goes on
            failure = f"{type(err).__name__}: {err}"
            log.exception("cycle %s failed", record["cycle"])
        return self._finish(record, summary, failure)

    def _cycle(
        self, now: float, poll: StatusPoll, decision: TriggerDecision, requests: list[Path], validation_path: str | None
    ) -> WatchEvent:
        nodes = [s.node_id for s in poll.statuses if s.site_id in decision.eligible]
        before = {s.site_id: s.epsilon_spent for s in poll.statuses}
        number = self.state.cycles + 1
        run_dir = new_run_dir(self.runs_dir, f"{self.cfg.name}-cycle{number}")
        log.info(
            "cycle %d: %s; %d sites take part, %d left out",
            number,
            ", ".join(sorted({a.trigger for a in decision.alerts})),
            len(nodes),
            len(decision.excluded),
        )
        # The rate limit counts from this start, and is on disk before the cycle runs: a watch
        # that crashes in a long cycle does not start another one at once when it comes back.
        previous = self.state.last_cycle_at
        self.state.last_cycle_at, self.state.cycles = now, number
        atomic_write_json(self.dir / "state.json", self.state.__dict__)
        record = {
            **_cycle_record(number, now, decision, poll, run_dir),
            "nodes": nodes,
            "validation_path": validation_path,
            "requests": [str(p) for p in requests],
            "epsilon_before": before,
        }
        atomic_write_json(self.dir / INFLIGHT, record)
        summary, failure = None, None
        try:
            summary = self.run_cycle(run_dir, nodes, validation_path)
        except CycleUnfollowed as err:
            log.error("cycle %d: %s; it is followed again at the next poll", number, err)
            return WatchEvent(at=now, poll=poll, decision=decision)
        except CycleBusy as err:  # another process started a cycle first: this one never ran
            (self.dir / INFLIGHT).unlink(missing_ok=True)
            self.state.last_cycle_at, self.state.cycles = previous, number - 1
            log.warning("cycle %d not started: %s", number, err)
            held = TriggerDecision(
                start=False,
                alerts=decision.alerts,
                eligible=decision.eligible,
                excluded=decision.excluded,
                held="a cycle is already running",
            )
            return WatchEvent(at=now, poll=poll, decision=held)
        except Exception as err:  # noqa: BLE001 - a failed cycle is recorded; the watch goes on
            failure = f"{type(err).__name__}: {err}"
            log.exception("cycle %d failed", number)
        self._finish(record, summary, failure)
        return WatchEvent(at=now, poll=poll, decision=decision, cycle=summary, failure=failure)

    def _finish(self, record: dict[str, Any], summary: dict[str, Any] | None, failure: str | None) -> dict[str, Any]:
        # The operator requests are done, the cycle is recorded, and only then is it no
        # longer in flight: a crash in between records it twice at worst, never loses it.
        for name in record.pop("requests", []):
            request = Path(name)
            if request.exists():
                done = request.parent / "done" / request.name
                done.parent.mkdir(parents=True, exist_ok=True)
                request.replace(done)
        before = record.pop("epsilon_before", {})
        for key in ("nodes", "validation_path"):
            record.pop(key, None)
        record = _with_outcome(record, summary, failure, before)
        self._append("cycles.jsonl", record)
        (self.dir / INFLIGHT).unlink(missing_ok=True)
        return record

    def _log_alerts(self, now: float, decision: TriggerDecision) -> None:
        for alert in decision.alerts:
            self._append(
                "alerts.jsonl",
                {
                    "at": now,
                    "trigger": alert.trigger,
                    "message": alert.message,
                    "figures": alert.figures,
                    "started": decision.start,
                    "held": decision.held,
                },
            )

    def _append(self, name: str, record: dict[str, Any]) -> None:
        # Appends of one line each: a crash loses at most the line being written.
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def write_watch_summary(run_dir: Path, events: list[WatchEvent]) -> Path:
    """``summary.json`` of a watch: every poll, its alerts, and the cycles it ran."""
    polls = [
        {
            "at": e.at,
            "sites": len(e.poll.statuses),
            "refused": len(e.poll.refused),
            "no_reply": len(e.poll.no_reply),
            **e.decision.to_dict(),
            "cycle": None
            if e.cycle is None
            else {
                "run_id": e.cycle["run_id"],
                "decision": (e.cycle.get("gate") or {"decision": "aborted"})["decision"],
                "published_version": e.cycle["published_version"],
            },
            "failure": e.failure,
        }
        for e in events
    ]
    summary = {
        "polls": polls,
        "cycles": sum(1 for e in events if e.decision.start),
        "published_versions": [
            e.cycle["published_version"]
            for e in events
            if e.cycle is not None and e.cycle["published_version"] is not None
        ],
    }
    path = Path(run_dir) / "summary.json"
    atomic_write_json(path, finite_or_null(summary))
    return path


def _reason(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("reason") or "operator request")
    except (OSError, ValueError):
        return "operator request"


INFLIGHT = "inflight.json"


def _cycle_record(
    number: int, now: float, decision: TriggerDecision, poll: StatusPoll, run_dir: Path
) -> dict[str, Any]:
    return {
        "cycle": number,
        "at": now,
        "triggers": sorted({a.trigger for a in decision.alerts}),
        "eligible": list(decision.eligible),
        "excluded": decision.excluded,
        # Sites whose status was refused or never came are not in this cycle either.
        "status_refused": list(poll.refused),
        "status_no_reply": list(poll.no_reply),
        "run_dir": str(run_dir),
    }


def _with_outcome(
    record: dict[str, Any], summary: dict[str, Any] | None, failure: str | None, before: dict[str, float]
) -> dict[str, Any]:
    record = {**record, "failure": failure}
    if summary is not None:
        sites = summary.get("sites", {})
        gate = summary.get("gate") or {"decision": "aborted", "reasons": [summary.get("aborted")]}
        record.update(
            run_id=summary["run_id"],
            decision=gate["decision"],
            reasons=gate["reasons"],
            published_version=summary["published_version"],
            pending_version=summary["pending_version"],
            installed=sorted((summary.get("publication") or {}).get("installed") or []),
            epsilon={
                s: {
                    "before": before.get(s),
                    "after": v.get("epsilon"),
                    "spent": None
                    if v.get("epsilon") is None or before.get(s) is None
                    else round(v["epsilon"] - before[s], 6),
                }
                for s, v in sites.items()
            },
        )
    return record

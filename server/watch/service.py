"""``fedretrain coordinator watch --dir COORD``: the watch as a standing service on the deployment.

The same watch as in a simulation (server/watch/loop.py: triggers, alerts, rate limit, the
sites' budgets, the records below ``<registry>/watch/``), reaching the sites through the
running SuperLink: each status poll is a Flower run of this project's ServerApp in poll mode
(every site's ``query.status`` reply, bound to the site whose key its node proved, written
to ``<registry>/watch/last_poll.json``), and each cycle a Flower run of its own, with the
eligible sites' nodes only. The service waits for every run it submits, so two cycles never
run at once (and a cycle also holds the registry's cycle lock).

It is a service: its state is on disk, so a restarted watch goes on where it stopped. A
cycle under way when it stopped (``inflight.json``, with the Flower run's id) is finished
first: waited for if its run still runs, resumed from its last checkpoint if its ServerApp
died (a site asked again for a round it trained sends the same update, spending nothing
twice). SIGTERM or SIGINT stops it between two waits; a cycle run keeps running on the
SuperLink and the next start waits for it. A poll that fails (a SuperLink restarting, a
site that cannot be reached, a malformed reply) is logged and the watch polls again at its
next interval; a cycle it cannot follow (its SuperLink does not answer) stays in flight,
unrecorded, and is followed again before the next poll; a cycle that fails is recorded.
What it is doing is in ``<dir>/watch.json``, which ``fedretrain coordinator status`` prints.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedretrain.atomic import atomic_write_json, file_lock
from fedretrain.config import Config, Job, compose_raw, to_yaml
from fedretrain.config.parse import build
from fedretrain.errors import ConfigError, DeployError
from server.deploy.coordinator import (
    Coordinator,
    absolute_paths,
    run_status,
    submit_poll,
    submit_run,
    wait_for_run,
)
from server.watch.loop import INFLIGHT, CycleUnfollowed, Watcher
from server.watch.poll import StatusPoll

log = logging.getLogger("fedretrain.server")

# Flower runs a poll or a cycle may take beyond their own deadlines (process start-up, the
# model load at the coordinator) before the watch gives up on them.
RUN_SLACK_S = 600.0


# How often the watch asks the SuperLink whether a cycle's run has finished: one Control API
# request (a few ms of CPU, see fedretrain.deploy.flower.ControlApi); a cycle lasts minutes.
CYCLE_CHECK_S = 2.0


class Stopping(BaseException):  # noqa: N818 - not an error: the service was asked to stop
    """Raised out of a wait when the service is asked to stop (not an Exception: a cycle in
    flight is left to finish, not recorded as failed)."""


def service_file(coord: Coordinator) -> Path:
    return coord.root / "watch.json"


@dataclass
class DeployedWatcher(Watcher):
    """The watch whose polls and cycles are Flower runs on ``coord``'s SuperLink."""

    coord: Coordinator | None = None
    overrides: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def poll(self, job: Job, *, min_nodes: int) -> StatusPoll:
        assert self.coord is not None
        # A file of this poll's own: a poll run left behind by a stopped watch cannot write into it.
        target = self.dir / "polls" / f"{secrets.token_hex(8)}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        run_id = submit_poll(self.coord, self.overrides, target.resolve())
        self._phase("polling", run_id)
        final = wait_for_run(
            self.coord, run_id, self.cfg.monitor.status_timeout_s + RUN_SLACK_S, sleep=self._sleep_or_stop
        )
        if final != "finished:completed" or not target.exists():
            target.unlink(missing_ok=True)
            raise DeployError(f"status poll (Flower run {run_id}) ended {final} without replies; see `flwr log`")
        try:
            poll = StatusPoll.from_dict(json.loads(target.read_text()))
        except ValueError as err:
            target.unlink()  # refused, as a site's garbled reply is: nothing of it is kept
            raise DeployError(f"{target.name}: {err}") from None
        target.replace(self.dir / "last_poll.json")  # what the operator reads
        log.info(
            "status poll (Flower run %s): %d sites answered, %d refused, in %.1f s",
            run_id,
            len(poll.statuses),
            len(poll.refused),
            time.monotonic() - started,
        )
        self._log_missing(poll)
        return poll

    def _log_missing(self, poll: StatusPoll) -> None:
        """Name every registered site the poll did not count, and why (the poll run's own log
        is not the operator's)."""
        assert self.coord is not None
        registered = {site: str(v.get("node_id", "?")) for site, v in self.coord.sites().items()}
        by_node = {node: site for site, node in registered.items()}
        seen = {s.site_id for s in poll.statuses}
        for refused in poll.refused:
            site = refused.get("site_id") or by_node.get(str(refused.get("node_id")), "an unregistered site")
            seen.add(str(site))
            node, reason = refused.get("node_id"), refused.get("reason")
            log.warning("status poll: site %s (node %s) refused: %s", site, node, reason)
        for node in poll.no_reply:
            site = by_node.get(str(node), "an unregistered site")
            seen.add(site)
            log.warning("status poll: site %s (node %s) did not answer in time", site, node)
        for site in sorted(set(registered) - seen):
            log.warning("status poll: site %s (node %s) is not connected", site, registered[site])

    def run_cycle(
        self, run_dir: Path, nodes: list[int], validation_path: str | None, *, resume: bool = False
    ) -> dict[str, Any]:
        assert self.coord is not None
        run_id = self._inflight_run_id() if resume else None
        try:
            still_running = run_id is not None and not run_status(self.coord, run_id).startswith("finished")
        except DeployError as err:
            raise self._unfollowed(run_id, err) from None
        if still_running:
            log.info("cycle run %s is still running: waiting for it", run_id)
        elif resume and (run_dir / "summary.json").exists():
            run_id = None  # it finished while the watch was away
        elif resume and any((run_dir / "checkpoints").glob("round-*")):
            run_id, _ = submit_run(self.coord, [], resume=run_dir, train_nodes=nodes)
            log.info("cycle resumed from its last checkpoint as Flower run %s", run_id)
        else:
            if resume:
                log.info("the cycle had no complete round: starting it again")
            run_id, _ = submit_run(self.coord, self.overrides, run_dir=run_dir, train_nodes=nodes)
        if run_id is not None:
            self._remember_run(run_id)
            self._phase("cycle", run_id, run_dir=str(run_dir))
            try:
                final = wait_for_run(
                    self.coord, run_id, self._cycle_timeout_s(), poll_s=CYCLE_CHECK_S, sleep=self._sleep_or_stop
                )
            except DeployError as err:
                raise self._unfollowed(run_id, err) from None
            log.info("cycle run %s: %s", run_id, final)
        summary = run_dir / "summary.json"
        if not summary.exists():
            raise DeployError(f"the cycle's Flower run ended without a summary; see {run_dir / 'run.log'}")
        result: dict[str, Any] = json.loads(summary.read_text())
        return result

    def serve(self, *, max_polls: int | None = None) -> None:
        """Poll on the interval until stopped (or ``max_polls``); a failed poll is logged, not fatal."""
        self._phase("starting")
        try:
            self._finish_inflight_or_log()
            polls = 0
            while (max_polls is None or polls < max_polls) and not self.stop.is_set():
                if polls:
                    self._phase("sleeping")
                    if self.stop.wait(self.cfg.trigger.poll_interval_s):
                        break
                if (self.dir / INFLIGHT).exists():
                    self._finish_inflight_or_log()  # a cycle it lost sight of: followed again first
                    if (self.dir / INFLIGHT).exists():
                        polls += 1
                        continue
                try:
                    self.poll_once(time.time())
                except DeployError as err:
                    if self.stop.is_set():
                        break
                    log.error("poll %d failed: %s; the watch goes on", self.state.polls + 1, err)
                polls += 1
        except Stopping:
            log.info("the watch was asked to stop; a cycle under way is finished at its next start")
        finally:
            self._phase("stopped")

    def _unfollowed(self, run_id: str | None, err: DeployError) -> BaseException:
        # A stop kills the flwr CLI call in hand too (systemd and Ctrl-C signal the whole
        # group): that is the stop, not a lost SuperLink.
        if self.stop.is_set():
            return Stopping()
        return CycleUnfollowed(f"cannot follow the cycle's Flower run {run_id} ({err})")

    def _finish_inflight_or_log(self) -> None:
        try:
            self.finish_inflight()
        except (CycleUnfollowed, DeployError) as err:
            log.error("the cycle under way could not be followed: %s; the watch tries again at its next poll", err)

    def _sleep_or_stop(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopping

    def _cycle_timeout_s(self) -> float:
        cfg = self.cfg
        # Every round and the final evaluation may each wait for their deadline, twice (sites, replies).
        return 2 * cfg.strategy.round_timeout_s * (cfg.rounds + 2) + RUN_SLACK_S

    def _inflight_run_id(self) -> str | None:
        try:
            value = json.loads((self.dir / INFLIGHT).read_text()).get("flower_run_id")
        except (OSError, ValueError, AttributeError):
            return None
        return str(value) if value else None

    def _remember_run(self, run_id: str) -> None:
        # In the in-flight record: a watch restarted while this run runs waits for it.
        path = self.dir / INFLIGHT
        record = json.loads(path.read_text())
        atomic_write_json(path, {**record, "flower_run_id": run_id})

    def _phase(self, phase: str, run_id: str | None = None, **more: Any) -> None:
        assert self.coord is not None
        atomic_write_json(
            service_file(self.coord),
            {
                "pid": os.getpid(),
                "phase": phase,
                "flower_run": run_id,
                "since": time.time(),
                "polls": self.state.polls,
                "cycles": self.state.cycles,
                "registry": str(self.registry_root),
                **more,
            },
        )


def watch_service(coord: Coordinator, overrides: list[str]) -> DeployedWatcher:
    """Run the standing watch on ``coord`` until SIGTERM or SIGINT (or ``trigger.max_polls`` polls).

    The overrides are the cycles' config (paths taken relative to the current directory,
    as ``coordinator run`` takes them); ``registry.root`` and ``validation_path`` are required.
    """
    coord.settings()  # a coordinator directory with a SuperLink, or a clear error
    overrides = absolute_paths(overrides, Path.cwd(), default_output=coord.root / "runs")
    raw = compose_raw(overrides)
    cfg = build(Config, raw)
    if not cfg.validation_path:
        raise ConfigError("validation_path: the watch's cycles compare candidates on the coordinator's validation set")
    with file_lock(coord.root / "watch.lock", wait=False) as free:
        if not free:
            raise DeployError(f"{coord.root}: another watch runs on this coordinator (see {service_file(coord)})")
        watcher = DeployedWatcher(
            None,
            cfg,
            Path(cfg.output_dir),
            to_yaml(raw),
            cfg.validation_path,
            coord=coord,
            overrides=overrides,
        )

        def request_stop(*_: Any) -> None:
            # From another thread: Event.set here could wait on a lock this thread holds.
            threading.Thread(target=watcher.stop.set, daemon=True).start()

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("watching %s: a poll every %.0f s", coord.root, cfg.trigger.poll_interval_s)
            watcher.serve(max_polls=cfg.trigger.max_polls)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return watcher

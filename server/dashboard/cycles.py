"""One cycle as its run directory says it: metrics.jsonl's rows as written, summary.json as written.

The view passes the files' figures through unchanged (the JSON endpoint is what the run
wrote) and adds what a reader needs first: the round reached of the rounds planned, whether
the cycle finished, and the refused replies. A round that lost its quorum is never scored,
so it has no metrics row; ``summary.json``'s ``refusals`` still names its sites, and is used
once it exists.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.cycle.rundir import LOCK_NAME
from server.dashboard.catalogue import Catalogue, RunDir, configured, read_jsonl, read_object, registry_of
from server.sites.live import LIVE_NAME


def cycle_view(run: RunDir) -> dict[str, Any]:
    """Everything the Cycle page shows of ``run``."""
    problems: list[str] = []
    rows: list[Any] = []
    metrics = run.file("metrics.jsonl")
    if metrics is not None:
        rows, torn = read_jsonl(metrics)
        problems += torn
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("round"), int)]
    summary = _summary(run, problems)
    registry = registry_of(run)
    live = _live(run, problems)
    return {
        "run_id": run.run_id,
        "path": str(run.path),
        "name": (summary or {}).get("name") or configured(run, "name"),
        "state": run_state(run, summary),
        "round": max((r["round"] for r in rows), default=None),
        "rounds": planned_rounds(run, summary),
        "registry_id": None if registry is None else registry.registry_id,
        "refusals": _refusals(rows, summary),
        "quorum": configured(run, "strategy", "quorum"),
        # The exchange with the sites under way (none once the cycle is written), and each
        # round's seconds split into the sites' exchanges and the coordinator's own work.
        "exchange": _under_way(run, summary, live),
        "split": _split(rows, (live or {}).get("history") or []),
        "metrics": rows,
        "summary": summary,
        "problems": problems,
    }


def cycle_list(catalogue: Catalogue) -> list[dict[str, Any]]:
    """One line per run, newest first: the Cycle page's index."""
    out = []
    for run in catalogue.runs():
        view = cycle_view(run)
        gate = (view["summary"] or {}).get("gate") or {}
        out.append(
            {
                "run_id": run.run_id,
                "name": view["name"],
                "state": view["state"],
                "round": view["round"],
                "rounds": view["rounds"],
                "decision": gate.get("decision"),
                "published_version": (view["summary"] or {}).get("published_version"),
                "pending_version": (view["summary"] or {}).get("pending_version"),
                "registry_id": view["registry_id"],
                "last_written": datetime.fromtimestamp(run.modified, UTC).isoformat(timespec="seconds"),
            }
        )
    return out


def installs(summary: dict[str, Any]) -> Iterator[tuple[str, str, int, Any]]:
    """Each site's reply to the run's start-of-cycle sync, then to its publication (summary.json's
    ``sync`` and ``publication``): (how, site, the version it reported installed, the version sent)."""
    for how in ("sync", "publication"):
        delivery = summary.get(how)
        if not isinstance(delivery, dict):
            continue
        for site, reply in (delivery.get("installed") or {}).items():
            if isinstance(reply, dict) and isinstance(reply.get("installed-version"), int):
                yield how, site, reply["installed-version"], delivery.get("version")


def planned_rounds(run: RunDir, summary: dict[str, Any] | None) -> int | None:
    """R of "round i of R": the summary's, or before it exists the config's."""
    rounds = (summary or {}).get("rounds", configured(run, "rounds"))
    return rounds if isinstance(rounds, int) else None


def run_state(run: RunDir, summary: dict[str, Any] | None) -> str:
    """``finished``, ``aborted`` (a round lost its quorum), ``running`` or ``stopped`` (a deployed
    cycle whose ServerApp holds, or no longer holds, its lock), or ``no summary yet``."""
    if summary is not None:
        return "aborted" if summary.get("aborted") else "finished"
    lock = run.file(LOCK_NAME)
    if lock is None:
        return "no summary yet"
    held = _flock_held(lock)
    return "no summary yet" if held is None else "running" if held else "stopped"


def _live(run: RunDir, problems: list[str]) -> dict[str, Any] | None:
    path = run.file(LIVE_NAME)
    if path is None:
        return None
    live = read_object(path, LIVE_NAME, problems)
    return live if isinstance(live, dict) else None


def _under_way(run: RunDir, summary: dict[str, Any] | None, live: dict[str, Any] | None) -> dict[str, Any] | None:
    """live.json's exchange under way, while the cycle can still be running (not once it is
    written, nor when its ServerApp no longer holds the run)."""
    current = None if live is None else live.get("current")
    if summary is not None or not isinstance(current, dict) or run_state(run, summary) == "stopped":
        return None
    return current


def _split(rows: list[dict[str, Any]], history: list[Any]) -> list[dict[str, Any]]:
    """Per round: the seconds of its exchanges with the sites (they compute; the coordinator
    waits) and the rest of the round's seconds (aggregation, scoring, checkpoint)."""
    exchanges: dict[int, float] = {}
    for done in history:
        if (
            isinstance(done, dict)
            and isinstance(done.get("round"), int)
            and isinstance(done.get("seconds"), int | float)
        ):
            exchanges[done["round"]] = exchanges.get(done["round"], 0.0) + float(done["seconds"])
    out = []
    for row in rows:
        total = row.get("round_s")
        if row["round"] in exchanges and isinstance(total, int | float):
            sites = min(exchanges[row["round"]], float(total))
            out.append({"round": row["round"], "sites_s": round(sites, 3), "coordinator_s": round(total - sites, 3)})
    return out


def _summary(run: RunDir, problems: list[str]) -> dict[str, Any] | None:
    path = run.file("summary.json")
    return None if path is None else read_object(path, "summary.json", problems)


def _refusals(rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> list[Any]:
    if summary is not None and isinstance(summary.get("refusals"), list):
        return list(summary["refusals"])
    return [{**r, "round": row["round"]} for row in rows for r in row.get("rejected") or [] if isinstance(r, dict)]


def _flock_held(path: Path) -> bool | None:
    # Read from /proc/locks rather than by taking the lock: a shared lock taken here, however
    # briefly, would make a ServerApp starting that moment refuse its own run directory.
    try:
        stat = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    ident = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    return any("FLOCK" in fields and ident in fields for fields in map(str.split, table.splitlines()))

"""Every site of every federation: its lifetime ε against its ceiling, its drift, and the watch.

A federation is a registry and the runs that publish into it (their ``config.yaml`` names
it); runs whose registry does not exist yet form one more group. Each site's figures come
from three places, each shown with where it came from:

- the newest run that has the site: ``summary.json``'s ``sites`` (or, before the summary, the
  newest metrics.jsonl row), the site's lifetime ε after that run as the site reported it;
- the newest privacy ledger of the site a simulation copied into a run directory
  (``ledgers/<site>.json``), its ε computed again from its entries by the ledger's own code;
- the deployment's last status poll (``<registry>/watch/last_poll.json``), checked again as
  the watch checks a reply: ε spent, new records, and the drift scores a site shares.

The bar is the newest of these figures (by file time) against the site's ceiling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedretrain.errors import LedgerError
from fedretrain.privacy.ledger import PrivacyLedger
from server.dashboard.catalogue import (
    Catalogue,
    RegistryDir,
    RunDir,
    configured,
    inside,
    read_json,
    read_jsonl,
    registry_of,
)
from server.dashboard.cycles import cycle_view, installs

RECENT = 20  # watch alerts and cycles shown, newest first


def federation_view(catalogue: Catalogue) -> dict[str, Any]:
    """The Federation page: one entry per federation, newest first, and the coordinator folder."""
    runs = catalogue.runs()
    by_registry: dict[str | None, list[RunDir]] = {}
    for run in runs:
        registry = registry_of(run)
        by_registry.setdefault(None if registry is None else registry.registry_id, []).append(run)
    newest = {key: runs.index(group[0]) for key, group in by_registry.items()}
    registries = sorted(catalogue.registries(), key=lambda r: newest.get(r.registry_id, len(runs)))
    federations = [_federation(r, by_registry.get(r.registry_id, [])) for r in registries]
    if None in by_registry:
        federations.append(_federation(None, by_registry[None]))
    return {"federations": federations, "coordinator": _coordinator(catalogue.coordinator)}


def alerts_view(catalogue: Catalogue) -> dict[str, Any]:
    """The Alerts page: each federation's watch (its alerts and the cycles it ran), and every cycle."""
    from server.dashboard.cycles import cycle_list

    federations = federation_view(catalogue)["federations"]
    watched = [{"registry": f["registry"], "watch": f["watch"]} for f in federations if f["watch"]]
    return {"federations": watched, "cycles": cycle_list(catalogue)}


def _federation(registry: RegistryDir | None, runs: Sequence[RunDir]) -> dict[str, Any]:
    problems: list[str] = []
    sites: dict[str, dict[str, Any]] = {}
    for run in runs:  # newest first: a site's newest run wins
        for site, figures in _run_sites(run, problems).items():
            sites.setdefault(site, {"site_id": site, "run": figures, "ledger": None, "status": None})
    for site, ledger in _ledgers(runs, problems).items():
        sites.setdefault(site, {"site_id": site, "run": None, "ledger": None, "status": None})["ledger"] = ledger
    watch = _watch(registry, problems)
    for status in (watch or {}).get("statuses", []):
        entry = sites.setdefault(status["site_id"], {"site_id": status["site_id"], "run": None, "ledger": None})
        entry["status"] = status
    for entry in sites.values():
        entry.update(_budget(entry))
    thresholds = next(
        (
            {
                "drift_js": configured(run, "trigger", "drift_js"),
                "drift_hidden": configured(run, "trigger", "drift_hidden"),
            }
            for run in runs
            if configured(run, "trigger") is not None
        ),
        {"drift_js": None, "drift_hidden": None},
    )
    return {
        "thresholds": thresholds,
        "registry": None if registry is None else {"registry_id": registry.registry_id, "path": str(registry.path)},
        "runs": [run.run_id for run in runs],
        "sites": [sites[s] for s in sorted(sites)],
        "watch": watch,
        "problems": problems,
    }


def _run_sites(run: RunDir, problems: list[str]) -> dict[str, dict[str, Any]]:
    view = cycle_view(run)
    problems += [f"{run.run_id}: {p}" for p in view["problems"]]
    at = _iso(run.modified)
    if view["summary"] is not None and isinstance(view["summary"].get("sites"), dict):
        # The version each site reported installed at the end of the run (the publication, later, wins).
        installed = {site: version for _, site, version, _ in installs(view["summary"])}
        return {
            site: {**figures, "run_id": run.run_id, "source": "summary.json", "at": at}
            | {"installed_version": installed.get(site)}
            for site, figures in view["summary"]["sites"].items()
            if isinstance(figures, dict)
        }
    if view["metrics"]:
        last = view["metrics"][-1]
        return {
            site: {**figures, "run_id": run.run_id, "source": f"metrics.jsonl round {last['round']}", "at": at}
            for site, figures in (last.get("sites") or {}).items()
            if isinstance(figures, dict)
        }
    return {}


def _ledgers(runs: Sequence[RunDir], problems: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for run in runs:
        # A simulated watch or scenario copies the ledgers into its own directory, above its cycles.
        holder = run.path.parent.parent if "~" in run.run_id else run.path
        folder = inside(holder / "ledgers", holder)
        if folder is None:
            continue
        for path in sorted(folder.glob("*.json")):
            if inside(path, folder) is None or path.stem in found:
                continue
            stat = path.stat()
            try:
                figures = _ledger(str(path), stat.st_mtime_ns, stat.st_size)
            except (LedgerError, OSError, ValueError, KeyError, TypeError) as err:
                problems.append(f"{run.run_id}: ledgers/{path.name}: {err}")
                continue
            found[path.stem] = {**figures, "run_id": run.run_id, "at": _iso(stat.st_mtime)}
    return found


@lru_cache(maxsize=256)
def _ledger(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    # The ledger's own loader checks the file and recomputes ε from its entries (its
    # stored ``epsilon`` is for people and never trusted); cached on the file's time and size.
    # Its module is imported with this one, not on the first request: the accountants' imports
    # take seconds (the first Federation page took 1.5 s in benchmarks/bench_dashboard.py, then 40 ms).
    header = read_json(Path(path))
    ledger = PrivacyLedger.load(path, site_id=header["site_id"], accountant=header["accountant"], delta=header["delta"])
    return {
        "epsilon": ledger.epsilon(),
        "releases": len(ledger.entries),
        "accountant": ledger.accountant,
        "delta": ledger.delta,
    }


def _watch(registry: RegistryDir | None, problems: list[str]) -> dict[str, Any] | None:
    if registry is None:
        return None
    folder = inside(registry.path / "watch", registry.path)
    if folder is None:
        return None
    alerts, torn = read_jsonl(folder / "alerts.jsonl")
    cycles, more = read_jsonl(folder / "cycles.jsonl")
    problems += torn + more
    return {
        "state": _json(folder, "state.json", problems),
        "inflight": _json(folder, "inflight.json", problems),
        "alerts": alerts[::-1][:RECENT],
        "cycles": cycles[::-1][:RECENT],
        **_last_poll(folder, problems),
    }


def _last_poll(folder: Path, problems: list[str]) -> dict[str, Any]:
    from server.watch.poll import StatusPoll

    raw = _json(folder, "last_poll.json", problems)
    if raw is None:
        return {"statuses": [], "poll": None}
    try:
        poll = StatusPoll.from_dict(raw)  # checked again, as the watch checks it
    except ValueError as err:
        problems.append(f"watch/last_poll.json: {err}")
        return {"statuses": [], "poll": None}
    at = _iso((folder / "last_poll.json").stat().st_mtime)
    statuses = [{**dataclasses.asdict(s), "at": at} for s in poll.statuses]
    return {"statuses": statuses, "poll": {"at": at, "refused": list(poll.refused), "no_reply": list(poll.no_reply)}}


def _budget(entry: dict[str, Any]) -> dict[str, Any]:
    """The bar: the newest ε figure of the site (run, ledger, status poll) against its ceiling."""
    run, ledger, status = entry.get("run"), entry.get("ledger"), entry.get("status")
    figures = [
        (run["at"], run.get("epsilon"), f"run {run['run_id']} ({run['source']})") if run else None,
        (ledger["at"], ledger["epsilon"], f"ledger copied by run {ledger['run_id']}") if ledger else None,
        (status["at"], status["epsilon_spent"], "the last status poll") if status else None,
    ]
    known = [f for f in figures if f is not None and isinstance(f[1], int | float)]
    ceilings = [f.get(key) for f, key in ((status, "epsilon_ceiling"), (run, "epsilon_ceiling")) if f]
    ceiling = next((c for c in ceilings if isinstance(c, int | float)), None)
    if not known:
        return {"epsilon_spent": None, "epsilon_ceiling": ceiling, "spent_source": None}
    at, spent, source = max(known, key=lambda f: f[0])
    return {"epsilon_spent": spent, "epsilon_ceiling": ceiling, "spent_source": source}


def _coordinator(root: Path | None) -> dict[str, Any] | None:
    if root is None:
        return None
    from server.deploy.coordinator import Coordinator, watch_status

    coord = Coordinator(root)
    view: dict[str, Any] = {"path": str(root), "sites": {}, "watch": watch_status(coord), "problems": []}
    try:
        view["sites"] = {site: info.get("node_id") for site, info in coord.sites().items()}
    except (OSError, ValueError, AttributeError) as err:  # sites.json: site id -> node id and public key
        view["problems"].append(f"sites.json: {err}")
    return view


def _json(folder: Path, name: str, problems: list[str]) -> Any:
    path = inside(folder / name, folder)
    if path is None:
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        problems.append(f"watch/{name}: {err}")
        return None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")

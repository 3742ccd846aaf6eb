"""The registry as a timeline, read the way ``fedretrain registry list`` and ``show`` read it.

Versions, their status and manifests, the champion pointer records, rollback and approval
records and the gate's decisions come from :class:`fedretrain.registry.store.Registry`, as
they are on disk: nothing here verifies a signature. The champion shown is ``champion.json``'s,
as ``registry list`` shows it; ``fedretrain registry verify --pubkey`` is what checks the
signed chain, and the page gives that command. Which sites installed a version comes from the
runs that publish into the registry (``summary.json``'s ``publication`` and ``sync``).

Approving and rolling back need the coordinator's private key: the page gives the exact
command for each version it applies to, and does neither itself.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedretrain.errors import RegistryError
from fedretrain.registry.manifest import parse_time, utc_now
from fedretrain.registry.store import Registry
from fedretrain.registry.student import student_record
from server.dashboard.catalogue import (
    Catalogue,
    RegistryDir,
    RunDir,
    configured,
    inside,
    read_object,
    registry_of,
)
from server.dashboard.cycles import cycle_view, installs

DEFAULT_KEY = Path("keys/coordinator.key")  # README "Publishing": where `fedretrain keys coordinator` writes it
READ_ERRORS = (RegistryError, OSError, ValueError, KeyError, TypeError)


def registry_list(catalogue: Catalogue) -> list[dict[str, Any]]:
    """Every registry the dashboard knows, with its champion and the versions awaiting approval."""
    out = []
    for registry in catalogue.registries():
        reg, problems = Registry(registry.path), list[str]()
        versions = reg.versions()
        champion = _champion(reg, problems)
        out.append(
            {
                "registry_id": registry.registry_id,
                "path": str(registry.path),
                "versions": versions,
                "champion": None if champion is None else champion["version"],
                "pending": [v for v in versions if _status(reg, v, problems) == "pending"],
                "problems": problems,
            }
        )
    return out


def versions_view(registry: RegistryDir, catalogue: Catalogue) -> dict[str, Any]:
    """The Versions page of one registry."""
    reg, problems = Registry(registry.path), list[str]()
    runs = [run for run in catalogue.runs() if registry_of(run) == registry]
    views = [cycle_view(run) for run in runs]
    commands = _Commands(registry.path, _signing_key(runs))
    champion = _champion(reg, problems)
    pointers = _records(reg.pointers(), problems, "pointers")
    rollbacks = _records(reg.rollbacks(), problems, "rollbacks")
    ever_champion = {p.get("version") for p in pointers}
    installed = _installations(views)
    rows = []
    for version in reg.versions()[::-1]:
        row = _version(reg, version, installed.get(version, {}), problems)
        row["commands"] = commands.for_version(row, champion, ever_champion)
        rows.append(row)
    by_run_id = {(v["summary"] or {}).get("run_id"): v["run_id"] for v in views}
    decisions = _decisions(reg, problems)
    return {
        "registry_id": registry.registry_id,
        "path": str(registry.path),
        "champion": champion,
        "versions": rows,
        "pending": [row["version"] for row in rows if row["status"] == "pending"],
        "timeline": _timeline(registry.path, rows, pointers, rollbacks),
        "pointers": pointers,
        "rollbacks": rollbacks,
        "decisions": [{**d, "dashboard_run": by_run_id.get(d.get("run_id"))} for d in decisions[::-1]],
        "runs": [run.run_id for run in runs],
        "commands": commands.for_registry(),
        "problems": problems,
    }


def version_detail(registry: RegistryDir, version: int) -> dict[str, Any] | None:
    """What ``fedretrain registry show VERSION`` prints: the manifest and the status; None if no such version."""
    reg, problems = Registry(registry.path), list[str]()
    if version not in reg.versions():
        return None
    return _version(reg, version, {}, problems) | {"problems": problems}


class _Commands:
    """The CLI commands an operator runs on this registry (README "Publishing")."""

    def __init__(self, root: Path, key: Path) -> None:
        self.root, self.key = shlex.quote(str(root)), shlex.quote(str(key))
        # `fedretrain keys coordinator` writes the public half beside the private key.
        self.pubkey = shlex.quote(str(key.with_suffix(".pub")))

    def for_registry(self) -> dict[str, str]:
        return {
            "list": f"fedretrain registry list --root {self.root}",
            "verify": f"fedretrain registry verify --root {self.root} --pubkey {self.pubkey}",
        }

    def for_version(self, row: dict[str, Any], champion: dict[str, Any] | None, ever: set[Any]) -> dict[str, str]:
        version, out = row["version"], {"show": f"fedretrain registry show {row['version']} --root {self.root}"}
        if row["status"] == "pending":
            out["approve"] = f"fedretrain registry approve {version} --root {self.root} --key {self.key}"
        current = None if champion is None else champion.get("version")
        # What `registry rollback` accepts: older than the champion, once champion, not expired.
        if isinstance(current, int) and version < current and version in ever and not row["expired"]:
            reason = shlex.quote(f"back to version {version}")
            out["rollback"] = (
                f"fedretrain registry rollback {version} --root {self.root} --key {self.key} --reason {reason}"
            )
        return out


def _version(reg: Registry, version: int, installed: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] | None = reg.manifest(version)
    except READ_ERRORS as err:
        problems.append(f"version {version}: {err}")
        manifest = None
    expires = (manifest or {}).get("expires_at")
    try:
        expired = isinstance(expires, str) and parse_time(expires) <= utc_now()
    except ValueError:
        expired = False
    return {
        "version": version,
        "status": _status(reg, version, problems),
        "expired": expired,
        "manifest": manifest,
        "approval": _approval(reg, version, problems),
        "installed": installed,
        "student": _student(reg, version, problems),
    }


def _student(reg: Registry, version: int, problems: list[str]) -> dict[str, Any] | None:
    """The version's distilled student as stored (unverified, like the manifest; `registry verify` checks it)."""
    try:
        student = reg.student(version)
        return None if student is None else student_record(student)
    except READ_ERRORS as err:
        problems.append(f"student of version {version}: {err}")
        return None


def _approval(reg: Registry, version: int, problems: list[str]) -> dict[str, Any] | None:
    folder = reg.version_dir(version)
    path = inside(folder / "approval.json", folder)
    return None if path is None else read_object(path, f"version {version}: approval.json", problems)


def _installations(views: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """version -> site -> the first run whose publication (or start-of-cycle sync) the site installed it in."""
    out: dict[int, dict[str, Any]] = {}
    for view in views[::-1]:  # oldest first: a later sync of a version it already has adds nothing
        for how, site, version, sent in installs(view["summary"] or {}):
            if version == sent:
                out.setdefault(version, {}).setdefault(site, {"run": view["run_id"], "how": how})
    return out


def _timeline(
    root: Path, rows: Sequence[dict[str, Any]], pointers: Sequence[dict[str, Any]], rollbacks: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every event, newest first: each version's creation, and each move of the champion (publish,
    approve, rollback) with its approval's or rollback's record."""
    events = []
    for row in rows:
        manifest = row["manifest"] or {}
        gate, run = manifest.get("gate") or {}, manifest.get("run") or {}
        detail = f"gate: {gate.get('decision')}, run {run.get('name')} ({run.get('run_id')})"
        written = _written(root / "versions" / f"{row['version']:06d}" / "manifest.json")
        event = {"at": manifest.get("created_at"), "event": "created", "version": row["version"], "detail": detail}
        events.append((written, event))
    approvals = {row["version"]: row["approval"] or {} for row in rows}
    by_sequence = {r.get("sequence"): r for r in rollbacks}
    for record in pointers:
        version, reason, sequence = record.get("version"), record.get("reason"), record.get("sequence")
        detail = f"champion record {sequence}"
        if reason == "approve":
            detail = f"approved by {approvals.get(version, {}).get('approver')}; {detail}"
        elif reason == "rollback":
            rollback = by_sequence.get(record.get("rollback_sequence")) or {}
            detail = f"rolled back from version {rollback.get('from_version')}: {rollback.get('reason')}; {detail}"
        written = _written(root / "pointers" / f"{sequence:06d}.json") if isinstance(sequence, int) else 0
        event = {"at": record.get("created_at"), "event": f"champion ({reason})", "version": version}
        events.append((written, event | {"detail": detail}))
    # The records' times have whole seconds; within one second the files' own times keep the order.
    events.sort(key=lambda e: (str(e[1]["at"]), e[0]), reverse=True)
    return [event for _, event in events]


def _written(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _records(pairs: Sequence[tuple[int, Any]], problems: list[str], folder: str) -> list[dict[str, Any]]:
    out = []
    for number, signed in pairs:
        try:
            out.append(signed.record)
        except ValueError as err:  # VerificationError: not canonical JSON
            problems.append(f"{folder}/{number:06d}.json: {err}")
    return out


def _champion(reg: Registry, problems: list[str]) -> dict[str, Any] | None:
    try:
        return reg.champion_record()
    except READ_ERRORS as err:
        problems.append(f"champion.json: {err}")
        return None


def _status(reg: Registry, version: int, problems: list[str]) -> str | None:
    try:
        return reg.status(version)
    except READ_ERRORS as err:
        problems.append(f"version {version}: status: {err}")
        return None


def _decisions(reg: Registry, problems: list[str]) -> list[dict[str, Any]]:
    try:
        return reg.decisions()
    except READ_ERRORS as err:
        problems.append(f"decisions.jsonl: {err}")
        return []


def _signing_key(runs: Sequence[RunDir]) -> Path:
    """The key path the newest run that publishes here was given (``registry.signing_key``)."""
    for run in runs:
        key = configured(run, "registry", "signing_key")
        if isinstance(key, str) and key:
            return Path(key)
    return DEFAULT_KEY

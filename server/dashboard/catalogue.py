"""What the dashboard may read: run directories and registries found by listing the roots it was given.

A URL names a run or a registry by an id; the id is looked up in what listing found and
never joined onto a path, so ``..``, an absolute path or a URL-encoded slash finds nothing.
A run's id is its directory's name; a cycle that a watch or a drift scenario ran below its
own run directory (``<run>/cycles/<cycle>``) is ``<run>~<cycle>``. A directory, or a file in
one, that resolves outside its root (a symbolic link out) is not read. If two roots hold a
run of the same name, the first root's is shown.

A registry is one given with ``--registry``, or one a run's ``config.yaml`` names
(``registry.root``), or the one a deployment's standing watch names (``<dir>/watch.json``); its
id is a hash of its resolved path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedretrain.errors import ConfigError, ResumeError

NAME = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
RUN_ID = re.compile(rf"{NAME}(~{NAME})?")
REGISTRY_ID = re.compile(r"[0-9a-f]{12}")
NESTED = "cycles"  # where a watch and a drift scenario keep the cycles they ran
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


@dataclass(frozen=True)
class RunDir:
    """One cycle's run directory."""

    run_id: str
    path: Path
    modified: float  # the newest of its run files' times: orders runs

    def file(self, name: str) -> Path | None:
        """``name`` in this run directory, or None when it is missing or resolves outside it."""
        return inside(self.path / name, self.path)


@dataclass(frozen=True)
class RegistryDir:
    """A registry directory and the id the dashboard gives it."""

    registry_id: str
    path: Path


@dataclass(frozen=True)
class Catalogue:
    """The roots the dashboard reads: run directories, a coordinator folder, registries."""

    runs_roots: tuple[Path, ...] = ()
    coordinator: Path | None = None
    registry_roots: tuple[Path, ...] = ()

    @classmethod
    def open(cls, runs: Path | None, coordinator: Path | None, registries: Sequence[Path] = ()) -> Catalogue:
        """Check the roots given on the command line (ConfigError names the option)."""
        if runs is None and coordinator is None and not registries:
            raise ConfigError("give --runs DIR (run directories), --dir DIR (a coordinator folder) or --registry DIR")
        for option, path in [("--runs", runs), ("--dir", coordinator), *(("--registry", r) for r in registries)]:
            if path is not None and not Path(path).is_dir():
                raise ConfigError(f"{option} {path}: not a directory")
        for path in registries:
            if not _is_registry(Path(path)):
                raise ConfigError(
                    f"--registry {path}: not a registry (no registry.json, versions/, decisions.jsonl or watch/)"
                )
        roots = [Path(runs).resolve()] if runs is not None else []
        if coordinator is not None and (Path(coordinator) / "runs").is_dir():
            roots.append((Path(coordinator) / "runs").resolve())
        return cls(
            runs_roots=tuple(roots),
            coordinator=None if coordinator is None else Path(coordinator).resolve(),
            registry_roots=tuple(Path(r).resolve() for r in registries),
        )

    def runs(self) -> list[RunDir]:
        """Every run found now, newest first."""
        found: dict[str, RunDir] = {}
        for root in self.runs_roots:
            for run_id, path in _listed_runs(root):
                found.setdefault(run_id, RunDir(run_id, path, _modified(path)))
        return sorted(found.values(), key=lambda r: (r.modified, r.run_id), reverse=True)

    def run(self, run_id: str) -> RunDir | None:
        """The run with this id, or None."""
        return next((r for r in self.runs() if r.run_id == run_id), None)

    def registries(self) -> list[RegistryDir]:
        """Every registry: given, named by a run's config, named by the deployment's watch."""
        paths = list(self.registry_roots)
        paths += [r.path for run in self.runs() if (r := registry_of(run)) is not None]
        if self.coordinator is not None:
            paths += [p for p in [_watch_registry(self.coordinator)] if p is not None]
        unique = {path: None for path in paths if _is_registry(path)}
        return [RegistryDir(_registry_id(path), path) for path in unique]

    def registry(self, registry_id: str) -> RegistryDir | None:
        """The registry with this id, or None."""
        return next((r for r in self.registries() if r.registry_id == registry_id), None)


def run_config(run: RunDir) -> dict[str, Any] | None:
    """The composed config ``run`` was started with (its ``config.yaml``), or None if it has none."""
    config = run.file("config.yaml")
    if config is None:
        return None
    stat = config.stat()
    return _config(str(config), stat.st_mtime_ns, stat.st_size)


def configured(run: RunDir, *keys: str) -> Any:
    """The value at ``keys`` in ``run``'s config (``configured(run, "registry", "root")``), or None."""
    node: Any = run_config(run)
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def registry_of(run: RunDir) -> RegistryDir | None:
    """The registry ``run`` publishes into (its config's ``registry.root``), once it exists."""
    root = configured(run, "registry", "root")
    if not isinstance(root, str) or not root or not _is_registry(Path(root).resolve()):
        return None
    return RegistryDir(_registry_id(Path(root).resolve()), Path(root).resolve())


def read_json(path: Path) -> Any:
    """A JSON file's content (OSError or ValueError, a JSONDecodeError, when it cannot be read)."""
    return json.loads(path.read_text(encoding="utf-8"))


def read_object(path: Path, label: str, problems: list[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``; None, with a problem named by ``label``, when it is unreadable or not an object."""
    try:
        value = read_json(path)
    except (OSError, ValueError) as err:
        problems.append(f"{label}: {err}")
        return None
    if not isinstance(value, dict):
        problems.append(f"{label}: not a JSON object")
        return None
    return value


def read_jsonl(path: Path) -> tuple[list[Any], list[str]]:
    """An append-only JSON-lines log: its rows, and a problem for each line that is not JSON
    (a watch killed mid-append leaves its last line torn); ([], []) when there is no file."""
    if not path.is_file():
        return [], []
    rows, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            problems.append(f"{path.name}:{number}: not JSON ({err})")
    return rows, problems


def _listed_runs(root: Path) -> Iterator[tuple[str, Path]]:
    for child in _subdirs(root):
        if _is_run(child):
            yield child.name, child
        for cycle in _subdirs(child / NESTED):
            if _is_run(cycle) and inside(cycle, root) is not None:
                yield f"{child.name}~{cycle.name}", cycle


def _subdirs(folder: Path) -> list[Path]:
    # Only names an id can spell; anything that resolves outside ``folder`` is left alone.
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if re.fullmatch(NAME, p.name) and p.is_dir() and inside(p, folder) is not None
    )


def _is_run(path: Path) -> bool:
    # A watch's or a scenario's own directory has cycles/ and no config.yaml: its cycles are the runs.
    return any((path / name).is_file() for name in ("config.yaml", "metrics.jsonl"))


def _modified(path: Path) -> float:
    times = [(path / name).stat().st_mtime for name in RUN_FILES if (path / name).is_file()]
    return max(times, default=0.0)


def inside(path: Path, root: Path) -> Path | None:
    """``path`` resolved, if it exists and resolves below ``root`` (links followed); else None."""
    if not path.exists():
        return None
    resolved = path.resolve()
    return resolved if resolved.is_relative_to(root.resolve()) else None


def _is_registry(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("registry.json", "versions", "decisions.jsonl", "watch")
    )


def _registry_id(path: Path) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()[:12]


@lru_cache(maxsize=1024)
def _config(config: str, mtime_ns: int, size: int) -> dict[str, Any] | None:
    # Keyed on the file's time and size: a page is polled every few seconds, a run's config never changes.
    from server.app import load_run_config

    try:
        return load_run_config(Path(config).parent)
    except ResumeError:
        return None


def _watch_registry(coordinator: Path) -> Path | None:
    from server.deploy.coordinator import Coordinator, watch_status

    root = (watch_status(Coordinator(coordinator)) or {}).get("registry")
    return Path(root).resolve() if isinstance(root, str) and root else None

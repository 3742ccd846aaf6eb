"""One run directory as an export reads it: config.yaml, metrics.jsonl and summary.json.

The cycle writes each of them whole (server/cycle/report.py), so a line that is not JSON is
damage, not a write in progress: it is refused with the file and line named, and nothing of
that run is exported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedretrain.errors import TrackingError

NESTED = "cycles"  # where a watch and a drift scenario keep the cycles they ran (<run>/cycles/<cycle>)
# A run's name is a key in the trackers (an MLflow tag searched for, a TensorBoard folder).
RUN_NAME = re.compile(r"[\w.+~-]{1,250}")


@dataclass(frozen=True)
class RunFiles:
    """What one run directory says now.

    Attributes
    ----------
    path : Path
        The run directory, resolved.
    name : str
        The run's name in the trackers: the directory's name, ``<run>~<cycle>`` for a cycle
        a watch ran below its own directory (as the dashboard names it).
    config : dict
        config.yaml, the composed config the run was started with.
    rows : tuple of dict
        metrics.jsonl, one row per round scored so far (round 0: the starting point).
    summary : dict or None
        summary.json, once the cycle has ended.
    started_ms, ended_ms : int, int or None
        When config.yaml and summary.json were written (ms since the epoch): the times an
        export gives the run, and its rounds (``started_ms`` plus their ``elapsed_s``).
    """

    path: Path
    name: str
    config: dict[str, Any]
    rows: tuple[dict[str, Any], ...]
    summary: dict[str, Any] | None
    started_ms: int
    ended_ms: int | None

    @property
    def state(self) -> str:
        """``running`` until summary.json exists, then ``aborted`` (a round lost its quorum) or ``finished``."""
        if self.summary is None:
            return "running"
        return "aborted" if self.summary.get("aborted") else "finished"

    @property
    def last_round(self) -> int:
        return max(row["round"] for row in self.rows)

    @property
    def registry_root(self) -> Path | None:
        """The registry the run publishes into (its config's ``registry.root``, else its summary's)."""
        root = _get(self.config, "registry", "root") or (self.summary or {}).get("registry")
        return Path(root) if isinstance(root, str) and root else None

    def configured(self, *keys: str) -> Any:
        """The run's config value at ``keys`` (``configured("tracking", "experiment")``), or None."""
        return _get(self.config, *keys)

    def timestamp_ms(self, row: Mapping[str, Any]) -> int:
        """When ``row``'s round ended, from the run's start and the row's ``elapsed_s``."""
        elapsed = row.get("elapsed_s")
        return self.started_ms + (round(elapsed * 1000) if isinstance(elapsed, int | float) else 0)


def read_run(path: Path) -> RunFiles:
    """Read the run directory ``path``.

    Raises
    ------
    TrackingError
        Naming the directory, file or line: not a directory, no config.yaml or
        metrics.jsonl, a line that is not a JSON object with its ``round``, a summary.json
        that is not a JSON object.
    """
    path = Path(path)
    if not path.is_dir():
        raise TrackingError(f"{path}: not a directory")
    path = path.resolve()
    name = run_name(path)
    config_path, metrics_path, summary_path = (path / n for n in ("config.yaml", "metrics.jsonl", "summary.json"))
    for required in (metrics_path, config_path):
        if not required.is_file():
            raise TrackingError(f"{required}: no such file; not a run directory, or its cycle has not scored round 0")
    config = _read_config(config_path)
    rows = _read_rows(metrics_path)
    summary = None
    if summary_path.is_file():
        summary = _read_object(summary_path)
    return RunFiles(
        path=path,
        name=name,
        config=config,
        rows=rows,
        summary=summary,
        started_ms=int(config_path.stat().st_mtime * 1000),
        ended_ms=int(summary_path.stat().st_mtime * 1000) if summary is not None else None,
    )


def run_name(path: Path) -> str:
    """The name of run directory ``path`` in the trackers (see :class:`RunFiles`)."""
    path = Path(path).resolve()
    name = f"{path.parent.parent.name}~{path.name}" if path.parent.name == NESTED else path.name
    if not RUN_NAME.fullmatch(name):
        raise TrackingError(f"{path}: a run directory's name must be letters, digits and . _ + - only, got {name!r}")
    return name


def _read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise TrackingError(f"{path}: cannot read the run's config ({err})") from None
    if not isinstance(config, dict):
        raise TrackingError(f"{path}: not a config mapping")
    return config


def _read_rows(path: Path) -> tuple[dict[str, Any], ...]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TrackingError(f"{path}: cannot be read ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise TrackingError(f"{path}:{number}: not JSON ({err}); the run directory is damaged") from None
        round_ = row.get("round") if isinstance(row, dict) else None
        if type(round_) is not int or round_ < 0:
            raise TrackingError(f"{path}:{number}: not a round's row (no 'round' >= 0)")
        if not isinstance(row.get("validation"), dict):
            raise TrackingError(f"{path}:{number}: round {round_} has no 'validation' figures")
        rows.append(row)
    if not rows:
        raise TrackingError(f"{path}: no rounds yet")
    return tuple(rows)


def _read_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TrackingError(f"{path}: not JSON ({err})") from None
    if not isinstance(value, dict):
        raise TrackingError(f"{path}: not a JSON object")
    return value


def _get(node: Any, *keys: str) -> Any:
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node

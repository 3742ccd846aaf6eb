"""What a site's inference service keeps, on the site only: each request, and feedback on it.

``<state_dir>/serving/requests.jsonl``: one line per answer (its id, time, the installed version
that answered, latency, token counts, the prompt and the answer); ``feedback.jsonl``: one line
per rating (``good``/``bad``) or correction. Both are append-only: a line is written whole
with one ``write`` on a file opened for appending and flushed to disk, so two processes (the
service and ``fedretrain site feedback``) can add to them; a line torn by a crash is skipped
when read, and said. Nothing here leaves the site: the per-version scores are for the site's
operator (and, noised, for the staged rollout to come).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedretrain.errors import ConfigError

log = logging.getLogger("fedretrain.site")

RATINGS = ("good", "bad")
Z95 = 1.959963984540054


class UnknownRequest(ConfigError):
    """Feedback names a request this site never answered."""


@dataclass
class Journal:
    """The request and feedback logs of one site (see the module docstring)."""

    root: Path
    _requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    _read_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def at(cls, state_dir: Path) -> Journal:
        root = Path(state_dir) / "serving"
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls(root)

    @property
    def requests_path(self) -> Path:
        return self.root / "requests.jsonl"

    @property
    def feedback_path(self) -> Path:
        return self.root / "feedback.jsonl"

    def record_request(self, entry: dict[str, Any]) -> None:
        with self._lock:
            append_line(self.requests_path, entry)
            self._requests[entry["id"]] = entry

    def request(self, request_id: str) -> dict[str, Any]:
        """The answer ``request_id`` names (UnknownRequest if this site never gave it)."""
        with self._lock:
            self._catch_up()
            found = self._requests.get(request_id)
        if found is None:
            raise UnknownRequest(f"feedback: no request {request_id[:80]!r} was answered at this site")
        return found

    def record_feedback(self, entry: dict[str, Any]) -> None:
        append_line(self.feedback_path, entry)

    def answered(self) -> dict[str, dict[str, Any]]:
        """Every answer recorded so far, by request id."""
        with self._lock:
            self._catch_up()
            return dict(self._requests)

    def all_feedback(self) -> list[dict[str, Any]]:
        """Every rating and correction recorded so far, oldest first."""
        return list(read_lines(self.feedback_path))

    def feedback_for(self, request_id: str) -> list[dict[str, Any]]:
        """The feedback recorded on one answer."""
        return [f for f in read_lines(self.feedback_path) if f.get("id") == request_id]

    def scores(self) -> list[dict[str, Any]]:
        """Per installed version: requests, median and 95th-percentile latency, ratings with the
        share rated good and its 95 % Wilson interval, corrections."""
        with self._lock:
            self._catch_up()
            requests = dict(self._requests)
        by_version: dict[int, dict[str, Any]] = {}
        for entry in requests.values():
            row = by_version.setdefault(entry["version"], {"latencies": [], "good": 0, "bad": 0, "corrections": 0})
            row["latencies"].append(float(entry["latency_s"]))
        for feedback in read_lines(self.feedback_path):
            answered = requests.get(str(feedback.get("id")))
            if answered is None:
                continue
            row = by_version[answered["version"]]
            if feedback.get("rating") in RATINGS:
                row[feedback["rating"]] += 1
            elif "correction" in feedback:
                row["corrections"] += 1
        out = []
        for version, row in sorted(by_version.items()):
            latencies = sorted(row.pop("latencies"))
            rated = row["good"] + row["bad"]
            low, high = wilson(row["good"], rated)
            out.append(
                {
                    "version": version,
                    "requests": len(latencies),
                    "latency_median_s": statistics.median(latencies),
                    "latency_p95_s": latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)],
                    **row,
                    "good_rate": row["good"] / rated if rated else None,
                    "good_rate_interval": None if not rated else [low, high],
                }
            )
        return out

    def _catch_up(self) -> None:
        # Lines another process (or this one) appended since the last read.
        path = self.requests_path
        if not path.exists() or path.stat().st_size == self._read_bytes:
            return
        with path.open("rb") as f:
            f.seek(self._read_bytes)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self._read_bytes += len(complete)
        for entry in _parse(complete, path):
            self._requests[entry["id"]] = entry


def wilson(successes: int, trials: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of a share (0, 1 when there are no trials)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + Z95**2 / (2 * trials)) / (1 + Z95**2 / trials)
    spread = Z95 * math.sqrt(p * (1 - p) / trials + Z95**2 / (4 * trials**2)) / (1 + Z95**2 / trials)
    return max(0.0, centre - spread), min(1.0, centre + spread)


def append_line(path: Path, entry: dict[str, Any]) -> None:
    line = (json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the service and `fedretrain site feedback` append in turn
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a line torn by a crash stays alone (skipped when read), not glued to this one
        written = 0
        while written < len(line):  # a short write (a nearly full disk) is finished or raises
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    if path.exists():
        yield from _parse(path.read_bytes(), path)


def _parse(content: bytes, path: Path) -> Iterator[dict[str, Any]]:
    for number, raw in enumerate(content.splitlines(), 1):
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: a line (%d of this read) is not JSON (torn by a crash?); skipped", path, number)
            continue
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            yield entry


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

"""``fedretrain`` started as a user starts it, in a process of its own, for the tests that need a
server running (the dashboard, a site's service) or a long simulation beside a browser."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_cli(args: Sequence[str], *, cwd: Path = REPO, log: Path | None = None) -> subprocess.Popen:
    """``fedretrain ARGS`` in ``cwd`` (this checkout's code), its output piped, or to ``log``
    (a long run would fill a pipe nobody reads)."""
    out = subprocess.PIPE if log is None else log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        stdout=out,
        stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
        text=True,
    )


def first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The first line ``proc`` prints (a server's address), or what went wrong instead."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            return proc.stdout.readline().strip()
        if proc.poll() is not None:
            return f"exited {proc.returncode}: " + proc.stderr.read()
    return "no address printed in time"

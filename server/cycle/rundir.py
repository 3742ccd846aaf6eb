"""Where a run's files go, and which ServerApp holds them."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedretrain.atomic import lock_held
from fedretrain.errors import ResumeError

# Held (flock) by the ServerApp running the cycle in a run directory.
LOCK_NAME = "serverapp.lock"


def new_run_dir(output_dir: Path, name: str) -> Path:
    """Create ``<output_dir>/<UTC timestamp>-<name>`` (with a suffix if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for attempt in range(1000):
        candidate = output_dir / (f"{stamp}-{name}" if attempt == 0 else f"{stamp}-{name}-{attempt}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a run directory below {output_dir}")


@contextmanager
def cycle_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for the ServerApp running its cycle, for as long as it runs.

    The kernel lets go when that process ends, however it ends. So a crashed cycle can be
    resumed as soon as its ServerApp is gone, and a cycle whose ServerApp is alive cannot be
    run twice at once: Flower alone cannot say which, for its SuperLink notices a dead
    ServerApp only when its heartbeats lapse (about 60 s: 30 s interval, patience 2).
    """
    fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResumeError(f"{run_dir}: another ServerApp is running this cycle") from None
        yield
    finally:
        os.close(fd)  # closing lets go of the lock


def cycle_running(run_dir: Path) -> bool:
    """Whether a live ServerApp holds ``run_dir`` (:func:`cycle_lock`)."""
    return lock_held(Path(run_dir) / LOCK_NAME)

"""Where a run's files go."""

from __future__ import annotations

import time
from pathlib import Path


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

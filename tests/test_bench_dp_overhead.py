"""Smoke test: the DP overhead benchmark runs end to end and writes its JSON rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_run_writes_rows_for_hooks_at_the_default_batch(repo: Path, tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "x.json"
    command = [sys.executable, str(repo / "benchmarks" / "bench_dp_overhead.py"), "--quick",
               "--threads", "1", "--json", str(out)]

    # Execute: as a file from the repo root, as the docstring says (not python -m).
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120)

    # Assert: one step-time row per DP mode run (hooks only) at B=16, ratio = value / peer.
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    assert all(set(row) == {"name", "value", "limit_or_peer", "ratio"} for row in rows)
    by_name = {row["name"]: row for row in rows}
    step = by_name["dp_step_ms_hooks_b16"]
    assert step["value"] > 0 and step["limit_or_peer"] > 0
    assert math.isclose(step["ratio"], step["value"] / step["limit_or_peer"], rel_tol=1e-9)
    assert not any("ghost" in name or "b64" in name for name in by_name)
    assert by_name["grad_sample_floor_bytes_b16"]["value"] == 8192 * 16 * 4  # r=8 on q,v of 2 layers

"""Smoke test: the aggregation benchmark runs and agrees with Flower's own FedAvg."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_run_writes_ratio_rows(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "agg.json"
    command = [sys.executable, str(repo / "benchmarks" / "bench_aggregation.py"), "--quick", "--reps", "1",
               "--json", str(out)]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert rows and all(set(row) == {"name", "value", "limit_or_peer", "ratio"} for row in rows)
    assert all(row["ratio"] is None or row["ratio"] > 0 for row in rows)

"""Smoke test: the publishing benchmark runs and writes its rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_run_writes_rows(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "publish.json"
    command = [sys.executable, str(repo / "benchmarks" / "bench_publish.py"), "--quick", "--json", str(out)]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [row["name"].split(" (")[0] for row in rows][:3] == [
        "sign manifest",
        "publish version",
        "verify version at a site",
    ]
    assert all(set(row) == {"name", "value", "limit_or_peer", "ratio"} and row["value"] > 0 for row in rows)

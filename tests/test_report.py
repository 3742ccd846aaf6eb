"""The run directory's files stay valid JSON whatever the figures are."""

from __future__ import annotations

import json

from server.cycle.report import RunRecorder, format_summary


def test_run_files_record_a_broken_figure_as_null(tmp_path):
    recorder = RunRecorder(tmp_path, "rounds: 1\n")
    recorder.record_round({"round": 1, "validation": {"candidate_loss": float("nan")}})
    recorder.write_summary({"candidate_loss": float("inf"), "sites": {}})
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["validation"]["candidate_loss"] is None
    assert json.loads((tmp_path / "summary.json").read_text())["candidate_loss"] is None


def test_summary_table_prints_a_site_without_heldout_figures():
    summary = {
        "name": "t",
        "rounds": 1,
        "wall_time_s": 1.0,
        "baseline_loss": 2.0,
        "candidate_loss": 1.5,
        "sites": {"site-00": {"epsilon": None, "epsilon_ceiling": 8.0, "delta": 1e-5, "noise_multiplier": 0.0}},
        "communication": {
            "bytes_down_per_round": 10,
            "bytes_up_per_round": 10,
            "bytes_per_client_per_round": 20,
            "adapter_to_model_ratio": 0.01,
            "full_model_bytes": 2000,
        },
        "run_dir": "x",
    }
    table = format_summary(summary)
    assert "site-00" in table and "off" in table  # non-private site: epsilon shown as off

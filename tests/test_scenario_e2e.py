"""The drift scenario end to end on Flower's simulation engine, as the README runs it, shrunk in time:
the undrifted step raises no alert, the drifted step does, one cycle publishes a version every
site installs, and on fresh data it beats the version that was never retrained."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_readme import LEARNING_COMMAND, SCENARIO_COMMAND, readme_blocks

from fedretrain.config import compose_config

REPO = Path(__file__).resolve().parents[1]
# Step 0 publishes version 1, step 1 is quiet, the data drifts at step 2. No rate limit, so the
# drifted step can start its cycle two simulated days after the first one. The gate rests on the
# coordinator's validation set, which follows the drift (a fresh sample each step), and each
# site's own check: the sites' pooled interval needs hundreds of held-out records a site to
# confirm the drifted cycle's ~0.17 nats at the sites (with ~47 it did in ~57% of runs, with
# ~176 in 5 of 5), and is run for real by tests/test_simulation_e2e.py's ``make demo``. Notes
# cut to 128 tokens, half the compute: the drift scores keep their margins (measured: quiet step
# 0.001-0.011, drifted 0.084-0.088, threshold 0.03; at 64 tokens the quiet step fired).
SHRINK = [
    "scenario.steps=2",
    "scenario.drift_step=2",
    "trigger.min_interval_s=0",
    "gate.require_federated_confidence=false",
    "model.max_length=128",
    # What is under test is the drift trigger and the recovery. A site's noised record count
    # (std about 35 on 40 records) weighs its loss gap, so the performance trigger fired by
    # chance in the quiet step now and then; and a site's 0.02 tolerance sits within its noise.
    "trigger.performance_margin=null",
    "gate.site_tolerance=1",
    # The robustness suite (on by default) is tests/test_robustness_e2e.py's; here it would only cost time.
    "gate.robustness.enabled=false",
    # One Ray actor runs the sites in turn: each actor imports torch, transformers, peft and opacus
    # (about 7 s of CPU), and on CI's 2 cores the CPU, not the wall clock, is what the suite waits on.
    "simulation.client_cpus=2",
]
# The README's command with issue 19's options (each measured by benchmarks/bench_learning.py):
# uncertainty selection, replay of the previous window, and a student distilled from each version
# for site-00, which chose it; distilled in 5 steps, with any gap let through (what is under test
# is the path, not the student's quality).
LEARNING = [*shlex.split(LEARNING_COMMAND)[3:], "distill.steps=5", "distill.tolerance=100"]


@pytest.mark.e2e
@pytest.mark.slow
def test_drift_is_detected_retrained_published_and_recovers(tmp_path):
    # Prepare: the README's command
    assert {SCENARIO_COMMAND, LEARNING_COMMAND} <= {c for block in readme_blocks() for c in block}

    # Execute
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *shlex.split(SCENARIO_COMMAND)[1:], *SHRINK, *LEARNING]
        + [f"output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
    )

    # Assert
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (run_dir,) = tmp_path.glob("*-drift")
    result = json.loads((run_dir / "scenario.json").read_text())
    step0, quiet, drifted = result["timeline"]
    assert [a["trigger"] for a in step0["alerts"]] == ["initial"] and step0["published_in_step"] == 1
    # Undrifted new records: counted (with the status noise, so any count >= 0), scored, and
    # below every threshold.
    assert quiet["alerts"] == [] and not quiet["cycle_started"]
    threshold = compose_config(["experiment=drift"]).trigger.drift_js
    assert all(s["new_records"] >= 0 and s["drift_js"] < threshold for s in quiet["sites"].values())
    # Drifted records: the drift trigger fires at every site's figures, one cycle runs and publishes.
    assert "drift" in [a["trigger"] for a in drifted["alerts"]]
    assert all(s["drift_js"] > threshold for s in drifted["sites"].values())
    assert drifted["cycle_started"] and drifted["published_in_step"] == 2
    assert drifted["installed_at"] == sorted(drifted["sites"])
    # Recovery: on the drifted step's fresh data the new version beats version 1.
    assert drifted["loss_published"] < drifted["loss_never_retrained"]
    assert result["recovered_step"] == 2 and result["cycles"] == 2
    # Privacy across cycles: each cycle spent from the sites' lifetime ledgers.
    cycles = [
        json.loads(line)
        for line in (run_dir / "sites" / "coordinator" / "registry" / "watch" / "cycles.jsonl").read_text().splitlines()
    ]
    for site, eps in cycles[1]["epsilon"].items():
        assert eps["spent"] > 0 and eps["after"] <= 8.0, site
    assert (run_dir / "drift.png").stat().st_size > 10_000
    assert "fresh-data loss from then on" in proc.stdout
    # Forgetting is measured on a probe of the pre-drift distribution, before and after the drift's cycle.
    assert result["forgetting"] == pytest.approx(drifted["loss_pre_drift"] - quiet["loss_pre_drift"], abs=1e-5)
    assert "forgetting: loss on pre-drift records" in proc.stdout
    # Each published version was distilled; site-00 (model-variant='student') installed each student.
    for cycle_dir in sorted((run_dir / "cycles").iterdir()):
        summary = json.loads((cycle_dir / "summary.json").read_text())
        assert summary["student"]["decision"] == "passed", cycle_dir.name
        assert set(summary["publication"]["students"]["installed"]) == {"site-00"}, cycle_dir.name
    assert "student of version 2: 1 of 2 layers" in proc.stdout

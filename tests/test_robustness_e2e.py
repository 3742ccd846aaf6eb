"""The gate's memorisation probe in Flower's simulation engine, through the real CLI: without
DP, the sites' training lets the model learn the canaries planted in their notes, and the gate
refuses the candidate naming the figure, though it is far better on the validation set."""

from __future__ import annotations

import json
import shlex

import pytest
from test_readme import readme_commands
from test_simulation_e2e import simulate

from cli.exits import GATE_REFUSED

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

(COMMAND,) = [c for c in readme_commands() if c.startswith("fedretrain simulate") and "simulation.canaries" in c]
# Two sites, two rounds of 12 local steps on notes cut to 64 tokens: each site holds three
# canaries 32 times (measured: exposure +0.30 and +0.28 nats against the 0.1 tolerance, 20-22 s;
# the README's three sites and three rounds: +0.31 and +0.33, 24 s).
SHRINK = [
    "simulation.num_sites=2",
    "rounds=2",
    "data.records_per_site=160",
    "data.validation_records=120",
    "model.max_length=64",
    "train.local_steps=12",
    "gate.site_tolerance=1",
    "simulation.client_cpus=2",  # one Ray actor: one import of torch and its kin, not two
]


def test_a_candidate_that_memorised_the_planted_canaries_is_refused(tmp_path):
    run_dir, output = simulate(*shlex.split(COMMAND)[2:], *SHRINK, f"output_dir={tmp_path}", status=GATE_REFUSED)

    summary = json.loads((run_dir / "summary.json").read_text())
    gate = summary["gate"]
    probe = gate["robustness"]["memorisation"]
    assert gate["decision"] == "refuse" and gate["checks"]["robustness"] is False
    assert gate["checks"]["margin"] and summary["candidate_loss"] < summary["baseline_loss"]
    assert probe["canaries"] == 6 and probe["change"] > gate["robustness"]["tolerance"]
    assert any(r.startswith("memorisation: planted canaries are") for r in gate["reasons"])
    # Each site's notes hold its half of the canaries, each 32 times.
    sites = run_dir / "sites"
    assert [(sites / s / "train.jsonl").read_text().count('"canary-') for s in ("site-00", "site-01")] == [96, 96]
    assert "gate: REFUSE" in output

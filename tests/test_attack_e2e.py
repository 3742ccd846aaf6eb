"""A federation with an attacker, through Flower's real simulation engine and the real CLI.

One of four sites (chosen by the seed) scales its update tenfold (``G + 10 (U - G)``). Its
reply is a valid adapter, so the reply checks accept it; the coordinate-wise median keeps
it from moving the candidate, which still beats the base model and is published. Shrunk
like the other simulations (one round, notes cut to 64 tokens); benchmarks/bench_attacks.py
runs the full table.
"""

from __future__ import annotations

import json
import shlex

import pytest
from test_readme import readme_commands
from test_simulation_e2e import simulate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The README's attacker simulation ("Aggregation: strategies and attackers").
(COMMAND,) = [c for c in readme_commands() if c.startswith("fedretrain simulate") and "attackers" in c]


def test_a_scaling_attacker_is_outvoted_by_the_median(tmp_path):
    # Execute: the README's command, one round on notes cut to 64 tokens.
    # (The robustness suite is tests/test_robustness_e2e.py's; here it would only cost time.)
    run_dir, output = simulate(
        *shlex.split(COMMAND)[2:],
        "rounds=1",
        "model.max_length=64",
        "gate.robustness.enabled=false",
        "simulation.client_cpus=2",  # one Ray actor: one import of torch and its kin, not two
        f"output_dir={tmp_path}",
    )

    # Assert: the attacker is named afterwards, its reply counted like any valid one, and the
    # median's candidate published.
    attack = json.loads((run_dir / "attack.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert attack["behaviour"] == "scale" and len(attack["attackers"]) == 1
    (attacker,) = attack["attackers"]
    assert attacker in summary["sites"] and len(summary["sites"]) == 4
    assert summary["gate"]["decision"] == "publish" and summary["candidate_loss"] < summary["baseline_loss"]
    assert "attackers (scale): " + attacker in output

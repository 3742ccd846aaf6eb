"""Secure aggregation through Flower's real simulation engine and the real CLI.

The README's command: three smoke sites train with DP as always, then answer the four
stages of Flower's SecAgg+ protocol (client/secagg.py); the coordinator sums their masked
updates, removes the masks and publishes the mean like any candidate. Shrunk like the other
simulations (one round, notes cut to 64 tokens). The dropout paths run in tests/test_secagg.py
and, on real SuperNodes, in the killed-site test of tests/test_deploy_e2e.py.
"""

from __future__ import annotations

import json
import shlex

import pytest
from test_readme import readme_commands
from test_simulation_e2e import simulate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

(COMMAND,) = [c for c in readme_commands() if c.startswith("fedretrain simulate") and "secure_aggregation" in c]

# One round of 4 local steps on notes cut to 64 tokens: what is under test is the protocol,
# not the gate, whose sites' check at this size sits within their noise (tolerance 1).
# The sites' pooled interval at this size too (one CI run: [-0.05, 0.49] around a gain of 0.22, so
# refused), so the gate rests on the validation set and each site's own check.
SHRINK = [
    "rounds=1",
    "model.max_length=64",
    "train.local_steps=4",
    "gate.site_tolerance=1",
    "gate.require_federated_confidence=false",
    # The robustness suite (on by default) is tests/test_robustness_e2e.py's; here it would only cost time.
    "gate.robustness.enabled=false",
    # One Ray actor runs the sites in turn: each actor imports torch, transformers, peft and opacus
    # (about 7 s of CPU), and on CI's 2 cores the CPU, not the wall clock, is what the suite waits on.
    "simulation.client_cpus=2",
]


def test_sites_masked_updates_are_summed_and_the_mean_is_published(tmp_path):
    run_dir, output = simulate(*shlex.split(COMMAND)[2:], *SHRINK, f"output_dir={tmp_path}")

    summary = json.loads((run_dir / "summary.json").read_text())
    (round1,) = [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if r["round"] == 1]
    secure = round1["secure_aggregation"]
    assert (secure["sampled"], secure["summed"], secure["dropped"]) == (3, 3, []), secure
    assert set(secure["seconds"]) >= {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    assert secure["modulus"] == 2**24  # the smallest power of two above 3 x 2**22
    # Each site's epsilon is still its own and in the summary; the coordinator saw only the sum.
    assert sorted(round1["sites"]) == ["site-00", "site-01", "site-02"]
    assert all(site["epsilon"] > 0 for site in round1["sites"].values())
    assert "secure aggregation summed 3 of 3 sites' masked updates" in output
    assert summary["gate"]["decision"] == "publish" and summary["candidate_loss"] < summary["baseline_loss"]

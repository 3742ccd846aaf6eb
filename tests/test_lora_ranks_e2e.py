"""Mixed LoRA ranks through Flower's real simulation engine and the real CLI.

The README's command: three smoke sites train ranks 8, 4 and 2 of the rank-8 adapter
(each its own ``lora-rank``); each sends the components beyond its rank back unchanged,
the coordinator checks that and averages each component over the sites that trained it.
Shrunk like the other simulations (one round, notes cut to 64 tokens).
"""

from __future__ import annotations

import json
import shlex

import pytest
from test_readme import readme_commands
from test_simulation_e2e import simulate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

(COMMAND,) = [c for c in readme_commands() if c.startswith("fedretrain simulate") and "site_lora_ranks" in c]

# One round of 4 local steps on notes cut to 64 tokens: what is under test is the protocol,
# not the gate, whose sites' check at this size sits within their noise (tolerance 1).
SHRINK = ["rounds=1", "model.max_length=64", "train.local_steps=4", "gate.site_tolerance=1"]


def test_sites_of_three_ranks_train_one_adapter_that_is_published(tmp_path):
    run_dir, _ = simulate(*shlex.split(COMMAND)[2:], *SHRINK, f"output_dir={tmp_path}")

    summary = json.loads((run_dir / "summary.json").read_text())
    (round1,) = [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if r["round"] == 1]
    # Every reply was accepted: no site changed a component beyond its rank.
    assert {site: s["lora_rank"] for site, s in round1["sites"].items()} == {"site-00": 8, "site-01": 4, "site-02": 2}
    assert round1["rejected"] == []
    # The same epsilon at every site whatever its rank: sigma and steps are the job's.
    assert len({round(s["epsilon"], 9) for s in round1["sites"].values()}) == 1
    assert summary["gate"]["decision"] == "publish" and summary["candidate_loss"] < summary["baseline_loss"]

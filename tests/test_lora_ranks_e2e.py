"""Mixed LoRA ranks through Flower's real simulation engine and the real CLI.

The README's command: three smoke sites train ranks 8, 4 and 2 of the rank-8 adapter
(each its own ``lora-rank``); each sends the components beyond its rank back unchanged,
the coordinator checks that and averages each component over the sites that trained it.
Shrunk like the other simulations (one round, notes cut to 64 tokens). The cycle's live
export is on (``tracking.*``): MLflow and TensorBoard then hold what its files say.
"""

from __future__ import annotations

import json
import shlex

import pytest
from test_readme import readme_commands
from test_secagg_e2e import SHRINK  # the same shrunk round: one of 4 steps, 64-token notes
from test_simulation_e2e import simulate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

(COMMAND,) = [c for c in readme_commands() if c.startswith("fedretrain simulate") and "site_lora_ranks" in c]

# SHRINK: one round of 4 local steps on notes cut to 64 tokens: what is under test is the
# protocol, not the gate, whose sites' checks at this size sit within their noise.


def test_sites_of_three_ranks_train_one_adapter_that_is_published(tmp_path):
    # With the cycle's live export on (tracking.*): the ServerApp in Flower's simulation engine
    # copies each round, the gate and the version to MLflow and TensorBoard as it goes.
    tracking = [
        f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.tensorboard_dir={tmp_path / 'tb'}",
    ]
    run_dir, _ = simulate(
        *shlex.split(COMMAND)[2:], *SHRINK, f"output_dir={tmp_path}", *tracking, "tracking.timeout_s=120"
    )

    summary = json.loads((run_dir / "summary.json").read_text())
    (round1,) = [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if r["round"] == 1]
    # Every reply was accepted: no site changed a component beyond its rank.
    assert {site: s["lora_rank"] for site, s in round1["sites"].items()} == {"site-00": 8, "site-01": 4, "site-02": 2}
    assert round1["rejected"] == []
    # The same epsilon at every site whatever its rank: sigma and steps are the job's.
    assert len({round(s["epsilon"], 9) for s in round1["sites"].values()}) == 1
    assert summary["gate"]["decision"] == "publish" and summary["candidate_loss"] < summary["baseline_loss"]
    _check_the_export(tmp_path, run_dir, summary)


def _check_the_export(tmp_path, run_dir, summary) -> None:
    """MLflow and TensorBoard hold what the run directory and the registry say."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from server.tracking.to_mlflow import mlflow_client

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("fedretrain").experiment_id], f"tags.`fedretrain.run` = '{run_dir.name}'"
    )
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "validation/candidate_loss"))
    assert history == [(r["round"], r["validation"]["candidate_loss"]) for r in rows]
    assert (run.info.status, run.data.tags["gate.decision"], run.data.tags["fedretrain.published_version"]) == (
        "FINISHED",
        "publish",
        str(summary["published_version"]),
    )
    (model,) = client.search_registered_models()
    assert client.get_model_version_by_alias(model.name, "champion").tags["fedretrain.version"] == "1"
    events = EventAccumulator(str(tmp_path / "tb" / run_dir.name))
    events.Reload()
    assert [e.step for e in events.Scalars("validation/candidate_loss")] == [r["round"] for r in rows]

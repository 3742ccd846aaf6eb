"""A cycle that too few sites can join stops before any site trains: one site's bad file or
empty budget costs the others nothing, and the command's exit status says which it was.

A real cycle (server/cycle/run.py) of two virtual sites on the embedded model, answered in
this process by the sites' real ClientApp (tests/test_model_families.py's InlineGrid).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_model_families import SHRINK, InlineGrid

from cli.exits import ABORTED, BUDGET_REFUSED, cycle_exit_code
from client.app import make_client_app
from fedretrain.config import compose_config, flatten, to_yaml, unflatten
from server.app import bind_sites
from server.cycle.run import run_retraining
from server.sites.roster import Roster
from simulation.federation import FederationSites, build_federation


def cycle(root: Path, spoil, overrides: tuple[str, ...] = ()) -> tuple[dict, Path]:
    """One cycle of two sites with a quorum of 2 (and ``overrides``), after ``spoil(federation root)``;
    (summary, federation root)."""
    cfg = compose_config([f"output_dir={root}", *SHRINK, "strategy.quorum=2", *overrides])
    fed = build_federation(cfg, root / "sites")
    spoil(fed.root)
    registry = dataclasses.replace(cfg.registry, root=str(fed.registry_root), signing_key=str(fed.signing_key))
    cfg = dataclasses.replace(cfg, registry=registry)
    run_dir = root / "run"
    run_dir.mkdir()
    app = make_client_app(FederationSites(fed.root, run_dir / "roster"))
    grid = bind_sites(InlineGrid(app, 2), Roster.from_directory(run_dir / "roster"))
    yaml = to_yaml(unflatten(flatten(cfg)))
    return run_retraining(grid, cfg, run_dir, config_yaml=yaml, validation_path=str(fed.validation_path)), fed.root


def ledger_entries(root: Path, site: str) -> list:
    path = root / site / ".fedretrain" / "privacy_ledger.json"
    return json.loads(path.read_text())["entries"] if path.exists() else []


def low_ceiling(root: Path) -> None:
    settings = json.loads((root / "site-01" / "site.json").read_text())
    (root / "site-01" / "site.json").write_text(json.dumps({**settings, "epsilon-ceiling": 0.5}))


def bad_file(root: Path) -> None:
    (root / "site-01" / "train.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')


@pytest.mark.usefixtures("instruction_identity", "keep_global_random_state")
@pytest.mark.parametrize(
    ("spoil", "status", "reason"),
    [(low_ceiling, BUDGET_REFUSED, "above the lifetime ceiling"), (bad_file, ABORTED, "train.jsonl:1")],
    ids=["budget", "bad-file"],
)
def test_a_site_that_cannot_train_stops_the_cycle_before_the_other_spends(tmp_path, spoil, status, reason):
    # Execute
    summary, root = cycle(tmp_path, spoil)

    # Assert: aborted before round 1, site-01's refusal on record, site-00 charged nothing.
    assert "before round 1: 1 site(s) ready to train" in summary["aborted"] and summary["published_version"] is None
    (refusal,) = summary["refusals"]
    assert refusal["site_id"] == "site-01" and reason in refusal["reason"]
    assert ledger_entries(root, "site-00") == [] and ledger_entries(root, "site-01") == []
    assert cycle_exit_code(summary) == status

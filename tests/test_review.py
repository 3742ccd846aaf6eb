"""The site's human review queue (client/review.py, ``fedretrain site review``): decisions on record
ids, corrections through ingestion, and ``train.require_review`` training only on accepted records."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_install import job, make_site  # noqa: F401  (module fixtures)

from cli.main import main
from client.review import ReviewQueue, UnknownRecord, accepted_only, correct, decide, pending
from client.round.site import site_model, train_round
from fedretrain.data.notes import read_records
from fedretrain.errors import ConfigError, DataValidationError
from fedretrain.modeling.lora_model import adapter_arrays


@pytest.fixture
def site(tmp_path):
    return make_site(tmp_path, None)


def test_decisions_name_known_records_and_the_last_one_counts(site):
    decide(site, ["site-a-0", "site-a-1"], "accept", by="dr who")
    decide(site, ["site-a-1"], "reject", by="dr who")
    assert ReviewQueue.at(site.state_path).decisions() == {"site-a-0": "accept", "site-a-1": "reject"}
    assert [r.id for r in accepted_only(site, read_records(site.train_path))] == ["site-a-0"]
    assert "site-a-0" not in {r.id for r in pending(site)} and "site-a-2" in {r.id for r in pending(site)}
    with pytest.raises(UnknownRecord, match="no training record 'nope'"):
        decide(site, ["site-a-2", "nope"], "accept", by="dr who")
    assert "site-a-2" not in ReviewQueue.at(site.state_path).decisions()  # nothing recorded


def test_a_correction_is_ingested_accepted_and_replaces_the_original(site):
    entry = correct(site, "site-a-3", "Chief complaint - Cough for three days. Plan - rest.", by="dr who")
    assert entry == {**entry, "id": "site-a-3.corrected", "decision": "accept"}
    decisions = ReviewQueue.at(site.state_path).decisions()
    assert decisions["site-a-3"] == "reject" and decisions["site-a-3.corrected"] == "accept"
    stored = read_records(site.train_path) + read_records(site.heldout_path)
    assert any(r.id == "site-a-3.corrected" for r in stored)
    with pytest.raises(DataValidationError, match="text"):
        correct(site, "site-a-4", "", by="dr who")
    assert "site-a-4" not in ReviewQueue.at(site.state_path).decisions()


def test_require_review_trains_only_on_accepted_records_and_refuses_before_spending_without_any(site, job):  # noqa: F811
    reviewed = dataclasses.replace(job, train=dataclasses.replace(job.train, require_review=True, local_steps=1))
    adapter = adapter_arrays(site_model(job, "cpu").model)
    with pytest.raises(ConfigError, match="require_review: none of site site-a's 48 training records"):
        train_round(site, reviewed, adapter, 1)
    assert not site.ledger_path.exists()  # nothing spent
    decide(site, [f"site-a-{i}" for i in range(10)], "accept", by="dr who")
    assert train_round(site, reviewed, adapter, 1).metrics["steps"] == 1


def test_the_cli_lists_the_least_certain_first_and_records_decisions(site, tmp_path, capsys):
    config = tmp_path / "site.json"
    config.write_text(json.dumps(site.to_node_config()))
    assert main(["site", "review", "list", "--site-config", str(config), "--limit", "3", "experiment=smoke"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[: out.rindex("]") + 1])
    assert len(rows) == 3 and rows[0]["loss"] >= rows[1]["loss"] >= rows[2]["loss"]
    assert "48 record(s) wait for review at site site-a" in out
    assert main(["site", "review", "accept", rows[0]["id"], "--site-config", str(config), "--by", "nurse"]) == 0
    assert ReviewQueue.at(site.state_path).decisions() == {rows[0]["id"]: "accept"}
    assert main(["site", "review", "reject", "nope", "--site-config", str(config)]) == 2

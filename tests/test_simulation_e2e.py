"""End to end through Flower's real simulation engine (Ray backend) and the real CLI.

One federation directory is reused across two runs, as a researcher would with
``simulation.federation_dir``: the first run is the 2-round, 3-site smoke run; before
the second, one site's data file is broken. The second run shows the bad site refusing
with its file, line and field named while the others still aggregate, and the privacy
ledgers carrying their history across runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedretrain.privacy.ledger import PrivacyLedger

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def simulate(*overrides: str, timeout: int = 420) -> tuple[Path, str]:
    proc = subprocess.run([sys.executable, "-m", "fedretrain.cli", "simulate", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    run_dir = Path(output.split("fedretrain: run written to ")[-1].split()[0])
    return run_dir, output


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    return tmp_path_factory.mktemp("fed")


@pytest.fixture(scope="module")
def first_run(federation, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return simulate("experiment=smoke", f"output_dir={out}", f"simulation.federation_dir={federation}")


def test_smoke_run_beats_the_baseline_within_every_ceiling(first_run):
    run_dir, output = first_run
    summary = json.loads((run_dir / "summary.json").read_text())
    # The candidate fine-tuned with DP at three sites beats the base model on the validation set.
    assert summary["rounds"] == 2
    assert summary["candidate_loss"] < summary["baseline_loss"]
    assert set(summary["sites"]) == {"site-00", "site-01", "site-02"}
    for site in summary["sites"].values():
        assert 0 < site["epsilon"] <= site["epsilon_ceiling"]
        assert site["delta"] == 1e-5 and site["num_examples"] > 0
    # Only the adapter travels: far fewer bytes than the model.
    assert summary["communication"]["adapter_to_model_ratio"] < 0.05
    assert "validation loss" in output  # the summary table was printed


def test_run_directory_holds_every_promised_file(first_run):
    run_dir, _ = first_run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2]
    assert all(x["sites_accepted"] == 3 for x in lines[1:])
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rounds: 2" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "candidate_adapter" / "adapter_model.safetensors").exists()
    for site in ("site-00", "site-01", "site-02"):
        assert json.loads((run_dir / "ledgers" / f"{site}.json").read_text())["site_id"] == site


def test_bad_data_is_refused_and_ledgers_persist_across_runs(first_run, federation, tmp_path):
    run_dir, _ = first_run
    before = json.loads((run_dir / "summary.json").read_text())["sites"]
    bad = federation / "site-01" / "train.jsonl"
    lines = bad.read_text().splitlines()
    lines[4] = json.dumps({"txt": "a typo in the field name"})
    bad.write_text("\n".join(lines) + "\n")

    second_dir, output = simulate("experiment=smoke", f"output_dir={tmp_path}",
                                  f"simulation.federation_dir={federation}")
    summary = json.loads((second_dir / "summary.json").read_text())

    # site-01 sent no update; its refusal names file, line and field.
    assert set(summary["sites"]) == {"site-00", "site-02"}
    reasons = [r["reason"] for r in summary["refusals"]]
    assert len(reasons) == 2 and all(f"{bad}:5: field 'text' is missing" in r for r in reasons)
    assert summary["candidate_loss"] < summary["baseline_loss"]
    # The other sites' ledgers kept the first run's spend: epsilon only grows.
    for site in ("site-00", "site-02"):
        ledger = PrivacyLedger.load(federation / site / ".fedretrain" / "privacy_ledger.json",
                                    site_id=site, accountant="rdp", delta=1e-5)
        assert len(ledger.entries) == 4  # 2 rounds x 2 runs
        assert summary["sites"][site]["epsilon"] > before[site]["epsilon"]
        assert summary["sites"][site]["epsilon"] == pytest.approx(ledger.epsilon())
    assert "left out" in output

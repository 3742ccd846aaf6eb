"""End to end through Flower's real simulation engine (Ray backend) and the real CLI.

One federation directory is reused across two cycles, as a researcher would with
``simulation.federation_dir``: the first is ``make demo`` itself (the README's first
command), shrunk in size like every simulation here (its full-size figures are ``make
bench``'s, benchmarks/bench_demo.py), which passes the gate and publishes version 1 to every
site. Before the second, one site's data file is broken; the second does not beat version 1
and publishes nothing, and shows the bad site refused with its file, line and field named
while the others still aggregate, and the privacy ledgers carrying their history across
runs. A separate federation trains on garbled notes and the gate refuses the worse candidate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.exits import GATE_REFUSED, OK
from fedretrain.privacy.ledger import PrivacyLedger

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def simulate(*overrides: str, timeout: int = 420, status: int = OK) -> tuple[Path, str]:
    """``fedretrain simulate`` as a user runs it, expected to exit with ``status``."""
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "simulate", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == status, output[-4000:]
    run_dir = Path(output.split("fedretrain: run written to ")[-1].split()[0])
    return run_dir, output


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    return tmp_path_factory.mktemp("fed")


# The demo's federation and cycle at the sizes of experiment=smoke: 2 rounds of 12 steps at
# a rate of 0.125 over 128 training records a site, 120 validation records. Large enough for
# the sites' pooled interval to confirm the gain (the gate's federated check), a third of
# the full demo's compute.
DEMO_SHRINK = [
    "rounds=2",
    "data.records_per_site=160",
    "data.validation_records=120",
    "train.local_steps=12",
    "privacy.sample_rate=0.125",
]


@pytest.fixture(scope="module")
def first_run(federation, tmp_path_factory):
    # ``make demo`` as a user types it, shrunk, plus where to write. A ceiling of 16 leaves
    # room for the second cycle; sigma comes from the run's target epsilon, not the ceiling.
    out = tmp_path_factory.mktemp("runs")
    args = " ".join(
        [f"output_dir={out}", f"simulation.federation_dir={federation}", "simulation.site_epsilon_ceiling=16"]
        + DEMO_SHRINK
    )
    proc = subprocess.run(["make", "demo", f"ARGS={args}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    run_dir = Path(output.split("fedretrain: run written to ")[-1].split()[0])
    return run_dir, output


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def site_state(federation: Path, site: str) -> dict:
    return json.loads((federation / site / ".fedretrain" / "models" / "state.json").read_text())


def test_make_demo_beats_the_baseline_within_every_ceiling(first_run):
    run_dir, output = first_run
    summary = json.loads((run_dir / "summary.json").read_text())
    # The candidate fine-tuned with DP at three sites beats the base model on the validation set.
    assert run_dir.name.endswith("-demo") and summary["rounds"] == 2
    assert summary["candidate_loss"] < summary["baseline_loss"]
    assert set(summary["sites"]) == {"site-00", "site-01", "site-02"}
    for site in summary["sites"].values():
        assert 0 < site["epsilon"] <= site["epsilon_ceiling"]
        assert site["delta"] == 1e-5 and site["noise_multiplier"] > 0
        assert "num_examples" not in site  # a site's record count never reaches the coordinator
    # Only the adapter travels: far fewer bytes than the model.
    assert summary["communication"]["adapter_to_model_ratio"] < 0.05
    assert "round 2/2" in output and "validation perplexity" in output  # progress, then the summary table


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


def test_first_cycle_publishes_version_1_and_every_site_installs_it(first_run, federation):
    run_dir, output = first_run
    summary = json.loads((run_dir / "summary.json").read_text())
    registry = federation / "coordinator" / "registry"

    gate = summary["gate"]
    assert gate["decision"] == "publish" and summary["published_version"] == 1
    assert summary["baseline_version"] is None and summary["registry"] == str(registry.resolve())
    assert gate["improvement"] == pytest.approx(summary["baseline_loss"] - summary["candidate_loss"])
    assert 0 < gate["ci_low"] <= gate["improvement"] <= gate["ci_high"]
    assert gate["federated"]["ci_low"] > 0 and gate["worst_site_change"] < 0
    assert sorted(summary["publication"]["installed"]) == ["site-00", "site-01", "site-02"]
    assert all(site_state(federation, s)["current"] == 1 for s in ("site-00", "site-01", "site-02"))
    assert "gate: PUBLISH -> version 1" in output
    # The operator's view of the same registry, and a site using what it installed.
    listing, verify = (
        cli("registry", "list", "--root", str(registry)),
        cli("registry", "verify", "--root", str(registry)),
    )
    assert listing.returncode == 0 and "champion" in listing.stdout
    assert verify.returncode == 0, verify.stdout + verify.stderr
    generated = cli(
        "site",
        "generate",
        "--site-config",
        str(federation / "site-00" / "site.json"),
        "--prompt",
        "Patient presents with",
        "--max-new-tokens",
        "12",
    )
    assert generated.returncode == 0, generated.stderr
    assert "[version 1," in generated.stdout and "Patient presents with" in generated.stdout


@pytest.fixture(scope="module")
def second_run(first_run, federation, tmp_path_factory):
    """The second cycle: site-01's training file broken (line 5 misnames its field), and a
    learning rate of 1e-6, which leaves the adapter where version 1 put it; one round, on
    notes cut to 64 tokens."""
    run_dir, _ = first_run
    before = json.loads((run_dir / "summary.json").read_text())["sites"]
    bad = federation / "site-01" / "train.jsonl"
    lines = bad.read_text().splitlines()
    lines[4] = json.dumps({"txt": "a typo in the field name"})
    bad.write_text("\n".join(lines) + "\n")
    second_dir, output = simulate(
        "experiment=demo",  # the federation make demo generated
        f"output_dir={tmp_path_factory.mktemp('runs')}",
        f"simulation.federation_dir={federation}",
        *DEMO_SHRINK,
        "rounds=1",
        "train.lr=1e-6",
        "model.max_length=64",  # a quarter of the compute; what it shows does not need long notes
        status=GATE_REFUSED,  # the gate refuses: nothing published, and the exit status says so
    )
    return second_dir, output, before, bad


def test_a_cycle_that_does_not_beat_version_1_publishes_nothing(second_run, federation):
    run_dir, output, _, _ = second_run
    summary = json.loads((run_dir / "summary.json").read_text())

    assert summary["baseline_version"] == 1 and summary["published_version"] is None
    assert summary["gate"]["decision"] == "refuse"
    assert abs(summary["gate"]["improvement"]) < summary["gate"]["margin"]
    assert any("less than the margin" in reason for reason in summary["gate"]["reasons"])
    assert {"site-00", "site-02"} <= set(summary["sync"]["installed"])
    registry = federation / "coordinator" / "registry"
    assert sorted(p.name for p in (registry / "versions").iterdir()) == ["000001"]
    assert [d["decision"] for d in map(json.loads, (registry / "decisions.jsonl").read_text().splitlines())] == [
        "publish",
        "refuse",
    ]
    assert all(site_state(federation, s)["current"] == 1 for s in ("site-00", "site-01", "site-02"))
    assert "gate: REFUSE, nothing published (baseline: version 1)" in output


def test_bad_data_is_refused_and_ledgers_persist_across_runs(second_run, federation):
    run_dir, output, before, bad = second_run
    summary = json.loads((run_dir / "summary.json").read_text())

    # site-01 sent no update; its refusal, recorded under the site its node is bound to,
    # names file, line and field, but not where the site keeps its files.
    assert set(summary["sites"]) == {"site-00", "site-02"}
    assert {r["site_id"] for r in summary["refusals"]} == {"site-01"}
    reasons = [r["reason"] for r in summary["refusals"]]
    assert len(reasons) == 1 and all(f" {bad.name}:5: field 'text' is missing" in r for r in reasons)
    assert not any(str(bad.parent) in r for r in reasons)
    # The other sites' ledgers kept the first run's spend: epsilon only grows.
    for site in ("site-00", "site-02"):
        ledger = PrivacyLedger.load(
            federation / site / ".fedretrain" / "privacy_ledger.json", site_id=site, accountant="rdp", delta=1e-5
        )
        # Training: 2 rounds, then 1; each cycle ended with one charged evaluation.
        assert [e.kind for e in ledger.entries].count("train") == 3
        assert [e.kind for e in ledger.entries].count("evaluate") == 2
        assert summary["sites"][site]["epsilon"] > before[site]["epsilon"]
        assert summary["sites"][site]["epsilon"] == pytest.approx(ledger.epsilon())
    assert "left out" in output


def test_the_gate_refuses_a_candidate_trained_on_garbled_notes(tmp_path):
    # The smoke sizes, and the smoke's sampling rate (about 16 of 128 records per step), one round.
    run_dir, output = simulate(
        "experiment=garbled",
        f"output_dir={tmp_path}",
        "rounds=1",
        "data.records_per_site=160",
        "data.validation_records=120",
        "train.local_steps=12",
        "privacy.sample_rate=0.125",
        status=GATE_REFUSED,
    )
    summary = json.loads((run_dir / "summary.json").read_text())

    # The sites' DP noise is their own (no run is replayable): garbled training may leave the
    # model about where it was or make it worse, never better by the margin.
    assert summary["gate"]["decision"] == "refuse" and summary["published_version"] is None
    assert summary["gate"]["improvement"] < summary["gate"]["margin"]
    assert not summary["gate"]["checks"]["margin"]
    assert not (Path(summary["registry"]) / "versions").exists() or not any(
        (Path(summary["registry"]) / "versions").iterdir()
    )

"""End to end through Flower's real simulation engine (Ray backend) and the real CLI.

The README's coordinator session (its "Publishing" walkthrough) runs in one fresh
directory, and its first cycle is ``make demo`` itself (the README's first command: the
walkthrough's first ``simulate`` is ``make demo``'s command with a federation folder and a
signing key), shrunk in size like every simulation here (its full-size figures are ``make
bench``'s, benchmarks/bench_demo.py). It passes the gate and publishes version 1 to every
site; the second cycle waits for the operator's approval, who approves it and rolls back to
version 1. Before a third cycle one site's data file is broken; the third does not beat
version 1 and publishes nothing, and shows the bad site refused with its file, line and
field named while the others still aggregate, and the privacy ledgers carrying their
history across runs. (tests/test_garbled_e2e.py: a federation trained on garbled notes.)
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from processes import first_line, start_cli
from test_readme import walkthrough

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
def session(tmp_path_factory):
    """The fresh directory the README's coordinator session runs in."""
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="module")
def federation(session):
    return session / "fed"


# The README's "Publishing" walkthrough: keys, make demo's cycle, the operator's look at the
# registry, a cycle that waits for approval, approve, show, rollback.
PUBLISHING = walkthrough()
MAKE_DEMO = "fedretrain simulate experiment=demo"  # what `make demo` runs (Makefile), before its ARGS
PATHS = ("simulation.federation_dir", "registry.signing_key")  # relative to the session's directory

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
    # One Ray actor runs the sites in turn: each actor imports torch, transformers, peft and opacus
    # (about 7 s of CPU), and on CI's 2 cores the CPU, not the wall clock, is what the suite waits on.
    "simulation.client_cpus=2",
]
# The approval cycle shows the registry's workflow (pending, approve, rollback), so its gate
# rests on the validation set and each site's own check: the sites' pooled interval needs
# hundreds of held-out records a site to confirm a second cycle's 0.1-0.2 nat. Notes cut to
# 64 tokens: a quarter of the compute, and the registry does not care how long they were.
APPROVAL_SHRINK = [
    *DEMO_SHRINK,
    "model.max_length=64",
    "gate.require_federated_confidence=false",
    # A site's 32 held-out records give its noised change a std of about 0.2 nats: against
    # the default 0.02 tolerance a second cycle's gain (0.1-0.2) is refused by chance now
    # and then. The margin check on the validation set stays.
    "gate.site_tolerance=1",
    # The robustness suite (on by default) is tests/test_robustness_e2e.py's; here it would only cost time.
    "gate.robustness.enabled=false",
]


def fedretrain(cwd: Path, command: str, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """A README command as written (``fedretrain ...``), run in ``cwd``, expected to succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *shlex.split(command)[1:], *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{command}\n" + (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.fixture(scope="module")
def first_run(session, tmp_path_factory):
    # The walkthrough's keys, then its first cycle: ``make demo`` as a user types it with the
    # walkthrough's overrides (their paths in the session's directory), shrunk, plus where to
    # write. A ceiling of 16 leaves room for the later cycles; sigma comes from each run's
    # target epsilon, not the ceiling.
    keys, demo = PUBLISHING[:2]
    fedretrain(session, keys)
    assert demo.startswith(MAKE_DEMO + " "), demo
    overrides = [
        f"{key}={session / value}" if key in PATHS else f"{key}={value}"
        for key, value in (o.split("=", 1) for o in demo[len(MAKE_DEMO) :].split())
    ]
    args = " ".join([*overrides, f"output_dir={session / 'runs'}", "simulation.site_epsilon_ceiling=16", *DEMO_SHRINK])
    proc = subprocess.run(["make", "demo", f"ARGS={args}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    run_dir = Path(output.split("fedretrain: run written to ")[-1].split()[0])
    return run_dir, output


def written_to(proc: subprocess.CompletedProcess[str], cwd: Path) -> Path:
    """The run directory a ``simulate`` run in ``cwd`` printed."""
    return cwd / (proc.stdout + proc.stderr).split("fedretrain: run written to ")[-1].split()[0]


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


def test_make_demo_prints_where_to_see_it_in_a_browser(first_run):
    run_dir, output = first_run
    (line,) = [x for x in output.splitlines() if "to see it in a browser" in x]
    command, address = line.split("run: ", 1)[1].split(" and open ")
    assert address == f"http://127.0.0.1:8765/cycles/{run_dir.name}", line
    # The printed command serves that page (on a free port: 8765 may be taken where tests run).
    proc = start_cli([*shlex.split(command)[1:], "--port", "0"])
    try:
        served = first_line(proc, timeout_s=120)
        assert served.startswith("fedretrain dashboard: http://127.0.0.1:"), served
        with urllib.request.urlopen(served.split()[2] + address.split("/", 3)[3], timeout=30) as reply:
            page = reply.read().decode()
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    assert run_dir.name in page and '<span id="state">finished</span>' in page


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
    assert gate["federated"]["ci_low"] > 0 and gate["checks"]["sites"]
    assert sorted(summary["publication"]["installed"]) == ["site-00", "site-01", "site-02"]
    assert all(site_state(federation, s)["current"] == 1 for s in ("site-00", "site-01", "site-02"))
    assert "gate: PUBLISH -> version 1" in output


def test_the_operator_lists_verifies_and_uses_version_1(first_run, session):
    # The walkthrough's next three commands, as written: the registry as the operator sees
    # it, verified against the coordinator's own public key, and a site using what it installed.
    listing, verify, generated = (fedretrain(session, command) for command in PUBLISHING[2:5])
    assert "champion" in listing.stdout and "1" in listing.stdout
    assert "NOT AUTHENTICATED" not in verify.stdout
    assert "[version 1," in generated.stdout and "Patient presents with" in generated.stdout
    assert (session / "keys" / "coordinator.key").stat().st_mode & 0o777 == 0o600


@pytest.fixture(scope="module")
def approval_run(first_run, session):
    """The walkthrough's second cycle (it waits for an operator), then approve, show and rollback, as written."""
    command, *operator = PUBLISHING[5:]
    assert "gate.require_approval=true" in command and len(operator) == 3
    cycle = fedretrain(session, command, *APPROVAL_SHRINK, timeout=900)
    return cycle, [fedretrain(session, c) for c in operator]


def test_a_cycle_waiting_for_approval_is_approved_then_rolled_back(approval_run, session, federation):
    cycle, (approved, shown, rolled_back) = approval_run
    registry = federation / "coordinator" / "registry"
    summary = json.loads((written_to(cycle, session) / "summary.json").read_text())
    assert summary["gate"]["decision"] == "pending_approval"
    assert summary["pending_version"] == 2 and summary["baseline_version"] == 1
    champion = json.loads((registry / "champion.json").read_text())
    assert champion["version"] == 1 and champion["reason"] == "rollback"
    assert "2" in shown.stdout


@pytest.fixture(scope="module")
def second_run(approval_run, session, federation, tmp_path_factory):
    """The third cycle, against version 1 (rolled back to): site-01's training file broken
    (line 5 misnames its field), and a learning rate of 1e-6, which leaves the adapter where
    version 1 put it; one round, on notes cut to 64 tokens."""
    run_dir = written_to(approval_run[0], session)
    before = json.loads((run_dir / "summary.json").read_text())["sites"]
    bad = federation / "site-01" / "train.jsonl"
    lines = bad.read_text().splitlines()
    lines[4] = json.dumps({"txt": "a typo in the field name"})
    bad.write_text("\n".join(lines) + "\n")
    second_dir, output = simulate(
        "experiment=demo",  # the federation make demo generated
        f"output_dir={tmp_path_factory.mktemp('runs')}",
        f"simulation.federation_dir={federation}",
        f"registry.signing_key={session / 'keys' / 'coordinator.key'}",
        *DEMO_SHRINK,
        "rounds=1",
        "train.lr=1e-6",
        "model.max_length=64",  # a quarter of the compute; what it shows does not need long notes
        "gate.robustness.enabled=false",  # tests/test_robustness_e2e.py's; here only time
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
    assert sorted(p.name for p in (registry / "versions").iterdir()) == ["000001", "000002"]
    assert [d["decision"] for d in map(json.loads, (registry / "decisions.jsonl").read_text().splitlines())] == [
        "publish",
        "pending_approval",
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
    # The other sites' ledgers kept the earlier runs' spend: epsilon only grows.
    for site in ("site-00", "site-02"):
        ledger = PrivacyLedger.load(
            federation / site / ".fedretrain" / "privacy_ledger.json", site_id=site, accountant="rdp", delta=1e-5
        )
        # Training: 2 rounds, 2, then 1; each cycle ended with one charged evaluation.
        assert [e.kind for e in ledger.entries].count("train") == 5
        assert [e.kind for e in ledger.entries].count("evaluate") == 3
        assert summary["sites"][site]["epsilon"] > before[site]["epsilon"]
        assert summary["sites"][site]["epsilon"] == pytest.approx(ledger.epsilon())
    assert "left out" in output

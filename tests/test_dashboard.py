"""The dashboard shows what the files say, reads nothing else, and serves on loopback only.

One federation of two virtual sites on the embedded model, written by the project's own code
(tests/test_ready.py's way: the real ServerApp cycle, the sites' real ClientApp answering in
this process): a simulated watch's first poll runs a cycle under secure aggregation and
publishes version 1; site-00 ingests notes in a new template and the second poll finds drift
(held by the rate limit); a deployment's coordinator folder holds a cycle that site-01 refuses
(a bad data file) and the gate refuses; the registry then gets versions 2 and 3 approved, a
rollback to 2, and version 4 left awaiting approval.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shlex
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from processes import first_line, start_cli
from starlette.testclient import TestClient
from test_model_families import SHRINK, InlineGrid
from test_readme import DASHBOARD_COMMANDS

from cli.main import main
from client.app import make_client_app
from client.ingest.pipeline import ingest_file
from fedretrain.atomic import atomic_write_json
from fedretrain.config import compose_config, flatten, site_config_from_node_config, to_yaml, unflatten
from fedretrain.deploy.pki import create_ca, issue_superlink_cert
from fedretrain.errors import ConfigError
from fedretrain.privacy.ledger import PrivacyLedger
from fedretrain.registry.signing import load_private_key
from fedretrain.registry.store import Registry
from fedretrain.web import listen_address
from server.app import bind_sites
from server.cycle.run import run_retraining
from server.dashboard.access import Access, read_token
from server.dashboard.app import create_app
from server.dashboard.catalogue import Catalogue
from server.deploy.coordinator import Coordinator
from server.sites.live import LiveFile
from server.sites.roster import Roster
from server.watch.loop import Watcher
from server.watch.service import DeployedWatcher
from simulation.federation import FederationSites, build_federation

REPO = Path(__file__).resolve().parents[1]
WATCH_RUN = "20261204-100000-default-watch"
COORD_RUN = "20261204-110000-default"


class StatefulGrid(InlineGrid):
    """InlineGrid keeping each node's Context.state across messages, as a SuperNode does for a run:
    the secure-aggregation mod keeps its keys there between the protocol's stages."""

    def __init__(self, app, num_sites: int) -> None:
        super().__init__(app, num_sites)
        self.states = {node: RecordDict() for node in self.sites}

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent += 1
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"
            partition = {"partition-id": self.sites[node]}
            context = Context(run_id=1, node_id=node, node_config=partition, state=self.states[node], run_config={})
            reply = self.app(msg, context)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def _config(root: Path, *overrides: str):
    cfg = compose_config(
        [*SHRINK, "gate.require_federated_confidence=false", "trigger.min_interval_s=86400", *overrides]
    )
    fed = build_federation(cfg, root / "fed")
    registry = dataclasses.replace(cfg.registry, root=str(fed.registry_root), signing_key=str(fed.signing_key))
    return dataclasses.replace(cfg, registry=registry), fed


def _grid(fed, run_dir: Path):
    app = make_client_app(FederationSites(fed.root, run_dir / "roster"))
    return bind_sites(StatefulGrid(app, 2), Roster.from_directory(run_dir / "roster"))


def _registry_moves(fed, adapter: Path) -> None:
    # Versions 2 and 3 approved, back to 2, and 4 left awaiting approval: every status there is.
    registry, key = Registry(fed.registry_root), load_private_key(fed.signing_key)
    first = registry.manifest(1)
    figures = {k: first[k] for k in ("base_model", "lora", "run", "sites", "gate")}
    for version in (2, 3):
        assert registry.publish(adapter, signing_key=key, expiry_days=30, require_approval=True, **figures) == version
        registry.approve(version, signing_key=key, approver="ops")
    registry.rollback(2, signing_key=key, reason="operator test")
    registry.publish(adapter, signing_key=key, expiry_days=30, require_approval=True, **figures)


def _simulated_watch(root: Path):
    """A watch's two polls: the first publishes version 1 (secure aggregation), the second finds
    drift at site-00 and is held by the rate limit; the federation is returned."""
    cfg, fed = _config(root, "strategy.secure_aggregation.enabled=true", "strategy.max_update_norm_ratio=null")
    watch_run = root / "runs" / WATCH_RUN
    watch_run.mkdir(parents=True)
    yaml = to_yaml(unflatten(flatten(cfg)))
    watcher = Watcher(_grid(fed, watch_run), cfg, watch_run / "cycles", yaml, str(fed.validation_path), 2)
    assert watcher.poll_once(1000.0).cycle["published_version"] == 1
    site = site_config_from_node_config(json.loads((fed.root / "site-00" / "site.json").read_text()), simulation=True)
    ingest_file(site, REPO / "examples" / "new-notes.jsonl")
    held = watcher.poll_once(2000.0)
    assert held.decision.held and "drift" in {a.trigger for a in held.decision.alerts}
    # As `fedretrain simulate` leaves a watch's directory: each site's ledger copied in.
    (watch_run / "ledgers").mkdir()
    for s in fed.sites:
        shutil.copyfile(s.ledger_path, watch_run / "ledgers" / f"{s.site_id}.json")
    # As the deployed status poll writes it (server/app.py) and the watch keeps it.
    atomic_write_json(fed.registry_root / "watch" / "last_poll.json", held.poll.to_dict())
    return fed


def _coordinator_folder(root: Path, fed) -> None:
    """coord/runs/ with a cycle site-01 refuses (a bad file) and the gate refuses, and the watch's watch.json."""
    cfg, _ = _config(root, "strategy.quorum=1")
    run_dir = root / "coord" / "runs" / COORD_RUN
    run_dir.mkdir(parents=True)
    (fed.root / "site-01" / "train.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    yaml = to_yaml(unflatten(flatten(cfg)))
    run_retraining(_grid(fed, run_dir), cfg, run_dir, config_yaml=yaml, validation_path=str(fed.validation_path))
    # sites.json as `fedretrain coordinator register` leaves it (server/deploy/coordinator.py), for the grid's nodes.
    keys = fed.root / "coordinator" / "keys"
    sites = {f"site-0{i}": {"node_id": str(100 + i), "public_key": str(keys / f"site-0{i}.pub")} for i in (0, 1)}
    atomic_write_json(root / "coord" / "sites.json", sites)
    # The standing watch's own writer of <dir>/watch.json.
    DeployedWatcher(None, cfg, run_dir.parent, "", coord=Coordinator(root / "coord"))._phase("sleeping")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The directory holding runs/, coord/ and fed/ (see the module docstring)."""
    import random

    import numpy as np
    import torch
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    root = tmp_path_factory.mktemp("dashboard")
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    with pytest.MonkeyPatch.context() as mp:  # what Flower's ServerApp runtime sets (conftest's instruction_identity)
        for name, value in (("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 1)):
            mp.setattr(TaskIdentity, name, value)
        fed = _simulated_watch(root)
        _coordinator_folder(root, fed)
    (adapter,) = (root / "runs" / WATCH_RUN).glob("cycles/*/candidate_adapter")
    _registry_moves(fed, adapter)
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])
    # Where the README's third dashboard command finds the key (`fedretrain keys coordinator` writes it there).
    (root / "keys").mkdir()
    shutil.copy2(fed.signing_key, root / "keys" / "coordinator.key")
    return root


@pytest.fixture(scope="module")
def client(world):
    catalogue = Catalogue.open(world / "runs", world / "coord")
    return TestClient(create_app(catalogue), base_url="http://127.0.0.1")


def _runs(world: Path) -> dict[str, Path]:
    (cycle,) = (world / "runs" / WATCH_RUN / "cycles").iterdir()
    return {f"{WATCH_RUN}~{cycle.name}": cycle, COORD_RUN: world / "coord" / "runs" / COORD_RUN}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_cycle_endpoint_is_metrics_and_summary_as_written(world, client):
    runs = _runs(world)
    assert {r["run_id"] for r in client.get("/api/cycles").json()} == set(runs)
    for run_id, run_dir in runs.items():
        view = client.get(f"/api/cycles/{run_id}").json()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert view["metrics"] == _metrics(run_dir) and view["summary"] == summary
        assert (view["round"], view["rounds"], view["state"]) == (1, 1, "finished")
    refused = client.get(f"/api/cycles/{COORD_RUN}").json()
    (refusal,) = refused["refusals"]
    assert refusal["site_id"] == "site-01" and "not valid UTF-8" in refusal["reason"]
    assert refused["summary"]["gate"]["decision"] == "refuse"


def test_the_cycle_page_shows_rounds_refusals_and_secure_aggregation(world, client):
    secure_id, secure_dir = next((k, v) for k, v in _runs(world).items() if k != COORD_RUN)
    (row,) = [r for r in _metrics(secure_dir) if r["round"] == 1]
    page = client.get(f"/cycles/{secure_id}").text
    assert '<span id="round">1</span> of <span id="rounds">1</span>' in page
    assert f"{row['validation']['candidate_loss']:.4f}" in page and f">{row['bytes_up']}<" in page
    secure = row["secure_aggregation"]
    assert "Secure aggregation" in page and f">{secure['modulus']}<" in page and secure["summed"] == 2
    # The gate's robustness suite, as summary.json has it.
    robustness = json.loads((secure_dir / "summary.json").read_text())["gate"]["robustness"]
    assert f"Robustness ({robustness['records']} records, tolerance 0.1000)" in page
    assert all(f">{f['change']:.4f}<" in page for f in robustness["perturbations"].values())
    refused = client.get(f"/cycles/{COORD_RUN}").text
    assert "not valid UTF-8" in refused and ">refuse</strong>" in refused


def test_the_federation_shows_each_sites_budget_ledger_and_drift(world, client):
    (federation,) = client.get("/api/federation").json()["federations"]
    sites = {s["site_id"]: s for s in federation["sites"]}
    assert set(sites) == {"site-00", "site-01"}
    # site-00 trained in both cycles: its newest is the coordinator folder's; site-01 only in the first.
    newest = json.loads((world / "coord" / "runs" / COORD_RUN / "summary.json").read_text())["sites"]
    assert sites["site-00"]["run"]["epsilon"] == newest["site-00"]["epsilon"] and "site-01" not in newest
    assert sites["site-01"]["run"]["run_id"].startswith(WATCH_RUN + "~")
    poll = json.loads((world / "fed" / "coordinator" / "registry" / "watch" / "last_poll.json").read_text())
    for site_id, site in sites.items():
        ledger_file = world / "runs" / WATCH_RUN / "ledgers" / f"{site_id}.json"
        ledger = PrivacyLedger.load(ledger_file, site_id=site_id, accountant="rdp", delta=1e-5)
        assert site["ledger"]["epsilon"] == ledger.epsilon() and site["ledger"]["releases"] == len(ledger.entries)
        assert site["status"]["drift_js"] == poll["sites"][site_id]["drift_js"]
    assert sites["site-00"]["status"]["drift_js"] > 0.03 and sites["site-01"]["status"]["drift_js"] is None
    assert federation["watch"]["alerts"][0]["held"].startswith("rate limit")
    page = client.get("/federation").text
    site = sites["site-00"]
    assert f"{site['epsilon_spent']:.2f} / {site['epsilon_ceiling']:.2f}" in page
    assert f"{site['status']['drift_js']:.4f}" in page
    # watch.json names this test's process, alive: the dashboard checks the pid as `coordinator status` does.
    assert "standing watch: running, sleeping" in page
    # The registered sites, each with how it answered the watch's last status poll.
    assert client.get("/api/federation").json()["coordinator"]["sites"] == {"site-00": "100", "site-01": "101"}
    assert page.count("online: answered at") == 2


def test_the_versions_page_is_the_registry_with_the_commands_to_run(world, client):
    root = (world / "fed" / "coordinator" / "registry").resolve()
    registry = Registry(root)
    (listed,) = client.get("/api/registries").json()
    view = client.get(f"/api/registries/{listed['registry_id']}").json()
    statuses = {row["version"]: row["status"] for row in view["versions"]}
    assert statuses == {1: "superseded", 2: "champion", 3: "rolled-back", 4: "pending"}
    assert all(row["manifest"] == registry.manifest(row["version"]) for row in view["versions"])
    assert view["pending"] == [4] and view["decisions"][0]["decision"] == "refuse"
    key = shlex.quote(str(world / "fed" / "coordinator" / "keys" / "coordinator.key"))
    commands = {row["version"]: row["commands"] for row in view["versions"]}
    assert commands[4]["approve"] == f"fedretrain registry approve 4 --root {root} --key {key}"
    assert "rollback" in commands[1] and not any("rollback" in commands[v] for v in (2, 3, 4))
    installed = {row["version"]: row["installed"] for row in view["versions"]}
    assert set(installed[1]) == {"site-00", "site-01"} and installed[2] == {}
    assert [e["event"] for e in view["timeline"][:2]] == ["created", "champion (rollback)"]
    page = client.get(f"/versions/{listed['registry_id']}").text
    assert f"fedretrain registry approve 4 --root {root}" in page
    trained = registry.manifest(1)["sites"]  # who trained it: the registry's pseudonyms and their ε
    assert trained and all(f"{name}: {f['epsilon']:.2f}" in page for name, f in trained.items())
    detail = client.get(f"/api/registries/{listed['registry_id']}/versions/4").json()
    assert detail["status"] == "pending" and detail["manifest"] == registry.manifest(4)


@pytest.mark.usefixtures("cli_logging")
def test_the_commands_the_page_gives_do_what_they_say(world, tmp_path):
    # On a copy of the registry, named with --registry and its key where the page expects it.
    shutil.copytree(world / "fed" / "coordinator" / "registry", tmp_path / "registry")
    (tmp_path / "keys").mkdir()
    shutil.copy(world / "fed" / "coordinator" / "keys" / "coordinator.key", tmp_path / "keys")
    client = TestClient(create_app(Catalogue.open(None, None, [tmp_path / "registry"])), base_url="http://127.0.0.1")
    (listed,) = client.get("/api/registries").json()

    def commands() -> dict:
        return {
            r["version"]: r["commands"]
            for r in client.get(f"/api/registries/{listed['registry_id']}").json()["versions"]
        }

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert main(shlex.split(commands()[4]["approve"])[1:]) == 0
        assert Registry(tmp_path / "registry").champion() == 4
        assert main(shlex.split(commands()[2]["rollback"])[1:]) == 0
    assert Registry(tmp_path / "registry").champion() == 2 and commands()[4] == {
        "show": f"fedretrain registry show 4 --root {(tmp_path / 'registry').resolve()}"
    }


class _Reads:
    """Every file the process opens and every folder it lists while ``recording`` (an audit hook:
    Python has no way to take one off, so it is added once and does nothing when not recording)."""

    paths: list[str] = []
    recording = False
    installed = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.recording and event in ("open", "os.scandir", "os.listdir") and args and args[0] is not None:
            if isinstance(args[0], str | bytes | os.PathLike):
                cls.paths.append(os.path.abspath(os.fsdecode(args[0])))


@pytest.fixture
def reads():
    if not _Reads.installed:
        sys.addaudithook(_Reads.hook)
        _Reads.installed = True
    _Reads.paths, _Reads.recording = [], True
    yield _Reads.paths
    _Reads.recording = False


def _plant_outside(world: Path) -> None:
    # A file beside the roots, and a run directory that is a link out of them.
    (world / "secret.json").write_text('{"marker": "outside-the-roots"}')
    outside = world / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "metrics.jsonl").write_text('{"round": 0, "marker": "outside-the-roots"}\n')
    if not (world / "runs" / "escape").is_symlink():
        (world / "runs" / "escape").symlink_to(outside)


def test_the_dashboard_reads_only_below_its_roots(world, client, reads):
    _plant_outside(world)
    reads.clear()
    (rid,) = [r["registry_id"] for r in client.get("/api/registries").json()]
    pages = ["/federation", "/api/federation", "/cycles", "/api/cycles", "/versions", "/api/registries"]
    pages += [f"/cycles/{r}" for r in _runs(world)] + [f"/api/cycles/{r}" for r in _runs(world)]
    pages += [f"/versions/{rid}", f"/api/registries/{rid}", f"/api/registries/{rid}/versions/1"]
    assert all(client.get(page).status_code == 200 for page in pages)
    roots = [world / "runs", world / "coord", world / "fed" / "coordinator" / "registry"]
    below_world = {Path(p) for p in reads if Path(p).is_relative_to(world)}
    assert world / "coord" / "runs" / COORD_RUN / "summary.json" in below_world  # the hook sees the reads
    assert [p for p in below_world if not any(p.is_relative_to(root) for root in roots)] == []
    assert not any(p.is_relative_to(world / "outside") or p.name == "secret.json" for p in below_world)
    assert "escape" not in client.get("/api/cycles").text


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/cycles/nope", 404),
        ("/api/cycles/escape", 404),  # a link out of the runs folder is not a run
        ("/cycles/escape", 404),
        ("/api/cycles/%2e%2e", 400),
        ("/api/cycles/-x", 400),
        ("/api/cycles/..%2F..%2Fsecret", 404),  # no route: an id never holds a slash
        ("/api/cycles/%2e%2e%2f%2e%2e%2fsecret.json", 404),
        ("/api/registries/..%2Ffed", 404),
        ("/versions/0123456789ab", 404),
        ("/versions/not-an-id", 400),
        ("/api/registries/{rid}/versions/99", 404),
        ("/api/registries/{rid}/versions/-1", 400),
        ("/api/registries/{rid}/versions/1%2F..", 404),
    ],
)
def test_an_unknown_or_malformed_id_finds_nothing(world, client, reads, path, status):
    _plant_outside(world)
    reads.clear()
    (rid,) = [r["registry_id"] for r in client.get("/api/registries").json()]

    reply = client.get(path.replace("{rid}", rid))

    assert reply.status_code == status, reply.text
    assert "outside-the-roots" not in reply.text
    assert not any(Path(p).is_relative_to(world / "outside") or Path(p).name == "secret.json" for p in reads)


def test_a_request_for_another_host_name_is_refused(client):
    assert client.get("/api/cycles", headers={"host": "attacker.example:8765"}).status_code == 400
    assert client.get("/api/cycles", headers={"host": "localhost:8765"}).status_code == 200


@pytest.mark.usefixtures("cli_logging")
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org"])
def test_a_non_loopback_address_is_refused(world, host, capsys):
    code = main(["dashboard", "--runs", str(world / "runs"), "--host", host, "--port", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--host {host}" in err.replace("'", "") and "loopback" in err


def test_the_alerts_page_has_the_watch_and_every_cycles_outcome(world, client):
    view = client.get("/api/alerts").json()
    (fed,) = view["federations"]
    assert "drift" in {a["trigger"] for a in fed["watch"]["alerts"]}
    assert {c["run_id"] for c in view["cycles"]} == set(_runs(world))
    page = client.get("/alerts").text
    assert "Watch of" in page and "drift" in page and "Every cycle" in page


def test_resources_show_the_machine_and_flag_what_looks_wrong(tmp_path):
    # A run whose round 3 took 10x the others, site-01's held-out loss rose beyond its noise,
    # and site-02 was refused in two rounds; written as metrics.jsonl rows are.
    run = tmp_path / "runs" / "20261205-010000-odd"
    run.mkdir(parents=True)
    rows = []
    for n, seconds in enumerate([0.0, 2.0, 2.2, 21.0, 1.9]):
        evaluation = {"site-00": {"change": -0.1, "change_noise_std": 0.05}}
        evaluation["site-01"] = {"change": 0.3 if n == 4 else -0.1, "change_noise_std": 0.1}
        rejected = [{"site_id": "site-02", "reason": "update norm 9.1 over the bound 3.0"}] if n in (2, 3) else []
        rows.append({"round": n, "round_s": seconds, "evaluation": evaluation, "rejected": rejected})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    client = TestClient(create_app(Catalogue.open(tmp_path / "runs", None)), base_url="http://127.0.0.1")
    view = client.get("/api/resources").json()
    assert view["machine"]["memory_total_bytes"] > 0 and view["machine"]["cpus"] >= 1
    assert [d["path"] for d in view["machine"]["disks"]] == [str((tmp_path / "runs").resolve())]
    found = {(a["kind"], a["round"]): a["detail"] for a in view["anomalies"]}
    assert set(found) == {("slow round", 3), ("loss diverges", 4), ("repeated refusals", None)}, found
    assert "10.0x the run's median 2.1 s" in found[("slow round", 3)]
    assert found[("repeated refusals", None)].startswith("site-02: refused in 2 rounds (update norm 9.1")
    page = client.get("/resources").text
    assert "Anomalies" in page and "site-01: held-out loss up 0.3000" in page and 'id="cpu"' in page


def test_a_running_cycle_shows_the_exchange_under_way_and_each_rounds_time_split(tmp_path):
    # Round 1 is written; round 2's train instructions are out, 1 of 3 replies in (live.json as
    # PromptGrid writes it, tests/test_identity.py), and a 60 s deadline.
    run = tmp_path / "runs" / "20261205-020000-live"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: live\nrounds: 3\nstrategy:\n  quorum: 2\n")
    rows = [{"round": 0, "round_s": 4.0}, {"round": 1, "round_s": 10.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    now = time.time()
    done = {"exchange": "train", "round": 1, "expected": 3, "replied": 3, "errors": 0, "seconds": 7.5}
    current = {"exchange": "train", "round": 2, "sent_at": now - 20, "deadline_at": now + 40, "expected": 3}
    live = LiveFile(run / "live.json")
    live.history, live.current = [done], {**current, "replied": 1, "errors": 0}
    live._write()
    client = TestClient(create_app(Catalogue.open(tmp_path / "runs", None)), base_url="http://127.0.0.1")

    view = client.get("/api/cycles/20261205-020000-live").json()
    assert view["exchange"]["replied"] == 1 and view["quorum"] == 2
    assert view["split"] == [{"round": 1, "sites_s": 7.5, "coordinator_s": 2.5}]
    page = html.unescape(client.get("/cycles/20261205-020000-live").text)
    said = re.sub(r"<[^>]+>", "", page)
    assert "now: train round 2: 1 of 3 replies in (0 errors)" in said and "quorum 2" in said
    left = int(page.split('data-deadline="')[1].split(">")[1].split("<")[0])
    assert 35 <= left <= 40 and "sites (exchanges)" in page
    # Once the summary is written, nothing is under way.
    (run / "summary.json").write_text(json.dumps({"rounds": 3, "gate": {"decision": "refuse"}}))
    assert client.get("/api/cycles/20261205-020000-live").json()["exchange"] is None


def _form_token(page: str) -> str:
    return page.split('name="form-token" value="')[1].split('"')[0]


def test_an_approval_without_the_signing_key_is_refused(world, client):
    root = world / "fed" / "coordinator" / "registry"
    (listed,) = client.get("/api/registries").json()
    page = client.get(f"/versions/{listed['registry_id']}").text
    assert 'id="approve-4"' not in page and "fedretrain registry approve 4" in page  # the command, no button
    reply = client.post(f"/versions/{listed['registry_id']}/approve/4", data={"form-token": "x"})
    said = html.unescape(reply.text)
    assert reply.status_code == 403 and "without the coordinator's signing key" in said, said
    assert "run: fedretrain registry approve 4 --root" in said
    assert client.post(f"/versions/{listed['registry_id']}/rollback/2").status_code == 403
    assert Registry(root).status(4) == "pending" and Registry(root).champion() == 2


@pytest.fixture
def signing(world, tmp_path):
    """A dashboard over a copy of the registry, started with its signing key and a login token."""
    shutil.copytree(world / "fed" / "coordinator" / "registry", tmp_path / "registry")
    key = load_private_key(world / "fed" / "coordinator" / "keys" / "coordinator.key")
    access = Access("t" * 24, key, world / "keys" / "coordinator.key", approver="ops-on-call")
    app = create_app(Catalogue.open(None, None, [tmp_path / "registry"]), access=access)
    return TestClient(app, base_url="http://127.0.0.1", follow_redirects=False), tmp_path / "registry"


def test_approve_and_roll_back_from_the_page_after_a_login(world, signing):
    client, root = signing
    registry_id = Catalogue.open(None, None, [root]).registries()[0].registry_id
    versions = f"/versions/{registry_id}"
    # Signed out: pages lead to the login, the API and the actions answer 401.
    assert client.get(versions).headers["location"] == f"/login?next=/versions/{registry_id}"
    assert client.get("/api/registries").status_code == 401
    assert client.post(f"{versions}/approve/4", data={"form-token": "x"}).status_code == 401
    assert client.post("/login", data={"token": "t" * 23, "next": versions}).status_code == 401
    signed_in = client.post("/login", data={"token": "t" * 24, "next": versions})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == versions
    cookie = signed_in.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie  # no TLS here

    page = client.get(versions).text
    assert 'id="approve-4"' in page and 'id="rollback-1"' in page and "approves as ops-on-call" in page
    form = _form_token(page)
    signed = {"form-token": form, "token": "t" * 24, "champion": "2"}  # the page showed champion 2
    # Another session's or no form token, another origin, no login token, a stale page: refused, nothing signed.
    assert client.post(f"{versions}/approve/4", data={**signed, "form-token": "x" * 43}).status_code == 403
    elsewhere = {"origin": "http://evil.example"}
    assert client.post(f"{versions}/approve/4", data=signed, headers=elsewhere).status_code == 403
    assert client.post(f"{versions}/approve/4", data={**signed, "token": ""}).status_code == 403
    stale = client.post(f"{versions}/approve/4", data={**signed, "champion": "1"})
    assert stale.status_code == 409 and "not the 1 this page showed" in html.unescape(stale.text)
    assert Registry(root).status(4) == "pending"

    assert client.post(f"{versions}/approve/4", data=signed).headers["location"] == versions
    registry = Registry(root)
    head = registry.verified_champion(registry.public_key())
    assert head.version == 4 and json.loads((registry.version_dir(4) / "approval.json").read_text())["approver"] == (
        "ops-on-call (dashboard)"
    )
    again = client.post(f"{versions}/approve/4", data={**signed, "champion": "4"})
    assert again.status_code == 409 and "only a pending version can be approved" in again.text
    back = client.post(f"{versions}/rollback/2", data={**signed, "champion": "4", "reason": "bad answers at site-01"})
    assert back.status_code == 303
    head = registry.verified_champion(registry.public_key())
    assert head.version == 2 and registry.latest_rollback().record["reason"] == "bad answers at site-01"
    assert client.post("/logout", data={}).status_code == 303
    assert client.post(f"{versions}/rollback/1", data={**signed, "champion": "2"}).status_code == 401


def test_a_login_token_file_must_be_private_and_long(tmp_path):
    path = tmp_path / "token"
    path.write_text("s" * 32 + "\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token(path)
    path.chmod(0o600)
    assert read_token(path) == "s" * 32
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="line 1 holds a token of 5 characters"):
        read_token(path)
    with pytest.raises(ConfigError, match="no such file|No such file"):
        read_token(tmp_path / "missing")


def test_off_loopback_every_page_needs_a_login(world):
    assert listen_address("0.0.0.0", tls=True) == ("0.0.0.0", False)
    access = Access("t" * 24)
    app = create_app(Catalogue.open(world / "runs", None), access=access, loopback=False)
    client = TestClient(app, base_url="https://coordinator.hospital.example", follow_redirects=False)
    assert client.get("/federation").headers["location"] == "/login?next=/federation"
    assert client.get("/api/cycles").status_code == 401
    client.post("/login", data={"token": "t" * 24})
    assert "Federation of" in client.get("/federation").text


def test_tls_and_a_login_on_a_real_server(world, tmp_path):
    # The coordinator's own CA and a certificate for 127.0.0.1 (fedretrain keys ca / keys superlink).
    ca = create_ca(tmp_path / "ca")
    cert = issue_superlink_cert(tmp_path / "ca", tmp_path / "tls", ["127.0.0.1"])
    token = tmp_path / "token"
    token.write_text("a-token-of-the-operators-own-choosing\n")
    token.chmod(0o600)
    command = ["dashboard", "--runs", str(world / "runs"), "--port", "0", "--token-file", str(token)]
    command += ["--tls-cert", str(cert.cert_path), "--tls-key", str(cert.key_path)]
    proc = start_cli(command)
    try:
        line = first_line(proc, timeout_s=120)
        assert line.startswith("fedretrain dashboard: https://127.0.0.1:"), line
        url = line.split()[2]
        trusted = ssl.create_default_context(cafile=str(ca.cert_path))
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=trusted), _NoRedirect())
        with pytest.raises(urllib.error.HTTPError) as redirected:
            opener.open(url + "federation", timeout=30)
        assert redirected.value.code == 303 and redirected.value.headers["location"].startswith("/login")
        body = urllib.parse.urlencode({"token": "a-token-of-the-operators-own-choosing"}).encode()
        with pytest.raises(urllib.error.HTTPError) as signed_in:
            opener.open(urllib.request.Request(url + "login", data=body), timeout=30)
        cookie = signed_in.value.headers["set-cookie"]
        assert signed_in.value.code == 303 and "Secure" in cookie
        request = urllib.request.Request(url + "federation", headers={"Cookie": cookie.split(";")[0]})
        with opener.open(request, timeout=30) as reply:
            assert "Federation of" in reply.read().decode()
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP on the TLS port
            urllib.request.urlopen(url.replace("https", "http") + "federation", timeout=30)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.mark.parametrize("command", DASHBOARD_COMMANDS)
def test_the_readme_dashboard_commands_serve_the_pages(world, command):
    # As written, in a directory holding runs/ and coord/, on a free port; stopped by its process id.
    proc = start_cli([*shlex.split(command)[1:], "--port", "0"], cwd=world)
    try:
        line = first_line(proc, timeout_s=120)
        assert line.startswith("fedretrain dashboard: http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        if "--signing-key" in command:  # a login first, with the token it printed
            token = proc.stdout.readline().strip()  # printed with the address (select() misses a buffered line)
            assert token.startswith("fedretrain dashboard: login token "), token
            form = urllib.parse.urlencode({"token": token.split()[4]}).encode()
            browser.open(urllib.request.Request(url + "login", data=form), timeout=30).close()
        with browser.open(url + "federation", timeout=30) as reply:
            page = reply.read().decode()
        with browser.open(url + "api/cycles", timeout=30) as reply:
            runs = {r["run_id"] for r in json.loads(reply.read())}
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
    assert code == 0 and "site-00" in page, page[:2000]
    assert runs == ({COORD_RUN} if "--dir" in command else set(_runs(world)) - {COORD_RUN})
    assert ("signed in" in page) == ("--signing-key" in command)  # with the key, signed in first

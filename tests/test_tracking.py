"""Export to MLflow and TensorBoard: what the trackers hold is what the run directory and the registry say.

The run directories are written by the cycle's own writers (``RunRecorder``, ``round_entry``,
``build_summary``, the gate's ``decide``, ``Registry.publish``) from hand-made round logs:
a finished demo-sized run (3 sites, 3 rounds, version 1 published) and a running one (round
1 of 3). MLflow is a SQLite store, read back through ``MlflowClient``; TensorBoard's event
files through its ``EventAccumulator``. One test runs a real cycle (two sites on a tiny model,
in this process) with ``tracking.*`` set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shlex
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_model_families import save_family

from cli.main import main
from fedretrain.config import compose_config, flatten, to_yaml, unflatten
from fedretrain.errors import TrackingError
from fedretrain.registry.signing import generate_keypair, key_id, load_private_key, load_public_key
from fedretrain.registry.store import Registry
from fedretrain.training.evaluate import LossStats
from server.cycle.gate import decide
from server.cycle.report import RunRecorder, finite_or_null
from server.cycle.summary import build_summary, round_entry, site_outcomes
from server.tracking.export import Targets, export_run
from server.tracking.live import LiveExport
from server.tracking.runfiles import read_run
from strategies.checked import RoundLog
from strategies.validation import SiteEvaluation

FINISHED, RUNNING = "20261203-092400-demo", "20261203-100000-demo"
RUN_ID = "0123456789ab"
SITES = ("site-00", "site-01", "site-02")
LOSSES = (6.7776, 5.7278, 5.4464, 5.3017)  # validation loss after rounds 0..3 (the README's demo)
# The commands the README's "Exporting to MLflow and TensorBoard" gives, run as written below.
README_COMMANDS = [
    "fedretrain export --runs runs --mlflow-uri sqlite:///runs/mlflow.db --tensorboard runs/tensorboard",
    f"fedretrain export --run runs/{FINISHED} --mlflow-uri sqlite:///runs/mlflow.db --pubkey keys/coordinator.pub",
]


# -- a federation's files, written by the cycle's own writers ------------------------------------


def _loss(value: float, n: int = 40) -> LossStats:
    # Per-record losses spread around ``value`` (their mean), ten tokens each.
    losses = tuple(value + 0.05 * ((i % 5) - 2) for i in range(n))
    return LossStats(loss=value, tokens=10 * n, examples=n, example_losses=losses, example_tokens=(10,) * n)


def _round_log(server_round: int, last: bool) -> RoundLog:
    accepted = {
        site: {
            "node-id": 100 + k,
            "epsilon": round(1.5 * server_round + 0.1 * k, 3),
            "epsilon-ceiling": 8.0,
            "delta": 1e-5,
            "noise-multiplier": 0.986,
            "sample-rate": 0.125,
            "steps": 12 * server_round,
        }
        for k, site in enumerate(SITES)
    }
    evaluation = {}
    if last:  # each site's noised held-out change: -0.9, -1.0, -1.1 per record over 80 records
        evaluation = {
            site: SiteEvaluation(site, 80.0, -80 * (0.9 + 0.1 * k), 80 * 1.1, 6.0, 100 + k, {"epsilon": 4.14 + k / 100})
            for k, site in enumerate(SITES)
        }
    return RoundLog(sampled=3, bytes_down=104595, bytes_up=102864, accepted=accepted, evaluation=evaluation)


def write_run(runs: Path, name: str, cfg, rounds: int, adapter: Path | None) -> Path:
    """A run directory as a cycle leaves it after ``rounds`` rounds; with ``adapter``, the cycle
    ends there: the gate decides and version N is published into the config's registry."""
    run_dir = runs / name
    recorder = RunRecorder(run_dir, to_yaml(unflatten(flatten(cfg))))
    baseline, logs = _loss(LOSSES[0]), {}
    for r in range(rounds + 1):
        if r:  # round 0 is the starting point: no round log
            logs[r] = _round_log(r, last=r == cfg.rounds)
        entry = round_entry(r, _loss(LOSSES[r]), baseline, logs.get(r), round_s=60.0 + r, elapsed_s=3.0 + 61.0 * r)
        recorder.record_round(entry)
    if adapter is None:
        return run_dir
    candidate, sites = _loss(LOSSES[rounds]), site_outcomes(recorder.rounds)
    result = decide(
        cfg.gate, baseline, candidate, sorted(logs[rounds].evaluation.values(), key=lambda e: e.site_id), seed=0
    )
    registry, key = Registry(cfg.registry.root), load_private_key(cfg.registry.signing_key)
    version = registry.publish(
        adapter,
        signing_key=key,
        base_model={"name": "embedded", "sha256": "ab" * 32},
        lora=cfg.lora.to_manifest(["q_proj", "v_proj"]),
        run={"run_id": RUN_ID, "name": cfg.name, "rounds": cfg.rounds, "seed": 0, "baseline_version": None},
        sites={registry.pseudonym(s): v.manifest_figures() for s, v in sites.items()},
        gate=finite_or_null(result.to_dict(site_name=registry.pseudonym)),
        expiry_days=90,
    )
    lm = SimpleNamespace(spec=SimpleNamespace(nbytes=68_000), base_nbytes=5_260_000)
    summary = build_summary(
        cfg, RUN_ID, run_dir, recorder.rounds, logs, baseline, candidate, lm, sites, wall_time_s=223.7
    )
    summary.update(
        baseline_version=None,
        sync=None,
        central_dp=None,
        gate=result.to_dict(),
        published_version=version,
        pending_version=None,
        registry=str(registry.root),
        publication=None,
    )
    recorder.write_summary(summary)
    return run_dir


def build_world(root: Path, adapter: Path) -> Path:
    """``root`` holding keys/ (the coordinator's key pair), fed/registry, and runs/: the finished
    run (version 1 published) and a running one (round 1 of 3)."""
    generate_keypair(root / "keys")
    cfg = compose_config(["experiment=demo"])
    registry = dataclasses.replace(
        cfg.registry, root=str(root / "fed" / "registry"), signing_key=str(root / "keys" / "coordinator.key")
    )
    cfg = dataclasses.replace(cfg, registry=registry)
    write_run(root / "runs", FINISHED, cfg, 3, adapter)
    write_run(root / "runs", RUNNING, cfg, 1, None)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_adapter_dir) -> Path:
    return build_world(tmp_path_factory.mktemp("tracking"), tiny_adapter_dir)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, its tables made once (MLflow's migrations take seconds)."""
    from server.tracking.to_mlflow import mlflow_client

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    client = mlflow_client(f"sqlite:///{path}")
    client.search_experiments()
    client.search_registered_models()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, mlflow_template) -> str:
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _client(uri: str):
    from server.tracking.to_mlflow import mlflow_client

    return mlflow_client(uri)


def _mlflow_run(client, name: str, experiment: str = "fedretrain"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`fedretrain.run` = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _history(client, mlflow_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(mlflow_id, key))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _model_name(world: Path) -> str:
    """The registered model of ``world``'s registry: named by the key that signs it."""
    return f"fedretrain-{key_id(load_public_key(world / 'keys' / 'coordinator.pub'))}"


# -- MLflow -----------------------------------------------------------------------------------


def test_mlflow_holds_each_round_at_its_step_the_config_and_the_gate(world, mlflow_uri):
    # Prepare
    run_dir = world / "runs" / FINISHED
    rows, summary = _rows(run_dir), json.loads((run_dir / "summary.json").read_text())

    # Execute
    export_run(read_run(run_dir), Targets(mlflow_uri=mlflow_uri))

    # Assert: each round at step = its round, as metrics.jsonl has it
    client = _client(mlflow_uri)
    run = _mlflow_run(client, FINISHED)
    assert run.info.run_name == FINISHED and run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "validation/candidate_loss") == [(r, LOSSES[r]) for r in range(4)]
    assert _history(client, run.info.run_id, "validation/baseline_loss") == [(r, LOSSES[0]) for r in range(4)]
    for k, site in enumerate(SITES):
        assert _history(client, run.info.run_id, f"epsilon/{site}") == [
            (r, round(1.5 * r + 0.1 * k, 3)) for r in (1, 2, 3)
        ]
        change = rows[3]["evaluation"][site]["change"]
        assert change == pytest.approx(-(0.9 + 0.1 * k))
        assert _history(client, run.info.run_id, f"heldout_change/{site}") == [(3, change)]
    assert _history(client, run.info.run_id, "sites/accepted") == [(0, 0.0), (1, 3.0), (2, 3.0), (3, 3.0)]
    assert _history(client, run.info.run_id, "bytes/up") == [(0, 0.0)] + [(r, 102864.0) for r in (1, 2, 3)]
    assert _history(client, run.info.run_id, "time/round_s") == [(r, 60.0 + r) for r in range(4)]
    # ... the gate's figures at the last round, its decision and the version as tags ...
    gate = summary["gate"]
    for key in ("improvement", "ci_low", "ci_high", "margin"):
        assert _history(client, run.info.run_id, f"gate/{key}") == [(3, gate[key])]
    assert gate["improvement"] == pytest.approx(LOSSES[0] - LOSSES[3])
    tags = run.data.tags
    assert (tags["gate.decision"], tags["fedretrain.published_version"]) == ("publish", "1")
    assert (tags["fedretrain.run_id"], tags["fedretrain.state"]) == (RUN_ID, "finished")
    # ... and config.yaml as parameters, flattened.
    assert run.data.params["privacy.target_epsilon"] == "4.0"
    assert run.data.params["name"] == "demo" and run.data.params["rounds"] == "3"


def test_every_version_is_registered_and_the_champion_alias_follows_the_signed_chain(
    tmp_path, tiny_adapter_dir, mlflow_uri
):
    # Prepare: version 2 published after the run's version 1, then the operator rolls back to 1.
    world = build_world(tmp_path / "w", tiny_adapter_dir)
    registry, key = Registry(world / "fed" / "registry"), load_private_key(world / "keys" / "coordinator.key")
    figures = {k: registry.manifest(1)[k] for k in ("base_model", "lora", "sites", "gate")}
    assert registry.publish(tiny_adapter_dir, signing_key=key, expiry_days=30, run={"run_id": "other"}, **figures) == 2
    registry.rollback(1, signing_key=key, reason="operator test")
    pubkey = load_public_key(world / "keys" / "coordinator.pub")

    # Execute
    exported = export_run(read_run(world / "runs" / FINISHED), Targets(mlflow_uri=mlflow_uri), pubkey)

    # Assert: both versions, tagged with their number and status; the alias on version 1, not the newest
    client, name = _client(mlflow_uri), _model_name(world)
    assert exported.authenticated and (exported.mlflow.versions, exported.mlflow.champion) == (2, 1)
    versions = {mv.tags["fedretrain.version"]: mv for mv in client.search_model_versions(f"name = '{name}'")}
    assert {v: mv.tags["fedretrain.status"] for v, mv in versions.items()} == {"1": "champion", "2": "rolled-back"}
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["fedretrain.version"] == "1" and champion.tags["gate.decision"] == "publish"
    assert client.get_registered_model(name).tags["fedretrain.champion_authenticated"] == "True"
    # Version 1's files are artifacts of the MLflow run of the cycle that published it, byte for byte.
    run = _mlflow_run(client, FINISHED)
    assert champion.run_id == run.info.run_id and champion.source == f"runs:/{run.info.run_id}/registry/versions/000001"
    import mlflow.artifacts

    local = Path(
        mlflow.artifacts.download_artifacts(champion.source, dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_uri)
    )
    folder = registry.version_dir(1)
    assert {p.name: _sha(p) for p in local.iterdir()} == {p.name: _sha(p) for p in folder.iterdir()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_exporting_again_adds_only_what_is_new(tmp_path, tiny_adapter_dir, mlflow_uri):
    # Prepare: the running run exported after round 1, then twice after its last round and summary.
    world = build_world(tmp_path / "w", tiny_adapter_dir)
    runs, targets = world / "runs", Targets(mlflow_uri=mlflow_uri, tensorboard_dir=tmp_path / "tb")
    export_run(read_run(runs / RUNNING), targets)
    client = _client(mlflow_uri)
    first = _mlflow_run(client, RUNNING)
    assert first.info.status == "RUNNING" and "gate.decision" not in first.data.tags

    # Execute: the cycle goes on to round 3 and publishes version 2 (a rewrite of its files, as a cycle does)
    cfg = compose_config(["experiment=demo"])
    cfg = dataclasses.replace(
        cfg,
        registry=dataclasses.replace(
            cfg.registry, root=str(world / "fed" / "registry"), signing_key=str(world / "keys" / "coordinator.key")
        ),
    )
    shutil.rmtree(runs / RUNNING)
    write_run(runs, RUNNING, cfg, 3, tiny_adapter_dir)
    for _ in range(2):
        export_run(read_run(runs / RUNNING), targets)
        export_run(read_run(runs / FINISHED), targets)

    # Assert: one MLflow run each, each step once, each version once
    run = _mlflow_run(client, RUNNING)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "validation/candidate_loss") == [(r, LOSSES[r]) for r in range(4)]
    assert run.data.tags["fedretrain.published_version"] == "2"
    name = _model_name(world)
    assert sorted(mv.tags["fedretrain.version"] for mv in client.search_model_versions(f"name = '{name}'")) == [
        "1",
        "2",
    ]
    assert client.get_model_version_by_alias(name, "champion").tags["fedretrain.version"] == "2"
    assert len(list((tmp_path / "tb" / RUNNING).iterdir())) == 1


def test_a_registry_that_does_not_verify_loses_the_champion_alias(tmp_path, tiny_adapter_dir, mlflow_uri):
    # Prepare: exported once; then someone signs a pointer record with their own key.
    world = build_world(tmp_path / "w", tiny_adapter_dir)
    run, targets = read_run(world / "runs" / FINISHED), Targets(mlflow_uri=mlflow_uri)
    export_run(run, targets)
    client, name = _client(mlflow_uri), _model_name(world)
    assert client.get_registered_model(name).aliases == {"champion": 1}
    pointer = world / "fed" / "registry" / "pointers" / "000001.sig"
    pointer.write_bytes(bytes(64))

    # Execute
    with pytest.raises(TrackingError) as err:
        export_run(run, targets)

    # Assert
    assert "000001" in str(err.value) and f"the 'champion' alias of MLflow model {name!r} was removed" in str(err.value)
    assert client.get_registered_model(name).aliases == {}


def test_without_the_coordinators_key_the_champion_is_marked_not_authenticated(world, mlflow_uri, tmp_path):
    # A key that is not the registry's refuses it: the pin is not the coordinator's.
    exported = export_run(read_run(world / "runs" / FINISHED), Targets(mlflow_uri=mlflow_uri))
    assert not exported.authenticated
    client = _client(mlflow_uri)
    assert client.get_registered_model(_model_name(world)).tags["fedretrain.champion_authenticated"] == "False"
    other = generate_keypair(tmp_path / "other")
    with pytest.raises(TrackingError, match="pin"):
        export_run(
            read_run(world / "runs" / FINISHED), Targets(mlflow_uri=mlflow_uri), load_public_key(other.public_path)
        )


# -- TensorBoard --------------------------------------------------------------------------------


def test_tensorboard_has_the_same_curves_once_however_often_exported(world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Prepare
    run_dir = world / "runs" / FINISHED
    rows, summary = _rows(run_dir), json.loads((run_dir / "summary.json").read_text())

    # Execute
    for _ in range(2):
        log_dir = export_run(read_run(run_dir), Targets(tensorboard_dir=tmp_path / "tb")).tensorboard

    # Assert: one event file, each step once; float32 as TensorBoard stores scalars
    assert log_dir == tmp_path / "tb" / FINISHED and len(list(log_dir.iterdir())) == 1
    events = EventAccumulator(str(log_dir))
    events.Reload()

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert scalars("validation/candidate_loss") == [
        (r["round"], pytest.approx(r["validation"]["candidate_loss"])) for r in rows
    ]
    assert scalars("epsilon/site-02") == [(r, pytest.approx(1.5 * r + 0.2)) for r in (1, 2, 3)]
    assert scalars("gate/ci_low") == [(3, pytest.approx(summary["gate"]["ci_low"]))]
    assert events.Scalars("time/elapsed_s")[2].wall_time == pytest.approx(read_run(run_dir).started_ms / 1000 + 125.0)


# -- the command --------------------------------------------------------------------------------


@pytest.mark.usefixtures("cli_logging")
def test_the_readme_commands_export_every_run(world, tmp_path, mlflow_template, monkeypatch, capsys):
    # Prepare: the README's commands run in a directory holding runs/ and keys/, as written.
    shutil.copytree(world, tmp_path / "w", symlinks=True)
    monkeypatch.chdir(tmp_path / "w")
    shutil.copy(mlflow_template, "runs/mlflow.db")

    # Execute
    codes = [main(shlex.split(command)[1:]) for command in README_COMMANDS]

    # Assert
    out = capsys.readouterr().out
    assert codes == [0, 0], out
    assert f"exported {FINISHED}: rounds 0-3, finished, gate publish, version 1; MLflow run" in out
    assert f"exported {RUNNING}: rounds 0-1, running; MLflow run" in out
    assert out.count("NOT AUTHENTICATED") == 1  # the first command has no --pubkey
    assert sorted(p.name for p in Path("runs/tensorboard").iterdir()) == [FINISHED, RUNNING]
    client = _client("sqlite:///runs/mlflow.db")
    assert len(client.search_runs([client.get_experiment_by_name("fedretrain").experiment_id])) == 2


def test_the_readme_gives_only_export_commands_run_here():
    from test_readme import readme_commands

    assert {c for c in readme_commands() if c.startswith("fedretrain export")} <= set(README_COMMANDS)


def _torn(root: Path) -> Path:
    with (root / "runs" / FINISHED / "metrics.jsonl").open("a") as f:
        f.write('{"round": 4, "valid')
    return root / "runs" / FINISHED


@pytest.mark.usefixtures("cli_logging")
@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--run", "{root}/nope", "--tensorboard", "{root}/tb"], "{root}/nope: not a directory"),
        (["--run", "{root}/runs/fresh", "--tensorboard", "{root}/tb"], "fresh/metrics.jsonl: no such file"),
        (["--run", "torn", "--tensorboard", "{root}/tb"], "metrics.jsonl:5: not JSON"),
        (["--run", "{root}/runs/" + FINISHED, "--mlflow-uri", "ftp://host/x"], "--mlflow-uri: unknown MLflow"),
        (["--run", "{root}/runs/" + FINISHED, "--mlflow-uri", "./mlruns"], "--mlflow-uri: no URI scheme"),
        (
            ["--run", "{root}/runs/" + FINISHED, "--mlflow-uri", "http://u:pw@h"],
            "--mlflow-uri: the URI holds a password",
        ),
        (["--run", "{root}/runs/" + FINISHED], "give --mlflow-uri URI, --tensorboard DIR or both"),
    ],
)
def test_bad_input_is_a_clear_error_naming_the_file_line_or_flag(tmp_path, tiny_adapter_dir, capsys, args, names):
    # Prepare
    root = build_world(tmp_path / "w", tiny_adapter_dir)
    (root / "runs" / "fresh").mkdir()  # a cycle that has not scored round 0 yet
    shutil.copy(root / "runs" / FINISHED / "config.yaml", root / "runs" / "fresh")
    argv = [str(_torn(root)) if a == "torn" else a.format(root=root) for a in args]

    # Execute
    code = main(["export", *argv])

    # Assert: exit status 2 (README: Exit codes), the sentence names the thing, nothing written
    err = capsys.readouterr().err
    assert code == 2 and names.format(root=root) in err, err
    assert not (root / "tb").exists()


@pytest.mark.usefixtures("cli_logging")
def test_with_runs_a_damaged_run_is_named_and_the_others_are_exported(tmp_path, tiny_adapter_dir, capsys):
    root = build_world(tmp_path / "w", tiny_adapter_dir)
    _torn(root)
    code = main(["export", "--runs", str(root / "runs"), "--tensorboard", str(root / "tb")])
    out, err = capsys.readouterr()
    assert code == 2 and f"{FINISHED}/metrics.jsonl:5: not JSON" in err and "1 run(s) not exported" in err
    assert f"exported {RUNNING}: rounds 0-1, running; TensorBoard {root / 'tb' / RUNNING}" in out
    assert [p.name for p in (root / "tb").iterdir()] == [RUNNING]


# -- the cycle's live export ---------------------------------------------------------------------


def test_the_live_export_follows_the_run_directory_as_it_is_written(world, tmp_path, mlflow_uri):
    # Prepare: a copy of the finished run, replayed through a recorder that notifies the export.
    source = world / "runs" / FINISHED
    rows, summary = _rows(source), json.loads((source / "summary.json").read_text())
    run_dir = tmp_path / "runs" / FINISHED
    targets = Targets(mlflow_uri=mlflow_uri, tensorboard_dir=tmp_path / "tb")
    live = LiveExport(targets, run_dir, load_public_key(world / "keys" / "coordinator.pub"), RUN_ID, timeout_s=60)
    recorder = RunRecorder(run_dir, (source / "config.yaml").read_text(), on_write=live.notify)

    # Execute
    for row in rows:
        recorder.record_round(row)
    recorder.write_summary(summary)
    live.close()

    # Assert: everything arrived, the alias too (the run's registry, verified with the coordinator's key)
    client = _client(mlflow_uri)
    run = _mlflow_run(client, FINISHED)
    assert run.info.status == "FINISHED" and run.data.tags["fedretrain.run_id"] == RUN_ID
    assert _history(client, run.info.run_id, "validation/candidate_loss") == [(r, LOSSES[r]) for r in range(4)]
    assert client.get_model_version_by_alias(_model_name(world), "champion").tags["fedretrain.version"] == "1"
    assert (tmp_path / "tb" / FINISHED).is_dir()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.usefixtures("propagating_logs")
def test_an_unreachable_tracker_is_a_warning_and_the_run_directory_is_untouched(world, tmp_path, monkeypatch, caplog):
    # Prepare: a tracking server that is not there, and MLflow not retrying it.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_dir = tmp_path / FINISHED
    shutil.copytree(world / "runs" / FINISHED, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    uri = f"http://127.0.0.1:{_closed_port()}"
    targets = Targets(mlflow_uri=uri, tensorboard_dir=tmp_path / "tb")
    live = LiveExport(targets, run_dir, load_public_key(world / "keys" / "coordinator.pub"), RUN_ID, 60)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedretrain"):
        live.notify()
        live.close()

    # Assert: one warning naming the tracker and the command that redoes the export
    (warning,) = [r.getMessage() for r in caplog.records if "tracking:" in r.getMessage()]
    assert f"MLflow at {uri}" in warning and f"fedretrain export --run {run_dir} --mlflow-uri {uri}" in warning
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert (tmp_path / "tb" / FINISHED).is_dir()  # the other target was still exported


def test_a_crashed_cycle_is_failed_in_mlflow_and_a_later_command_leaves_it_so(world, tmp_path, mlflow_uri):
    # Prepare: the running run's cycle dies with an error after round 1.
    run_dir = tmp_path / RUNNING
    shutil.copytree(world / "runs" / RUNNING, run_dir)
    live = LiveExport(Targets(mlflow_uri=mlflow_uri), run_dir, None, RUN_ID, 60)
    live.notify()

    # Execute
    live.close(crashed=True)
    after_crash = _mlflow_run(_client(mlflow_uri), RUNNING).info.status
    export_run(read_run(run_dir), Targets(mlflow_uri=mlflow_uri))  # the command cannot tell crashed from running

    # Assert
    assert after_crash == "FAILED" and _mlflow_run(_client(mlflow_uri), RUNNING).info.status == "FAILED"


@pytest.mark.usefixtures("propagating_logs")
def test_the_end_of_a_cycle_waits_for_a_slow_tracker_no_longer_than_its_timeout(world, tmp_path, monkeypatch, caplog):
    # Prepare: an export that takes 5 s, and 0.2 s allowed at the end of the cycle.
    import server.tracking.live

    monkeypatch.setattr(server.tracking.live, "export_run", lambda *a, **k: time.sleep(5))
    live = LiveExport(Targets(tensorboard_dir=tmp_path / "tb"), world / "runs" / FINISHED, None, RUN_ID, 0.2)

    # Execute
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="fedretrain"):
        live.notify()
        live.close()

    # Assert
    assert time.perf_counter() - started < 2.0
    assert "did not finish within 0.2 s (tracking.timeout_s)" in caplog.text


@pytest.mark.usefixtures("instruction_identity", "keep_global_random_state", "propagating_logs")
def test_a_real_cycle_with_tracking_set_exports_its_rounds_gate_and_version(tmp_path, mlflow_uri):
    from test_model_families import one_round

    from fedretrain.modeling.loading import load_tokenizer

    # Prepare: two sites on a tiny Llama, one DP round (tests/test_model_families.py's cycle).
    model_dir = save_family("llama", tmp_path / "llama", load_tokenizer("embedded"))
    tb = tmp_path / "tb"

    # Execute
    summary = one_round(model_dir, tmp_path, [f"tracking.mlflow_uri={mlflow_uri}", f"tracking.tensorboard_dir={tb}"])

    # Assert: MLflow and TensorBoard hold what the run directory says
    run_dir = tmp_path / "run"
    client = _client(mlflow_uri)
    run = _mlflow_run(client, "run")
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1] and summary["gate"]["decision"] == "publish"
    assert _history(client, run.info.run_id, "validation/candidate_loss") == [
        (r["round"], r["validation"]["candidate_loss"]) for r in rows
    ]
    assert run.data.tags["gate.decision"] == "publish" and run.data.tags["fedretrain.published_version"] == "1"
    assert run.data.tags["fedretrain.run_id"] == summary["run_id"] and run.info.status == "FINISHED"
    (model,) = client.search_registered_models()
    assert client.get_model_version_by_alias(model.name, "champion").tags["fedretrain.version"] == "1"
    assert model.tags["fedretrain.champion_authenticated"] == "True"  # the cycle's own key verified the chain
    assert (tb / "run").is_dir()

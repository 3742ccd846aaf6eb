"""The deployment pieces that need no process: paths in overrides, TOML and connection files
(read back with Flower's own parsers), addresses, the SuperLink's and SuperNode's command
lines, and the CLI's refusals. Nothing is started: the functions that would start a
process are replaced by ones that fail the test.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from flwr.cli.flower_config import parse_superlink_connection
from flwr.common import log as flwr_log
from flwr.common.config import parse_config_args

import client.join
import fedretrain.deploy.flower
import fedretrain.modeling.loading
import server.deploy.coordinator
from cli.main import main
from client.join import (
    ClientAppWatchdog,
    JoinSettings,
    check_site,
    claim_state,
    mark_clientapp,
    node_config_path,
    prepare_site,
    supernode_command,
)
from fedretrain.config import site_config_from_node_config
from fedretrain.deploy.flower import CONNECTION, ControlApi, run_flwr, split_address, toml_assignments, write_connection
from fedretrain.errors import ConfigError, DeployError, ResumeError
from server.app import run_log
from server.cycle.rundir import cycle_lock, cycle_running
from server.deploy.coordinator import Coordinator, absolute_paths, submit_run, superlink_command

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "site-a"


def flag(argv: list[str], name: str) -> str:
    """The value after ``name`` in ``argv``."""
    return argv[argv.index(name) + 1]


@pytest.fixture
def no_processes(monkeypatch):
    """Anything that would start or wait for a Flower process (or build a model) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a process would have been started")

    monkeypatch.setattr(client.join, "start_supernode", refuse)
    monkeypatch.setattr(server.deploy.coordinator, "start_superlink", refuse)
    monkeypatch.setattr(fedretrain.deploy.flower, "supervise", refuse)
    monkeypatch.setattr(fedretrain.modeling.loading, "resolve_model_path", refuse)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    shutil.copytree(EXAMPLE, tmp_path / "data")
    return tmp_path / "data"


# --- absolute_paths --------------------------------------------------------------------


def test_absolute_paths_makes_the_coordinators_files_absolute_and_adds_an_output_dir(tmp_path):
    # Prepare: the CLI runs in <tmp>/work.
    cwd = (tmp_path / "work").resolve()
    overrides = [
        "registry.root=reg",
        "+registry.signing_key=keys/coordinator.key",
        "validation_path=../val.jsonl",
        "rounds=3",
        "train.lr=0.01",
        "experiment=smoke",
        "model.name_or_path=models/tiny",
    ]

    # Execute
    out = absolute_paths(overrides, cwd, default_output=tmp_path / "coord" / "runs")

    # Assert: the three path keys resolved against cwd ("../val.jsonl" -> <tmp>/val.jsonl);
    # the others, model path included, as given; output_dir appended.
    assert out == [
        f"registry.root={cwd}/reg",
        f"+registry.signing_key={cwd}/keys/coordinator.key",
        f"validation_path={tmp_path.resolve()}/val.jsonl",
        "rounds=3",
        "train.lr=0.01",
        "experiment=smoke",
        "model.name_or_path=models/tiny",
        f"output_dir={tmp_path.resolve()}/coord/runs",
    ]


def test_absolute_paths_leaves_absolute_paths_and_null_alone_and_keeps_a_given_output_dir(tmp_path):
    cwd = tmp_path.resolve()
    overrides = ["output_dir=out", "registry.root=/srv/registry", "registry.signing_key=null", "validation_path="]

    out = absolute_paths(overrides, cwd, default_output=tmp_path / "coord" / "runs")

    assert out == [
        f"output_dir={cwd}/out",
        "registry.root=/srv/registry",
        "registry.signing_key=null",
        "validation_path=",
    ]


def test_absolute_paths_keeps_an_output_dir_given_as_null_or_with_a_plus(tmp_path):
    assert absolute_paths(["output_dir=null"], tmp_path, tmp_path / "runs") == ["output_dir=null"]
    assert absolute_paths(["++output_dir=/abs"], tmp_path, tmp_path / "runs") == ["++output_dir=/abs"]


# --- toml_assignments, write_connection ---------------------------------------------------


def test_toml_assignments_parse_back_to_the_same_values():
    # Prepare
    values = {
        "plain": "x",
        "tricky": 'say "hi" to C:\\new dir\\ \ttab',
        "empty": "",
        "accent": "données",
        "flag": True,
        "off": False,
        "n": 3,
        "neg": -7,
        "f": 0.1,
        "tiny": 1e-5,
        "big": 1.5e300,
        "a.b": "a dotted key is one key",
        "with space": 1,
    }

    # Execute
    parsed = tomllib.loads(toml_assignments(values))

    # Assert: equal, and of the same types (True is not 1, 3 is not 3.0).
    assert parsed == values
    assert {k: type(v) for k, v in parsed.items()} == {k: type(v) for k, v in values.items()}


def test_toml_assignments_carry_characters_outside_the_basic_plane():
    values = {"data-dir": "/srv/sites/🏥-north", "site-id": "𝒉1"}

    assert tomllib.loads(toml_assignments(values)) == values


def test_write_connection_is_read_by_flowers_own_parser(tmp_path):
    # Prepare
    ca = tmp_path / "keys" / "ca.pem"

    # Execute
    path = write_connection(tmp_path / "flwr", "coordinator.example.org:9093", ca)

    # Assert: the default connection, with the CA's absolute path and no "insecure".
    data = tomllib.loads(path.read_text())
    assert path == tmp_path / "flwr" / "config.toml"
    assert data["superlink"]["default"] == "fedretrain"
    conn = parse_superlink_connection(data["superlink"]["fedretrain"], "fedretrain")
    assert conn.address == "coordinator.example.org:9093"
    assert conn.root_certificates == str(ca.resolve())
    assert not conn.insecure


def test_write_connection_without_a_ca_is_insecure(tmp_path):
    path = write_connection(tmp_path, "127.0.0.1:9093", None)

    conn = parse_superlink_connection(tomllib.loads(path.read_text())["superlink"]["fedretrain"], "fedretrain")

    assert conn.address == "127.0.0.1:9093"
    assert conn.insecure is True and conn.root_certificates is None


# --- split_address --------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, expected",
    [
        ("coordinator.example.org:9093", ("coordinator.example.org", 9093)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("[::1]:9093", ("::1", 9093)),
        ("h:65535", ("h", 65535)),
    ],
)
def test_split_address_accepts_host_and_port(address, expected):
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ["nohost", "h:0", "h:x", ":9093", "h:65536", "h:-1", "h:"])
def test_split_address_refuses_a_bad_address_naming_it(address):
    with pytest.raises(DeployError) as bad:
        split_address(address)
    assert repr(address) in str(bad.value)


# --- ControlApi: what `flwr ls` asks, from this process ------------------------------------


def test_the_control_api_answers_as_the_flwr_cli_does_and_names_a_superlink_that_is_gone(tmp_path):
    # Prepare: a real SuperLink (insecure: a bench), with no runs and no nodes.
    coord = Coordinator(tmp_path / "coord")
    port = _free_port()
    proc = server.deploy.coordinator.start_superlink(coord, f"127.0.0.1:{port}", None)
    try:
        # Execute / Assert: one client answers as `flwr ls` and `flwr supernode ls` do, again and again.
        with ControlApi(coord.flwr_home) as api:
            for _ in range(3):
                assert api.runs() == run_flwr(coord.flwr_home, ["ls", CONNECTION])["runs"] == []
                assert api.nodes() == []
            # ... and an unknown run is Flower's own refusal, in Flower's words.
            with pytest.raises(DeployError, match=r"flwr ls failed: \[code: \d+\] Run ID not found"):
                api.runs("12345")
            assert server.deploy.coordinator.status(coord)["runs"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # A SuperLink that is gone is named as such, not as a crash.
    with ControlApi(coord.flwr_home) as api, pytest.raises(DeployError, match="flwr supernode ls failed"):
        api.nodes()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- supervise: a signal reaches the child once ---------------------------------------------

# A child that exits as Flower's processes do: its first SIGTERM restores the default action,
# then it takes a moment to leave (a SuperNode tells the SuperLink), then writes "left".
FLOWER_LIKE_CHILD = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def leave(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(1.0)
    out.joinpath("left").write_text("graceful")
    sys.exit(0)
signal.signal(signal.SIGTERM, leave)
out.joinpath("ready").write_text("")
while True:
    time.sleep(0.1)
"""


@pytest.mark.parametrize("to_group", [True, False], ids=["the-whole-group", "the-supervisor-only"])
def test_a_stopped_supervisor_lets_its_child_leave_gracefully(tmp_path, to_group):
    # Prepare: `supervise` over a Flower-like child, in a session of their own.
    (tmp_path / "child.py").write_text(FLOWER_LIKE_CHILD)
    code = (
        "import subprocess, sys; from fedretrain.deploy.flower import supervise; "
        f"sys.exit(supervise(subprocess.Popen([sys.executable, {str(tmp_path / 'child.py')!r}, {str(tmp_path)!r}]), "
        "grace_s=2.0))"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert parent.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)

    # Execute: SIGTERM as systemd or Ctrl-C sends it (everyone), or to the supervisor alone.
    if to_group:
        os.killpg(parent.pid, signal.SIGTERM)
    else:
        parent.send_signal(signal.SIGTERM)

    # Assert: the child got one SIGTERM, finished leaving, and its code is the supervisor's.
    assert parent.wait(timeout=30) == 0
    assert (tmp_path / "left").read_text() == "graceful"


# --- superlink_command ----------------------------------------------------------------


def test_superlink_command_lists_the_missing_key_files_and_how_to_make_them(tmp_path):
    # Prepare: only the CA certificate is there.
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "ca.pem").touch()

    # Execute
    with pytest.raises(DeployError) as missing:
        superlink_command(Coordinator(tmp_path / "coord"), "127.0.0.1:9093", keys)

    # Assert
    message = str(missing.value)
    assert str((keys / "superlink.pem").resolve()) in message and str((keys / "superlink.key").resolve()) in message
    assert "ca.pem" not in message.split(": create")[0]
    assert f"fedretrain keys ca --out {keys}" in message
    assert f"fedretrain keys superlink --host NAME --ca-dir {keys} --out {keys}" in message


def test_superlink_command_with_tls_authenticates_nodes_and_keeps_a_database(tmp_path):
    # Prepare
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("ca.pem", "superlink.pem", "superlink.key"):
        (keys / name).touch()
    coord = Coordinator(tmp_path / "coord")

    # Execute
    argv = superlink_command(coord, "0.0.0.0:9093", keys)

    # Assert
    assert Path(argv[0]).name == "flower-superlink"
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("0.0.0.0", "9093")
    assert flag(argv, "--ssl-ca-certfile") == str((keys / "ca.pem").resolve())
    assert flag(argv, "--ssl-certfile") == str((keys / "superlink.pem").resolve())
    assert flag(argv, "--ssl-keyfile") == str((keys / "superlink.key").resolve())
    assert flag(argv, "--database") == str((tmp_path / "coord" / "state.db").resolve())
    assert "--enable-supernode-auth" in argv and "--disable-runtime-dependency-installation" in argv
    assert "--insecure" not in argv


def test_an_insecure_superlink_has_no_tls_and_no_node_authentication(tmp_path):
    argv = superlink_command(Coordinator(tmp_path), "127.0.0.1:9093", None)

    assert "--insecure" in argv
    assert "--enable-supernode-auth" not in argv and "--ssl-certfile" not in argv
    assert flag(argv, "--database") == str((tmp_path / "state.db").resolve())


def test_superlink_command_refuses_a_bad_address(tmp_path):
    with pytest.raises(DeployError, match="'nohost'"):
        superlink_command(Coordinator(tmp_path), "nohost", None)


# --- client.join ------------------------------------------------------------------------


def test_prepare_site_writes_a_node_config_that_flower_reads_back(tmp_path, data_dir):
    # Prepare: a state directory with a space in its name.
    state = tmp_path / "state dir"
    node_config = {
        "site-id": "site-a",
        "data-dir": str(data_dir),
        "epsilon-ceiling": 8.0,
        "delta": 1e-5,
        "device": "cpu",
        "accountant": "rdp",
        "smoke-eval": True,
        "state-dir": str(state),
    }

    # Execute
    site = prepare_site(node_config)
    parsed = parse_config_args([str(node_config_path(site))])

    # Assert: the file is where the SuperNode is told to look, and holds every setting,
    # the defaults included, with its type.
    assert node_config_path(site) == state / "node-config.toml"
    assert parsed == {
        "site-id": "site-a",
        "data-dir": str(data_dir),
        "epsilon-ceiling": 8.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "state-dir": str(state),
        "device": "cpu",
        "allow-non-private": False,
        "smoke-eval": True,
        "heldout-fraction": 0.2,
        "redact": False,
        "eval-noise": 4.0,
        "status-noise": 20.0,
        "status-interval-s": 3600.0,
        "eval-clip": 1.0,
        "share-evaluation": True,
        "share-drift-scores": False,
        "fit-sigma-to-ceiling": False,
        "allow-reproducible-noise": False,
        "require-secure-aggregation": False,
        "model-variant": "full",
    }
    assert site_config_from_node_config(parsed) == site


def test_prepare_site_makes_the_state_directory_private_under_umask_000(tmp_path, data_dir):
    # Prepare: a state directory (and its parent) that do not exist yet; the worst umask.
    state = tmp_path / "site" / "state"
    node_config = {
        "site-id": "site-a",
        "data-dir": str(data_dir),
        "epsilon-ceiling": 8.0,
        "delta": 1e-5,
        "state-dir": str(state),
    }
    previous = os.umask(0)
    try:
        # Execute
        prepare_site(node_config)
    finally:
        os.umask(previous)

    # Assert: the privacy ledger and installed models live below an owner-only directory.
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "site").stat().st_mode) == 0o700


def test_prepare_site_refuses_a_missing_data_dir(tmp_path):
    node_config = {"site-id": "site-a", "data-dir": str(tmp_path / "nowhere"), "epsilon-ceiling": 8.0, "delta": 1e-5}

    with pytest.raises(DeployError) as missing:
        prepare_site(node_config)

    assert str(tmp_path / "nowhere" / "train.jsonl") in str(missing.value)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("ceiling", [-1.0, 0.0, float("nan"), "eight"])
def test_prepare_site_refuses_a_bad_epsilon_ceiling_naming_it(data_dir, ceiling):
    node_config = {"site-id": "site-a", "data-dir": str(data_dir), "epsilon-ceiling": ceiling, "delta": 1e-5}

    with pytest.raises(ConfigError, match="epsilon-ceiling"):
        prepare_site(node_config)

    assert not (data_dir / ".fedretrain").exists()


def test_supernode_command_uses_tls_the_node_key_and_the_node_config(tmp_path, data_dir):
    # Prepare
    site = prepare_site({"site-id": "site-a", "data-dir": str(data_dir), "epsilon-ceiling": 8.0, "delta": 1e-5})
    ca, key = tmp_path / "ca.pem", tmp_path / "site-a.key"
    ca.touch()
    key.touch()

    # Execute
    argv = supernode_command(
        site, JoinSettings(superlink="coordinator.example.org:9093", ca=ca, key=key, port=9095, max_retries=3)
    )

    # Assert
    assert Path(argv[0]).name == "flower-supernode"
    assert flag(argv, "--superlink") == "coordinator.example.org:9093"
    assert flag(argv, "--root-certificates") == str(ca.resolve())
    assert flag(argv, "--auth-supernode-private-key") == str(key.resolve())
    assert flag(argv, "--node-config") == str((data_dir / ".fedretrain" / "node-config.toml").resolve())
    assert (flag(argv, "--port"), flag(argv, "--max-retries")) == ("9095", "3")
    assert "--insecure" not in argv


def test_supernode_command_refuses_a_missing_key_file_naming_the_flag(tmp_path, data_dir):
    site = prepare_site({"site-id": "site-a", "data-dir": str(data_dir), "epsilon-ceiling": 8.0, "delta": 1e-5})
    (tmp_path / "ca.pem").touch()

    with pytest.raises(DeployError) as missing:
        supernode_command(
            site, JoinSettings(superlink="h:9093", ca=tmp_path / "ca.pem", key=tmp_path / "site-a.key", port=9094)
        )

    assert str(missing.value) == f"--key: {tmp_path / 'site-a.key'} does not exist"


def test_supernode_command_refuses_a_bad_superlink_address(tmp_path, data_dir):
    site = prepare_site({"site-id": "site-a", "data-dir": str(data_dir), "epsilon-ceiling": 8.0, "delta": 1e-5})

    with pytest.raises(DeployError, match="'h:x'"):
        supernode_command(site, JoinSettings(superlink="h:x", ca=None, key=None, port=9094))


HOLD_CYCLE = """
import sys, time
from pathlib import Path
from server.cycle.rundir import cycle_lock
with cycle_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_cycle_resumes_as_soon_as_its_serverapp_is_gone_and_never_while_it_lives(tmp_path):
    # Prepare: a run directory, and a process holding it as a ServerApp running its cycle does.
    run_dir = tmp_path / "runs" / "20261204-120000-smoke"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: smoke\n")
    repo = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_CYCLE, str(run_dir)], cwd=repo, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"

        # Execute and assert: while it lives, no second ServerApp and no resume.
        assert cycle_running(run_dir)
        with pytest.raises(ResumeError, match="another ServerApp is running this cycle"):
            cycle_lock(run_dir).__enter__()
        with pytest.raises(DeployError, match="its ServerApp is still running this cycle"):
            submit_run(Coordinator(tmp_path / "coord"), [], resume=run_dir)
    finally:
        holder.kill()  # SIGKILL: as a crashed ServerApp ends
        holder.wait(timeout=30)

    # Once it is gone, at once (Flower would list its run as running for about a minute).
    assert not cycle_running(run_dir)
    with cycle_lock(run_dir):
        assert cycle_running(run_dir)
    assert not cycle_running(run_dir)


# --- the CLI's refusals -------------------------------------------------------------------


def site_join(data_dir, *extra: str) -> list[str]:
    """``fedretrain site join`` for site-a on 127.0.0.1, plus ``extra``."""
    return ["site", "join", "--superlink", "127.0.0.1:9093", "--data", str(data_dir), "--epsilon-ceiling", "8",
            "--site-id", "site-a", *extra]  # fmt: skip


@pytest.mark.usefixtures("no_processes", "cli_logging")
@pytest.mark.parametrize(
    "security",
    [[], ["--insecure", "--ca", "ca.pem"], ["--insecure", "--key", "a.key"]],
    ids=["neither", "insecure-and-ca", "insecure-and-key"],
)
def test_site_join_refuses_to_run_without_a_clear_security_choice(capsys, data_dir, security):
    # Execute
    code = main(site_join(data_dir, *security))

    # Assert
    assert code == 2
    assert "give --ca and --key" in capsys.readouterr().err


@pytest.mark.usefixtures("no_processes", "cli_logging")
@pytest.mark.parametrize("half", ["--ca", "--key"])
def test_site_join_refuses_only_half_of_tls_and_node_authentication(capsys, tmp_path, data_dir, half):
    # Prepare: the one file given exists, so nothing but the security check can refuse.
    path = tmp_path / "given.pem"
    path.touch()

    # Execute
    code = main(site_join(data_dir, half, str(path)))

    # Assert
    assert code == 2
    assert "give --ca and --key" in capsys.readouterr().err


@pytest.mark.usefixtures("no_processes", "cli_logging")
@pytest.mark.parametrize("seconds", ["0", "-5", "nan"])
def test_site_join_refuses_a_clientapp_watchdog_limit_that_is_not_positive(capsys, data_dir, seconds):
    code = main(site_join(data_dir, "--insecure", "--clientapp-stuck-after", seconds))

    assert code == 2
    assert "--clientapp-stuck-after: must be > 0 seconds" in capsys.readouterr().err


@pytest.mark.usefixtures("no_processes", "cli_logging")
def test_site_join_refuses_a_data_file_it_would_refuse_at_every_round(capsys, data_dir):
    # Prepare: a training file with a byte that is not UTF-8 on line 2.
    train = data_dir / "train.jsonl"
    lines = train.read_bytes().splitlines(keepends=True)
    train.write_bytes(lines[0] + b'{"text": "caf\xe9"}\n' + b"".join(lines[1:]))

    # Execute
    code = main(site_join(data_dir, "--insecure"))

    # Assert: refused before anything starts or is written, naming the file and the line.
    err = capsys.readouterr().err
    assert code == 2 and "train.jsonl" in err and ":2" in err and "nothing was started" in err, err
    assert not (data_dir / ".fedretrain").exists()


def test_site_join_takes_the_site_settings_file_and_the_flags_given_win(tmp_path, data_dir, monkeypatch):
    # Prepare: the site's settings file, with a relative data-dir and settings no flag sets.
    from cli.main import _parser
    from cli.site import _join_node_config

    monkeypatch.chdir(data_dir.parent)
    settings = tmp_path / "site.json"
    settings.write_text(
        json.dumps(
            {
                "site-id": "site-a",
                "data-dir": data_dir.name,
                "epsilon-ceiling": 16,
                "share-drift-scores": True,
                "status-noise": 30.0,
            }
        )
    )
    argv = ["site", "join", "--superlink", "127.0.0.1:9093", "--insecure", "--site-config", str(settings)]

    # Execute: the file alone, then with a lower ceiling on the command line.
    alone = _join_node_config(_parser().parse_args(argv))
    flagged = _join_node_config(_parser().parse_args([*argv, "--epsilon-ceiling", "4"]))

    # Assert: the file's keys, paths made absolute, defaults where neither says; the flag wins.
    site = site_config_from_node_config(alone)
    assert (site.data_dir, site.epsilon_ceiling, site.delta) == (str(data_dir.resolve()), 16, 1e-5)
    assert site.share_drift_scores and site.status_noise == 30.0 and not site.smoke_eval
    assert flagged["epsilon-ceiling"] == 4.0 and flagged["share-drift-scores"] is True


def test_site_join_flags_turn_a_files_opt_ins_off_and_null_is_unset(tmp_path, data_dir):
    # Prepare: a simulated site's site.json opts in to sharing drift scores; state-dir is null.
    from cli.main import _parser
    from cli.site import _disclosure, _join_node_config

    settings = tmp_path / "site.json"
    settings.write_text(
        json.dumps({"site-id": "site-a", "data-dir": str(data_dir), "epsilon-ceiling": 8, "share-drift-scores": True,
                    "smoke-eval": True, "state-dir": None})
    )  # fmt: skip
    argv = ["site", "join", "--superlink", "127.0.0.1:9093", "--insecure", "--site-config", str(settings)]

    # Execute
    as_filed = _join_node_config(_parser().parse_args(argv))
    turned_off = _join_node_config(_parser().parse_args([*argv, "--no-share-drift-scores", "--no-smoke-eval"]))

    # Assert: the file's opt-in is shown at join and a flag turns it off; null leaves the default state.
    assert "SHARED un-noised" in _disclosure(site_config_from_node_config(as_filed))
    assert "state-dir" not in as_filed
    assert site_config_from_node_config(as_filed).state_path == data_dir.resolve() / ".fedretrain"
    assert turned_off["share-drift-scores"] is False and turned_off["smoke-eval"] is False
    assert "kept at the site" in _disclosure(site_config_from_node_config(turned_off))


@pytest.mark.usefixtures("no_processes", "cli_logging")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"state-dir": ""}, "state-dir in {file}: must be a path, got ''"),
        ({"delta": 2.0}, "{file}: node-config.delta: must be in"),
    ],
    ids=["empty-path", "bad-value"],
)
def test_site_join_names_the_settings_file_of_a_bad_value(capsys, tmp_path, data_dir, extra, message):
    settings = tmp_path / "site.json"
    settings.write_text(json.dumps({"site-id": "site-a", "data-dir": str(data_dir), "epsilon-ceiling": 8, **extra}))

    code = main(["site", "join", "--superlink", "127.0.0.1:9093", "--insecure", "--site-config", str(settings)])

    assert code == 2
    assert message.format(file=settings) in capsys.readouterr().err


@pytest.mark.usefixtures("no_processes", "cli_logging")
def test_site_join_without_data_or_a_ceiling_names_the_flag_and_the_file(capsys, tmp_path):
    settings = tmp_path / "site.json"
    settings.write_text(json.dumps({"site-id": "site-a", "data-dir": str(tmp_path)}))

    code = main(["site", "join", "--superlink", "127.0.0.1:9093", "--insecure", "--site-config", str(settings)])

    assert code == 2
    assert f"give --epsilon-ceiling, or epsilon-ceiling in {settings}" in capsys.readouterr().err


@pytest.mark.usefixtures("cli_logging")
def test_a_joined_sites_node_config_toml_is_a_site_config_for_ingest(capsys, tmp_path, data_dir):
    # Prepare: the settings `site join` wrote into the site's state (node-config.toml), and new records.
    site = prepare_site({"site-id": "site-a", "data-dir": str(data_dir), "epsilon-ceiling": 8.0, "delta": 1e-5})
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps({"id": f"n{i}", "text": f"a new note {i}"}) + "\n" for i in range(3)))
    broken = tmp_path / "broken.toml"
    broken.write_text("site-id = \n")

    # Execute
    code = main(["site", "ingest", str(new), "--site-config", str(node_config_path(site))])
    bad = main(["site", "ingest", str(new), "--site-config", str(broken)])

    # Assert: stored at the joined site; a file that is not TOML is named.
    assert code == 0 and bad == 2
    out = capsys.readouterr()
    assert "3 stored" in out.out and f"{broken}: cannot read the site's config" in out.err


@pytest.mark.usefixtures("no_processes", "cli_logging")
def test_a_second_site_join_on_the_same_state_is_refused_before_it_writes(capsys, data_dir):
    # Prepare: a first join holds the state (as a running `site join` does) with its settings.
    first = {"site-id": "site-a", "data-dir": str(data_dir), "epsilon-ceiling": 8.0, "delta": 1e-5}
    with claim_state(check_site(first)):
        site = prepare_site(first)
        written = node_config_path(site).read_text()

        # Execute: a second join for the same data, with another ceiling.
        code = main(site_join(data_dir, "--insecure", "--epsilon-ceiling", "1"))

    # Assert: refused, naming the first; the first's node config is as it wrote it.
    assert code == 2
    assert f"another `site join` (pid {os.getpid()}) runs on this site's state" in capsys.readouterr().err
    assert node_config_path(site).read_text() == written


@pytest.mark.usefixtures("no_processes", "cli_logging")
@pytest.mark.parametrize("security", [[], ["--insecure", "--keys", "keys"]], ids=["neither", "both"])
def test_coordinator_start_refuses_without_exactly_one_of_keys_and_insecure(capsys, tmp_path, security):
    # Execute
    code = main(["coordinator", "start", "--dir", str(tmp_path / "coord"), *security])

    # Assert: refused before anything is written.
    assert code == 2
    assert "give --keys (TLS and node authentication) or --insecure" in capsys.readouterr().err
    assert not (tmp_path / "coord").exists()


# --- the ServerApp's run log ---------------------------------------------------------------


def test_run_log_keeps_fedretrains_and_flowers_lines_and_lets_go(tmp_path):
    with run_log(tmp_path / "run") as path:
        logging.getLogger("fedretrain.server").info("round 1: 2 train replies accepted")
        flwr_log(logging.WARNING, "round 1: reply from site site-01 (node 5) left out: because")
    logging.getLogger("fedretrain.server").warning("after the cycle")
    text = path.read_text()
    assert "INFO fedretrain.server: round 1: 2 train replies accepted" in text
    assert "WARNING flwr: round 1: reply from site site-01 (node 5) left out: because" in text
    assert "after the cycle" not in text


# --- the ClientApp watchdog ----------------------------------------------------------------


def _fake_clientapp() -> subprocess.Popen:
    # A process named like Flower's ClientApp (its command line says flwr-clientapp) that waits.
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "flwr-clientapp"])


def test_the_watchdog_stops_a_clientapp_that_never_got_its_message_and_spares_the_rest(tmp_path):
    import psutil

    # Prepare: three ClientApp processes below this one; `working` marked itself as its
    # ClientApp does when Flower hands it the message; a stale mark of a process long gone.
    stuck, working = _fake_clientapp(), _fake_clientapp()
    marks = tmp_path / "clientapps"
    marks.mkdir()
    (marks / str(working.pid)).write_text(f"{psutil.Process(working.pid).create_time()!r}\n")
    (marks / "999999999").write_text("1.0\n")
    try:
        # Execute: nothing is old enough at first; then everything is.
        young = ClientAppWatchdog(os.getpid(), tmp_path, stuck_after_s=3600).check()
        stopped = ClientAppWatchdog(os.getpid(), tmp_path, stuck_after_s=0).check()

        # Assert: only the unmarked one was stopped, by SIGTERM; the stale mark is gone.
        assert young == [] and stopped == [stuck.pid]
        assert stuck.wait(timeout=10) == -signal.SIGTERM
        assert working.poll() is None
        assert sorted(p.name for p in marks.iterdir()) == [str(working.pid)]
    finally:
        for proc in (stuck, working):
            proc.kill()
            proc.wait()


def test_a_mark_left_by_an_earlier_process_with_the_same_pid_does_not_count(tmp_path):
    stuck = _fake_clientapp()
    (tmp_path / "clientapps").mkdir()
    (tmp_path / "clientapps" / str(stuck.pid)).write_text("12345.0\n")  # another process's start time
    try:
        assert ClientAppWatchdog(os.getpid(), tmp_path, stuck_after_s=0).check() == [stuck.pid]
        assert stuck.wait(timeout=10) == -signal.SIGTERM
    finally:
        stuck.kill()
        stuck.wait()


def test_a_clientapp_marks_its_own_process(tmp_path):
    import psutil

    mark_clientapp(tmp_path)

    assert float((tmp_path / "clientapps" / str(os.getpid())).read_text()) == psutil.Process().create_time()

"""The coordinator on Flower's deployment engine: its SuperLink, its sites' keys, its runs.

``fedretrain coordinator start`` runs ``flower-superlink`` with TLS, SuperNode
authentication and a persistent database, then registers the sites' public keys;
``coordinator run`` submits a retraining cycle with ``flwr run`` (the app is this
project: ``server.app:app`` and ``client.app:app``); ``coordinator status`` lists the
sites and runs. Everything lives in one coordinator directory:

    <dir>/superlink.json   where the SuperLink listens and which CA signs it
    <dir>/state.db         Flower's database: nodes, runs, messages (survives a restart)
    <dir>/flwr/            FLWR_HOME of the SuperLink and of the flwr CLI (config.toml)
    <dir>/sites.json       site id -> node id and public key, as registered
    <dir>/runs/            run directories, unless output_dir says otherwise

The directory is 0700 and ``state.db`` 0600 whatever the umask: SQLite would create the
database 0644 (and its ``-wal``/``-shm`` files with the database's mode), so it is
created empty and private before ``flower-superlink`` opens it; Flower migrates an
empty database as a new one.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedretrain.atomic import atomic_write_json, atomic_write_text
from fedretrain.config import compose_config
from fedretrain.deploy.filemodes import PRIVATE_FILE, private_dir, private_file
from fedretrain.deploy.flower import (
    CONNECTION,
    ControlApi,
    flower_command,
    flower_env,
    run_flwr,
    split_address,
    toml_assignments,
    wait_for_port,
    write_connection,
)
from fedretrain.errors import DeployError
from fedretrain.modeling.embedded import EMBEDDED_NAME, embedded_model_dir
from server.cycle.rundir import cycle_running, new_run_dir

log = logging.getLogger("fedretrain.server")

# Overrides naming files on the coordinator: made absolute here, since the ServerApp
# runs in a process Flower starts, in a directory of Flower's choosing.
PATH_KEYS = ("registry.root", "registry.signing_key", "validation_path", "output_dir")


@dataclass(frozen=True)
class Coordinator:
    """A coordinator directory (see the module docstring)."""

    root: Path

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def database(self) -> Path:
        return self.root / "state.db"

    @property
    def sites_file(self) -> Path:
        return self.root / "sites.json"

    def settings(self) -> dict[str, Any]:
        path = self.root / "superlink.json"
        if not path.exists():
            raise DeployError(
                f"{path}: no SuperLink settings; start one with `fedretrain coordinator start --dir {self.root}`"
            )
        return json.loads(path.read_text())

    def sites(self) -> dict[str, dict[str, str]]:
        return json.loads(self.sites_file.read_text()) if self.sites_file.exists() else {}


def superlink_command(coord: Coordinator, address: str, keys: Path | None) -> list[str]:
    """``flower-superlink`` with TLS from ``keys`` (ca.pem, superlink.pem, superlink.key), node
    authentication and a database; ``keys=None`` runs it insecure (a test bench only)."""
    host, port = split_address(address)
    argv = [
        flower_command("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(coord.database.resolve()),
        # Apps run with what this environment has installed; nothing is fetched at run time.
        "--disable-runtime-dependency-installation",
    ]
    if keys is None:
        return [*argv, "--insecure"]
    files = {name: (keys / name).resolve() for name in ("ca.pem", "superlink.pem", "superlink.key")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise DeployError(
            f"missing {', '.join(missing)}: create them with `fedretrain keys ca --out {keys}` and "
            f"`fedretrain keys superlink --host NAME --ca-dir {keys} --out {keys}`"
        )
    return [
        *argv,
        "--ssl-ca-certfile",
        str(files["ca.pem"]),
        "--ssl-certfile",
        str(files["superlink.pem"]),
        "--ssl-keyfile",
        str(files["superlink.key"]),
        "--enable-supernode-auth",
    ]


def prepare_private_state(coord: Coordinator) -> None:
    """Make the coordinator directory 0700 and ``state.db`` (and any SQLite files beside it) 0600."""
    private_dir(coord.root)
    private_file(coord.database)
    for suffix in ("-wal", "-shm", "-journal"):  # left by an earlier SuperLink
        companion = coord.database.with_name(coord.database.name + suffix)
        if companion.exists():
            os.chmod(companion, PRIVATE_FILE)


def start_superlink(
    coord: Coordinator, address: str, keys: Path | None, *, connect: str | None = None, timeout_s: float = 60.0
) -> subprocess.Popen:
    """Start the SuperLink, wait until it answers, write the flwr CLI's connection; return the process.

    ``connect`` is the address the coordinator's own CLI uses (default: ``address``;
    with a wildcard bind such as 0.0.0.0, a name the certificate carries, e.g. 127.0.0.1).
    """
    argv = superlink_command(coord, address, keys)
    prepare_private_state(coord)
    connect = connect or address
    ca = (keys / "ca.pem").resolve() if keys is not None else None
    write_connection(coord.flwr_home, connect, ca)
    atomic_write_json(
        coord.root / "superlink.json",
        {"address": address, "connect": connect, "ca": str(ca) if ca else None, "insecure": keys is None},
    )
    proc = subprocess.Popen(argv, env=flower_env(coord.flwr_home), cwd=coord.root)
    host, port = split_address(connect)
    wait_for_port(host, port, timeout_s, proc)
    # The port opens before the Control API answers; a listing is the real readiness check.
    deadline = time.monotonic() + timeout_s
    with ControlApi(coord.flwr_home) as api:
        while True:
            try:
                api.nodes()
                return proc
            except DeployError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def register_site(coord: Coordinator, public_key: Path) -> str:
    """Register a site's public key (``flwr supernode register``); returns its node id.

    The site is named by the key file's stem (``keys site SITE_ID`` writes SITE_ID.pub).
    A key registered before is left as it is.
    """
    site_id = Path(public_key).stem
    sites = coord.sites()
    if site_id in sites:
        return sites[site_id]["node_id"]
    answer = run_flwr(coord.flwr_home, ["supernode", "register", str(Path(public_key).resolve()), CONNECTION])
    sites[site_id] = {"node_id": str(answer["node-id"]), "public_key": str(Path(public_key).resolve())}
    atomic_write_json(coord.sites_file, sites)
    log.info("registered site %s as node %s", site_id, answer["node-id"])
    return str(answer["node-id"])


def app_dir() -> Path:
    """The Flower app to submit: this project (its pyproject.toml names the apps)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise DeployError(
            f"{root}: no pyproject.toml; `coordinator run` submits the fedretrain project "
            "directory as its Flower app, so run it from a source checkout (pip install -e .)"
        )
    return root


def submit_run(
    coord: Coordinator,
    overrides: list[str],
    *,
    resume: Path | None = None,
    cwd: Path | None = None,
    run_dir: Path | None = None,
    train_nodes: list[int] | None = None,
) -> tuple[str, Path]:
    """Submit a cycle with ``flwr run``; returns (Flower run id, run directory).

    A fresh cycle's config is composed and checked here first (a bad key fails before
    anything is sent) and its run directory is created here (or ``run_dir`` is used);
    ``resume`` names the run directory of a cycle to continue from its last complete
    round, under its own config: at once after its ServerApp died (Flower may still list
    that run as running for a minute), refused while it lives. ``train_nodes`` limits training and evaluation to those
    nodes (the watch's eligible sites).
    """
    cwd = Path(cwd or Path.cwd())
    if resume is not None:
        if overrides:
            raise DeployError("--resume continues a cycle under the config it started with; drop the overrides")
        run_dir = Path(resume).resolve()
        if not (run_dir / "config.yaml").exists():
            raise DeployError(f"{run_dir}: not a run directory (no config.yaml)")
        if cycle_running(run_dir):
            raise DeployError(
                f"{run_dir}: its ServerApp is still running this cycle; resume it once that has stopped "
                "(`fedretrain coordinator status` lists the runs)"
            )
        values = {"experiment": "", "overrides": "", "run-dir": str(run_dir), "resume": True}
    else:
        overrides = absolute_paths(overrides, cwd, default_output=coord.root / "runs")
        cfg = compose_config(overrides)
        # The embedded model is built once, here, not in every app. Its directory is found without
        # importing torch, transformers and peft (about 4 s of CPU for a command that then waits).
        if cfg.model.name_or_path == EMBEDDED_NAME:
            embedded_model_dir()
        else:
            from fedretrain.modeling.loading import resolve_model_path  # torch: only for a model of one's own

            resolve_model_path(cfg.model.name_or_path)
        run_dir = (Path(run_dir) if run_dir else new_run_dir(Path(cfg.output_dir), cfg.name)).resolve()
        values = {"experiment": "", "overrides": shlex.join(overrides), "run-dir": str(run_dir), "resume": False}
    if train_nodes is not None:
        values["train-nodes"] = " ".join(str(n) for n in train_nodes)
    run_id = _flwr_run(coord, values, f"run-config-{run_dir.name}.toml")
    log.info("submitted Flower run %s; run directory %s", run_id, run_dir)
    return run_id, run_dir


def submit_poll(coord: Coordinator, overrides: list[str], poll_file: Path) -> str:
    """Submit a status poll with ``flwr run`` (the ServerApp in poll mode); returns the Flower run id.

    The ServerApp asks every site for its status and writes what came back to ``poll_file``.
    """
    values = {"experiment": "", "overrides": shlex.join(overrides), "mode": "poll", "poll-file": str(poll_file)}
    return _flwr_run(coord, values, "run-config-poll.toml")


def _flwr_run(coord: Coordinator, values: dict[str, Any], config_name: str) -> str:
    # The ServerApp binds each node to the site whose key it proved (server/sites/roster.py); an
    # insecure bench registers no keys and has no sites file.
    values["sites-file"] = str(coord.sites_file.resolve()) if coord.sites_file.exists() else ""
    run_config = coord.flwr_home / config_name
    atomic_write_text(run_config, toml_assignments(values))
    answer = run_flwr(
        coord.flwr_home, ["run", str(app_dir()), CONNECTION, "--run-config", str(run_config)], timeout_s=300
    )
    return str(answer["run-id"])


def absolute_paths(overrides: list[str], cwd: Path, default_output: Path) -> list[str]:
    """``overrides`` with the coordinator's file paths made absolute, and an output_dir."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+") in PATH_KEYS and value and value != "null" and not Path(value).is_absolute():
            item = f"{key}={(cwd / value).resolve()}"
        out.append(item)
    if not any(item.partition("=")[0].lstrip("+") == "output_dir" for item in out):
        out.append(f"output_dir={default_output.resolve()}")
    return out


def run_status(coord: Coordinator, run_id: str, api: ControlApi | None = None) -> str:
    """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
    if api is None:
        with ControlApi(coord.flwr_home) as api:
            return run_status(coord, run_id, api)
    return str(api.runs(run_id)[0]["status"])


def wait_for_run(
    coord: Coordinator,
    run_id: str,
    timeout_s: float,
    poll_s: float = 2.0,
    sleep: Callable[[float], object] = time.sleep,
) -> str:
    """Poll until the run finishes; returns its final status (DeployError after ``timeout_s``).

    ``sleep`` waits between checks (a service passes one that raises when it is stopped).
    Each check is one request on one Control API client (see ``ControlApi``).
    """
    deadline = time.monotonic() + timeout_s
    with ControlApi(coord.flwr_home) as api:
        while time.monotonic() < deadline:
            status = run_status(coord, run_id, api)
            if status.startswith("finished"):
                return status
            sleep(poll_s)
    raise DeployError(f"run {run_id} did not finish within {timeout_s:.0f} s (`fedretrain coordinator status`)")


def status(coord: Coordinator) -> dict[str, Any]:
    """The registered sites with their connection state, and the runs with theirs."""
    with ControlApi(coord.flwr_home) as api:
        nodes = {n["node-id"]: n for n in api.nodes()}
        runs = [{"run_id": r["run-id"], "status": r["status"], "elapsed": r["elapsed"]} for r in api.runs()]
    sites = {
        site: {"node_id": info["node_id"], "status": nodes.get(info["node_id"], {}).get("status", "unknown")}
        for site, info in sorted(coord.sites().items())
    }
    return {"superlink": coord.settings()["address"], "sites": sites, "runs": runs, "watch": watch_status(coord)}


def watch_status(coord: Coordinator) -> dict[str, Any] | None:
    """What the standing watch (``coordinator watch --dir``) said it was doing last, and whether it runs."""
    path = coord.root / "watch.json"
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return {"phase": f"unreadable ({err})", "running": False}
    pid = report.get("pid")
    report["running"] = report.get("phase") != "stopped" and isinstance(pid, int) and _alive(pid)
    return report


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

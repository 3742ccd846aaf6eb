"""Running Flower's own deployment commands for both sides.

fedretrain adds no protocol of its own: the coordinator runs ``flower-superlink`` and
talks to it with the ``flwr`` CLI (``flwr run``, ``flwr supernode register``) and, for the
questions it asks again and again (which runs are finished, which nodes are online), with
the same Control API client the CLI builds, in its own process (``ControlApi``); a site
runs ``flower-supernode``. This module finds those commands beside the running
interpreter, gives each process a private ``FLWR_HOME`` (where Flower keeps its connection
config and installed apps), writes the ``flwr`` CLI's connection config, and runs the CLI
with ``--format json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedretrain.atomic import atomic_write_text
from fedretrain.errors import DeployError

CONNECTION = "fedretrain"  # the name of the SuperLink connection in the flwr CLI's config


def flower_command(name: str) -> str:
    """The path of Flower's ``name`` command installed beside this interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DeployError(
            f"{name}: not found beside {sys.executable}; install fedretrain's dependencies (flwr) into this environment"
        )
    return str(path)


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: a private FLWR_HOME, and this environment's
    commands first on PATH (the SuperLink and SuperNode start ``flower-superexec`` by name)."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> Path:
    """Write the flwr CLI's config: one SuperLink connection, TLS with ``root_certificates``
    (None: insecure, for a test bench only)."""
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f"address = {json.dumps(address)}",
    ]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    path = Path(flwr_home) / "config.toml"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def toml_assignments(values: Mapping[str, Any]) -> str:
    """``key = value`` lines (TOML) for a flat mapping of str, bool, int and float values."""
    out = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            # A TOML basic string is a JSON string, as long as characters beyond the basic
            # plane stay themselves (JSON's surrogate-pair escapes are not valid TOML).
            text = json.dumps(str(value), ensure_ascii=False)
        out.append(f"{json.dumps(key)} = {text}")
    return "\n".join(out) + "\n"


def run_flwr(flwr_home: Path, args: Sequence[str], *, timeout_s: float = 120.0, cwd: Path | None = None) -> dict:
    """Run ``flwr ARGS --format json`` with ``flwr_home``; return its JSON answer.

    Raises
    ------
    DeployError
        The command failed, timed out, or did not answer ``success: true``; the message
        carries Flower's own words.
    """
    argv = [flower_command("flwr"), *args, "--format", "json"]
    try:
        proc = subprocess.run(
            argv, env=flower_env(flwr_home), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise DeployError(f"flwr {' '.join(args[:2])}: no answer within {timeout_s:.0f} s") from None
    answer = _json_tail(proc.stdout)
    if proc.returncode != 0 or not answer.get("success", False):
        detail = answer.get("error-message") or (proc.stderr or proc.stdout).strip()[-800:]
        raise DeployError(f"flwr {' '.join(args[:2])} failed: {detail}")
    return answer


class ControlApi:
    """The SuperLink's Control API, asked from this process: Flower's own client and answers.

    ``flwr ls`` and ``flwr supernode ls`` ask the same questions, but each is a new
    interpreter that imports Flower's CLI: 1.2-1.5 s of CPU per question. A run waited on
    with a check every 2 s kept most of a core busy, and in the test suite those processes
    were a fifth of the slow tier's CPU (414 of 1,992 core-seconds, every process's CPU
    sampled each second). So the one piece replaced is the process: the client is the one
    ``flwr ls`` builds (``init_http_client_from_connection`` on the connection it reads
    from ``FLWR_HOME``), built once, and each question is one request to the SuperLink.
    Runs and nodes come back as ``flwr ls --format json`` and ``flwr supernode ls --format
    json`` list them (``run-id``, ``status``, ``elapsed``; ``node-id``, ``status``).

    Raises
    ------
    DeployError
        The connection config cannot be read, or the SuperLink does not answer; the message
        carries Flower's own words.
    """

    def __init__(self, flwr_home: Path) -> None:
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        try:
            # Flower reads FLWR_HOME from the environment at call time, and prints the
            # connection it uses for a person at a terminal: neither is this process's.
            with _environment("FLWR_HOME", str(Path(flwr_home).resolve())), contextlib.redirect_stdout(io.StringIO()):
                self._client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
        except Exception as err:  # click's, httpx's and Flower's own errors alike
            raise DeployError(f"the SuperLink's Control API ({flwr_home}): {_flower_words(err)}") from None

    def runs(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """The SuperLink's runs (or the one ``run_id``), as ``flwr ls --format json`` lists them."""
        from flwr.cli.ls import _to_json
        from flwr.cli.run_utils import format_runs
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest

        request = ListRunsRequest(run_id=int(run_id)) if run_id is not None else ListRunsRequest()
        res = self._ask("ls", lambda: self._client.ListRuns(request))
        answer = json.loads(_to_json(format_runs([run_from_proto(p) for p in res.run_dict.values()], res.now)))
        if run_id is not None and not answer["runs"]:
            raise DeployError(f"flwr ls: the SuperLink has no run {run_id}")
        return list(answer["runs"])

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's nodes (deleted ones left out), as ``flwr supernode ls --format json`` lists them."""
        from flwr.cli.supernode.ls import _format_nodes, _to_json
        from flwr.proto.control_pb2 import ListNodesRequest

        res = self._ask("supernode ls", lambda: self._client.ListNodes(ListNodesRequest()))
        return list(json.loads(_to_json(_format_nodes(list(res.nodes_info), res.now), verbose=False))["nodes"])

    def _ask(self, what: str, request: Any) -> Any:
        from flwr.cli.utils import flwr_cli_exc_handler

        try:
            with flwr_cli_exc_handler():  # Flower's words for its API errors and a SuperLink that is away
                return request()
        except Exception as err:
            raise DeployError(f"flwr {what} failed: {_flower_words(err)}") from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flower_words(err: BaseException) -> str:
    message = getattr(err, "message", None) or str(err) or type(err).__name__
    return str(message).strip()[-800:]


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _json_tail(stdout: str) -> dict:
    # flwr prints one JSON object, sometimes after notices of its own.
    start = stdout.find("{")
    if start < 0:
        return {}
    try:
        answer = json.loads(stdout[start:])
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Return once ``host:port`` accepts TCP connections; DeployError after ``timeout_s`` or if
    ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"the process exited with code {proc.returncode} before {host}:{port} was up")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise DeployError(f"{host}:{port} did not accept connections within {timeout_s:.0f} s")


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port); DeployError naming a bad one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"{address!r}: expected HOST:PORT, e.g. coordinator.example.org:9093")
    return host.strip("[]"), int(port)


# How long a child has to act on a signal that reached it too before it is passed on.
FORWARD_GRACE_S = 5.0


def supervise(proc: subprocess.Popen, grace_s: float = FORWARD_GRACE_S) -> int:
    """Wait for ``proc``; SIGINT and SIGTERM to this process stop it gracefully. Returns its code.

    A signal meant for the whole group (Ctrl-C at a terminal, systemd stopping the unit,
    ``kill -- -PGID``) reaches the child too, and Flower's processes restore the default
    action after their first SIGINT or SIGTERM: a second copy from here killed the SuperNode
    in the middle of its graceful exit, before it told the SuperLink it leaves, so the site
    stayed listed online (and could not rejoin, Flower's code 2004) until its heartbeats
    lapsed, a minute later. So the signal is passed on only to a child still running
    ``grace_s`` after it arrived here.
    """

    def pass_on(signum: int) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
            return
        if proc.poll() is None:
            proc.send_signal(signum)

    def forward(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            threading.Thread(target=pass_on, args=(signum,), daemon=True).start()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

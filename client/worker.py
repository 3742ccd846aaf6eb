"""The site worker: one long-lived process per site that answers the site's messages with
its libraries, model and privacy caches kept loaded.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message a SuperNode gets,
and that process would import torch, transformers, peft and opacus, load the model and
re-run opacus' noise search before doing any work: about 7 s of imports (18 s under load)
and 3-8 s of search per message at a site, measured on 2 cores. ``fedretrain site join``
starts this worker beside the SuperNode instead; the ClientApp Flower starts for a message
only forwards it here over a Unix socket and passes the answer back (client/app.py).

What answers is the code the site installed (the worker runs the Python that runs
``site join``), never the app bundle the coordinator sent: the bundle's ClientApp only
forwards. The worker answers one message at a time, in arrival order, so the ledger's
lock, the kept replies and the model store work as they do in a single ClientApp process.

Where it listens: a socket in a new 0700 directory under the system's temp dir (a site's
state path may be too long for a socket's 107 bytes), named in ``<state>/worker.json``
(0600, in the site's 0700 state directory), which the ClientApp reads.

On the wire, per message: a 4-byte length and a JSON header (the message type; in the
answer, ``ok`` or the error's code and reason), then an 8-byte length and the content as
Flower's own protobuf RecordDict. Nothing either side sends is executed or unpickled.

    python -m client.worker --node-config <state>/node-config.toml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from fedretrain.atomic import atomic_write_json
from fedretrain.config import SiteConfig, site_config_from_node_config
from fedretrain.errors import DeployError

log = logging.getLogger("fedretrain.client")

MAX_HEADER = 64 * 1024
MAX_BODY = 4 * 1024**3  # a 1-8 B model's LoRA update is tens of MB; 4 GiB refuses only nonsense


def address_path(state_path: Path) -> Path:
    """Where the running worker says where it listens."""
    return Path(state_path) / "worker.json"


@dataclass(frozen=True)
class WorkerAddress:
    socket: Path
    pid: int

    @classmethod
    def read(cls, state_path: Path) -> WorkerAddress | None:
        """The running worker's address, or None when the site runs no worker."""
        path = address_path(state_path)
        try:
            raw = json.loads(path.read_text())
            return cls(socket=Path(raw["socket"]), pid=int(raw["pid"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DeployError(f"{path}: not a worker address ({err}); `site join` rewrites it") from None


class WorkerUnavailable(Exception):
    """The worker could not be reached, or ended before it answered."""


# --- the wire --------------------------------------------------------------------------------


def _send(sock: socket.socket, header: dict[str, Any], content: RecordDict | None) -> None:
    from flwr.common.serde import recorddict_to_proto

    head = json.dumps(header).encode()
    body = b"" if content is None else recorddict_to_proto(content).SerializeToString()
    sock.sendall(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(body)))
    sock.sendall(body)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], RecordDict | None]:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    (head_len,) = struct.unpack(">I", _exactly(sock, 4))
    if head_len > MAX_HEADER:
        raise ValueError(f"header of {head_len} bytes (at most {MAX_HEADER})")
    header = json.loads(_exactly(sock, head_len))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    (body_len,) = struct.unpack(">Q", _exactly(sock, 8))
    if body_len > MAX_BODY:
        raise ValueError(f"content of {body_len} bytes (at most {MAX_BODY})")
    if not body_len:
        return header, None
    return header, recorddict_from_proto(ProtoRecordDict.FromString(_exactly(sock, body_len)))


def _exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# --- the ClientApp's side --------------------------------------------------------------------


def ask(address: WorkerAddress, message_type: str, content: RecordDict) -> RecordDict | tuple[int, str]:
    """The worker's answer: the reply content, or an error reply's (code, reason).

    Raises :class:`WorkerUnavailable` when the worker is not listening or ends before it
    answers (its log says why; ``site join`` starts a new one).
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(address.socket))
            _send(sock, {"type": message_type}, content)
            header, reply = _recv(sock)
    except (OSError, EOFError, ValueError) as err:
        raise WorkerUnavailable(f"the site worker (pid {address.pid}) did not answer: {err}") from err
    if header.get("ok") and reply is not None:
        return reply
    return int(header.get("code", 0)), str(header.get("reason", "the site worker gave no reason"))


# --- the worker's side -----------------------------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        from client.handlers import answer, refusal

        try:
            header, content = _recv(self.request)
        except (OSError, EOFError, ValueError) as err:
            log.warning("site worker: a malformed request was dropped (%s)", err)
            return
        message_type = str(header.get("type", ""))
        start = time.perf_counter()
        try:
            if content is None:
                raise ValueError("a message without content")
            reply = answer(self.server.site, message_type, content)
            out: tuple[dict[str, Any], RecordDict | None] = ({"ok": True}, reply)
        except Exception as err:  # noqa: BLE001 - the site must answer, not vanish, on a bug
            code, reason = refusal(message_type, err)
            out = ({"ok": False, "code": code, "reason": reason}, None)
        log.info("site worker: %s answered in %.1f s", message_type, time.perf_counter() - start)
        try:
            _send(self.request, *out)
        except OSError as err:  # the ClientApp went away (its deadline, a stop); the state is saved
            log.warning("site worker: the answer to %s could not be sent (%s)", message_type, err)


class _Server(socketserver.UnixStreamServer):
    def __init__(self, path: str, site: SiteConfig) -> None:
        self.site = site
        super().__init__(path, _Handler)


def serve(site: SiteConfig, parent_pid: int | None = None) -> None:
    """Answer the site's messages until SIGTERM or SIGINT, or until ``parent_pid`` (``site
    join``) is gone; the message in hand is finished first."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        # From another thread: Event.set here could wait on a lock this thread holds.
        threading.Thread(target=stop.set, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    import client.handlers  # noqa: F401 - the libraries load now, not at the first message

    if stop.is_set():
        return
    # 0700, created by this user; in the user's runtime directory where there is one (no
    # tmp cleaner removes a socket from it while the worker runs).
    directory = Path(tempfile.mkdtemp(prefix="fr-site-", dir=os.environ.get("XDG_RUNTIME_DIR") or None))
    server = _Server(str(directory / "worker.sock"), site)
    thread = threading.Thread(target=server.serve_forever, name="site-worker", daemon=True)
    thread.start()
    if parent_pid is not None:
        threading.Thread(target=_stop_when_orphaned, args=(parent_pid, stop), daemon=True).start()
    atomic_write_json(address_path(site.state_path), {"socket": str(directory / "worker.sock"), "pid": os.getpid()})
    log.info("site worker for %s ready (pid %d)", site.site_id, os.getpid())
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        _forget_address(site.state_path, os.getpid())
        shutil.rmtree(directory, ignore_errors=True)


def _stop_when_orphaned(parent_pid: int, stop: threading.Event) -> None:
    # `site join` killed outright (SIGKILL, OOM) cannot stop its worker: the worker sees its
    # parent change and stops itself.
    while not stop.wait(2.0):
        if os.getppid() != parent_pid:
            log.warning("site worker: site join (pid %d) is gone; stopping", parent_pid)
            stop.set()


def _forget_address(state_path: Path, pid: int) -> None:
    # Only this worker's own address: a successor may already have written its own.
    try:
        address = WorkerAddress.read(state_path)
    except DeployError:
        return
    if address is not None and address.pid == pid:
        address_path(state_path).unlink(missing_ok=True)


def read_node_config(path: Path) -> SiteConfig:
    """The site's settings from the node config file ``site join`` wrote."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise DeployError(f"{path}: cannot read the node config ({err})") from None
    return site_config_from_node_config(raw)


# --- run by `site join` ----------------------------------------------------------------------


class WorkerProcess:
    """The site worker as a child of ``site join``: started, waited for, restarted when it dies."""

    def __init__(
        self,
        site: SiteConfig,
        node_config: Path,
        ready_timeout_s: float = 300.0,
        output: Any = None,
        stop_grace_s: float = 300.0,
    ) -> None:
        self.stop_grace_s = stop_grace_s  # how long a stop waits for the message in hand
        self.site = site
        self.output = output  # the worker's stdout and stderr (default: this process's)
        self.node_config = node_config
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker and wait until it listens (raises DeployError if it does not)."""
        address_path(self.site.state_path).unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-P",  # not this directory first: the installed code (and PYTHONPATH) only
                "-m",
                "client.worker",
                "--node-config",
                str(self.node_config),
                "--parent-pid",
                str(os.getpid()),
            ],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            stdout=self.output,
            stderr=self.output,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            address = WorkerAddress.read(self.site.state_path)
            if address is not None and address.pid == self.proc.pid:
                return
            if self._stop.is_set():  # site join is stopping: stop() ends this one
                return
            if self.proc.poll() is not None:
                raise DeployError(f"the site worker exited with code {self.proc.returncode} before it was ready")
            time.sleep(0.2)
        self.proc.kill()
        raise DeployError(f"the site worker was not ready after {self.ready_timeout_s:.0f} s")

    def keep_running(self, interval_s: float = 2.0) -> None:
        """Restart the worker whenever it exits, until :meth:`stop` (a daemon thread)."""

        def watch() -> None:
            while not self._stop.wait(interval_s):
                if self.proc is not None and self.proc.poll() is not None:
                    log.error("the site worker exited with code %s; starting a new one", self.proc.returncode)
                    try:
                        self.start()
                    except DeployError as err:
                        log.error("%s; trying again in 10 s", err)
                        self._stop.wait(10)

        self._thread = threading.Thread(target=watch, name="site-worker-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """SIGTERM (the message in hand is finished), SIGKILL after ``stop_grace_s``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(self.stop_grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _forget_address(self.site.state_path, self.proc.pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A site's worker (started by `fedretrain site join`).")
    parser.add_argument("--node-config", type=Path, required=True, help="the node config file site join wrote")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (site join) is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        site = read_node_config(args.node_config)
    except DeployError as err:
        print(f"fedretrain site worker: {err}", file=sys.stderr)
        return 2
    serve(site, args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())

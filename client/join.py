"""A site joins a federation: its SuperNode, with the site's own settings as node config.

``fedretrain site join`` runs Flower's ``flower-supernode``: TLS to the coordinator's
SuperLink, checked against the federation's CA, and the site's private key proving
which registered site it is. The site's settings (data, privacy ceiling, the pinned
coordinator key, ...) are checked here first, then handed to the SuperNode as its
node config, the only place the ClientApp reads them from (fedretrain/config/site.py):
the coordinator can neither see nor change them.

    <state-dir>/node-config.toml   the node config, as the SuperNode reads it
    <state-dir>/flwr/              the SuperNode's FLWR_HOME (the apps it was sent)
    <state-dir>/clientapps/        one mark per ClientApp process that got its message
    <state-dir>/join.lock          held by the one ``site join`` that runs on this state
    <state-dir>/worker.json        where the site worker listens (client/worker.py)

While the SuperNode runs, a watchdog stops ClientApp processes stuck waiting for a
message that will never arrive (see :class:`ClientAppWatchdog`).

The state directory is made 0700 whatever the umask: it holds the privacy ledger and
the installed models.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedretrain.atomic import atomic_write_text, lock_held
from fedretrain.config import SiteConfig, site_config_from_node_config
from fedretrain.deploy.filemodes import private_dir
from fedretrain.deploy.flower import flower_command, flower_env, split_address, toml_assignments
from fedretrain.errors import DeployError

log = logging.getLogger("fedretrain.client")


@dataclass(frozen=True)
class JoinSettings:
    """How a site reaches its coordinator."""

    superlink: str  # HOST:PORT of the SuperLink's Fleet API
    ca: Path | None  # the federation's CA certificate; None: insecure (test benches only)
    key: Path | None  # the site's private node key; None: no node authentication
    port: int  # this SuperNode's local Runtime API port (one per SuperNode on a host)
    max_retries: int | None = None


def check_site(node_config: dict[str, Any]) -> SiteConfig:
    """The site's settings, checked (an error names the key); its data must be there."""
    site = site_config_from_node_config(node_config)
    if not site.train_path.exists():
        raise DeployError(
            f"{site.train_path}: the site's data is missing (data-dir must hold train.jsonl "
            "and heldout.jsonl, or .csv with a text column)"
        )
    return site


def prepare_site(node_config: dict[str, Any]) -> SiteConfig:
    """Check the site's settings and write its node config file."""
    site = check_site(node_config)
    private_dir(site.state_path)
    atomic_write_text(node_config_path(site), toml_assignments(site.to_node_config()))
    return site


@contextlib.contextmanager
def claim_state(site: SiteConfig) -> Iterator[int]:
    """Hold the site's state directory for this ``site join`` (a second one is refused);
    yields the lock's file descriptor.

    Two SuperNodes on one state would each start a worker and take each other's address,
    and answer for one site twice: the lock (``flock``, released by the kernel when every
    process holding it has ended, however it ended) makes the second fail at once, naming
    the first. The SuperNode inherits the descriptor, so a SuperNode left running by a
    ``site join`` killed outright still holds the state.
    """
    private_dir(site.state_path)
    path = site.state_path / "join.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise DeployError(
                f"{site.state_path}: another `site join` (pid {holder}) runs on this site's state; "
                "stop it first, or give this one its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def node_config_path(site: SiteConfig) -> Path:
    return site.state_path / "node-config.toml"


def supernode_command(site: SiteConfig, join: JoinSettings) -> list[str]:
    """``flower-supernode`` for this site."""
    split_address(join.superlink)  # a bad address fails here, naming it
    argv = [
        flower_command("flower-supernode"),
        "--superlink",
        join.superlink,
        "--node-config",
        str(node_config_path(site).resolve()),
        "--port",
        str(join.port),
    ]
    if join.ca is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(_existing(join.ca, "--ca").resolve())]
    if join.key is not None:
        argv += ["--auth-supernode-private-key", str(_existing(join.key, "--key").resolve())]
    if join.max_retries is not None:
        argv += ["--max-retries", str(join.max_retries)]
    return argv


def start_supernode(site: SiteConfig, join: JoinSettings, state_lock: int | None = None) -> subprocess.Popen:
    """Start the site's SuperNode (its FLWR_HOME below the site's state directory); it
    inherits ``state_lock`` (:func:`claim_state`)."""
    argv = supernode_command(site, join)
    log.info("site %s joining %s", site.site_id, join.superlink)
    return subprocess.Popen(
        argv,
        env=flower_env(site.state_path / "flwr"),
        cwd=site.state_path,
        pass_fds=() if state_lock is None else (state_lock,),
    )


def join_running(site: SiteConfig) -> bool:
    """Whether a ``site join`` (or the SuperNode it started) holds this site's state."""
    return lock_held(site.state_path / "join.lock")


def _existing(path: Path, flag: str) -> Path:
    if not Path(path).is_file():
        raise DeployError(f"{flag}: {path} does not exist")
    return Path(path)


# --- ClientApp processes stuck before their message arrives ---------------------------------
#
# Flower 1.41 starts one `flwr-clientapp` process per message. It first pulls the message
# and every object in it (the adapter's arrays) from the SuperNode, retrying without a
# limit (`run_clientapp.pull_task_input` -> `inflatable_utils.pull_objects`). When the
# ServerApp dies while it is still pushing a message (a crash mid-send), the objects never
# come: the process waits for ever (~130 MB) and our ClientApp code never runs. SIGTERM
# ends it within seconds, but Flower's SuperExec starts its children with a bare
# `subprocess.Popen` and never waits for them, so the dead process lingers as a zombie
# (no memory, no CPU, deaf to signals: what looks like a process ignoring SIGTERM) until
# the SuperExec starts its next ClientApp or stops.

CLIENTAPP = "flwr-clientapp"


def clientapp_marks(state_path: Path) -> Path:
    return Path(state_path) / "clientapps"


def mark_clientapp(state_path: Path) -> None:
    """Record that this ClientApp process got its message (called by the site's ClientApp)."""
    import psutil

    me = psutil.Process()
    atomic_write_text(clientapp_marks(state_path) / str(me.pid), f"{me.create_time()!r}\n")


class ClientAppWatchdog:
    """Stops (SIGTERM) the SuperNode's ClientApp processes still waiting for their message.

    A ``flwr-clientapp`` process below ``root_pid`` older than ``stuck_after_s`` that has
    not marked itself (:func:`mark_clientapp`, the site's ClientApp does it as soon as
    Flower hands it the message) never got its message. Marks of processes that are gone
    are removed. One check every ``interval_s``, in a daemon thread.
    """

    def __init__(self, root_pid: int, state_path: Path, stuck_after_s: float, interval_s: float = 15.0) -> None:
        self.root_pid = root_pid
        self.marks = clientapp_marks(state_path)
        self.stuck_after_s = stuck_after_s
        self.interval_s = interval_s
        self._stop = threading.Event()

    def check(self) -> list[int]:
        """One pass: the pids stopped."""
        import psutil

        try:
            processes = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            return []
        stopped = []
        for proc in processes:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE or CLIENTAPP not in " ".join(proc.cmdline()):
                    continue
                started = proc.create_time()
                if time.time() - started < self.stuck_after_s or self._marked(proc.pid, started):
                    continue
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:  # it ended meanwhile
                continue
            log.warning(
                "ClientApp process %d got no message in %.0f s (its ServerApp died while sending it); stopped",
                proc.pid,
                time.time() - started,
            )
            stopped.append(proc.pid)
        self._forget()
        return stopped

    def start(self) -> None:
        threading.Thread(target=self._run, name="clientapp-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def _marked(self, pid: int, started: float) -> bool:
        try:
            return float((self.marks / str(pid)).read_text()) == started
        except (OSError, ValueError):
            return False

    def _forget(self) -> None:
        import psutil

        if self.marks.is_dir():
            for mark in self.marks.iterdir():
                if not (mark.name.isdigit() and psutil.pid_exists(int(mark.name))):
                    with contextlib.suppress(OSError):
                        mark.unlink()

"""The cycle's own export (``tracking.*``): each round as its metrics.jsonl line is written, and
the gate, the version and the champion when summary.json is.

The cycle never waits on a tracker and never fails for one. Each write of the run's files
(server/cycle/report.py calls :meth:`LiveExport.notify`) wakes a thread of its own, which
reads the files back and exports them as ``fedretrain export`` does; notices that arrive
while it exports make one more export, not one each. An export that fails is a warning with
the command that redoes it; the next notice tries again. At the end of the cycle
:meth:`LiveExport.close` waits up to ``tracking.timeout_s`` for the last export, then leaves
it behind (a daemon thread: it ends with the process).
"""

from __future__ import annotations

import logging
import shlex
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedretrain.config.schema import TrackingConfig
from server.tracking.export import Targets, export_run
from server.tracking.runfiles import read_run
from server.tracking.to_mlflow import LiveState, shown

log = logging.getLogger("fedretrain.server")


class LiveExport:
    """Exports one cycle's run directory in the background while the cycle runs.

    Parameters
    ----------
    targets : Targets
        Where to.
    run_dir : Path
        The cycle's run directory.
    public_key : Ed25519PublicKey
        The coordinator's key (its signing key's public half): the champion alias follows
        the chain it verifies.
    run_id : str
        The cycle's run id, a tag before summary.json names it.
    timeout_s : float
        How long :meth:`close` waits for the last export.
    """

    def __init__(
        self, targets: Targets, run_dir: Path, public_key: Ed25519PublicKey, run_id: str, timeout_s: float
    ) -> None:
        self.targets, self.run_dir, self.public_key, self.run_id = targets, Path(run_dir), public_key, run_id
        self.timeout_s = timeout_s
        self._wake = threading.Event()
        self._closing = self._crashed = False
        self._thread: threading.Thread | None = None
        self._last_failure: str | None = None

    @classmethod
    def from_config(
        cls, cfg: TrackingConfig, run_dir: Path, public_key: Ed25519PublicKey, run_id: str
    ) -> LiveExport | None:
        """The cycle's export as ``tracking.*`` sets it, or None when both targets are off."""
        if not cfg.enabled:
            return None
        targets = Targets(
            mlflow_uri=cfg.mlflow_uri,
            tensorboard_dir=None if cfg.tensorboard_dir is None else Path(cfg.tensorboard_dir),
            experiment=cfg.experiment,
            model_name=cfg.model_name,
        )
        return cls(targets, run_dir, public_key, run_id, cfg.timeout_s)

    def notify(self) -> None:
        """The run's files changed: export them soon (the first notice starts the thread)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="fedretrain-tracking", daemon=True)
            self._thread.start()
            log.info("tracking: exporting this cycle as it goes (%s)", self._where())
        self._wake.set()

    def close(self, *, crashed: bool = False) -> None:
        """Export once more, and wait for it up to ``timeout_s``; ``crashed``: the cycle ended
        with an error, before its summary (MLflow then marks the run FAILED)."""
        if self._thread is None:
            return
        self._crashed, self._closing = crashed, True
        self._wake.set()
        self._thread.join(self.timeout_s)
        if self._thread.is_alive():
            log.warning(
                "tracking: the export did not finish within %g s (tracking.timeout_s) and is left behind; "
                "the run directory keeps everything, and this redoes it: %s",
                self.timeout_s,
                self.redo_command(),
            )

    def redo_command(self) -> str:
        """The ``fedretrain export`` command that exports this run again."""
        parts = ["fedretrain", "export", "--run", str(self.run_dir)]
        if self.targets.mlflow_uri is not None:
            parts += ["--mlflow-uri", shown(self.targets.mlflow_uri)]
        if self.targets.tensorboard_dir is not None:
            parts += ["--tensorboard", str(self.targets.tensorboard_dir)]
        return shlex.join(parts)

    def _work(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            final = self._closing
            self._export(crashed=final and self._crashed)
            if final:
                return

    def _export(self, *, crashed: bool) -> None:
        try:
            live = LiveState(self.run_id, crashed=crashed)
            export_run(read_run(self.run_dir), self.targets, self.public_key, live=live)
        except Exception as err:  # whatever a tracker does, the cycle goes on: its files are the record
            message = str(err) or type(err).__name__
            if message != self._last_failure:  # once per distinct failure, not once per round
                log.warning(
                    "tracking: export failed, the cycle goes on (its run directory keeps everything; "
                    "this redoes it: %s): %s",
                    self.redo_command(),
                    message,
                )
            self._last_failure = message
        else:
            self._last_failure = None

    def _where(self) -> str:
        where = []
        if self.targets.mlflow_uri is not None:
            where.append(f"MLflow {shown(self.targets.mlflow_uri)}, experiment {self.targets.experiment!r}")
        if self.targets.tensorboard_dir is not None:
            where.append(f"TensorBoard {self.targets.tensorboard_dir}")
        return "; ".join(where)

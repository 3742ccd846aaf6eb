"""A run's curves in TensorBoard: one log directory per run, ``<root>/<run name>``.

The same scalars as MLflow's metrics, at ``step=round``, with each round's own time; the
gate's figures at the last round and its decision as text. An export rewrites the run's
log directory whole: it writes a new event file with everything, then removes the event
files that were there before, so a run exported twice (by its cycle, then by
``fedretrain export``) shows each point once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedretrain.errors import TrackingError
from server.tracking.figures import gate_scalars, round_scalars
from server.tracking.runfiles import RunFiles

EVENT_FILES = "events.out.tfevents.*"


def export_tensorboard(run: RunFiles, root: Path) -> Path:
    """Write ``run``'s curves to ``<root>/<run name>``; return that directory.

    Raises
    ------
    TrackingError
        TensorBoard is not installed, or the directory cannot be written.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise TrackingError(
            f"exporting to TensorBoard needs tensorboard ({err}): pip install 'fedretrain[tracking]'"
        ) from None
    log_dir = Path(root) / run.name
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        before = set(log_dir.glob(EVENT_FILES))
        writer = SummaryWriter(log_dir=str(log_dir))
        try:
            _write(writer, run)
        finally:
            writer.close()
        written = set(log_dir.glob(EVENT_FILES)) - before
        if not written:
            raise TrackingError(f"{log_dir}: TensorBoard wrote no event file")
        for old in before:
            old.unlink(missing_ok=True)
    except OSError as err:
        raise TrackingError(f"{log_dir}: cannot write the TensorBoard log ({err})") from None
    return log_dir


def _write(writer: Any, run: RunFiles) -> None:
    """Every round's scalars at its step and time; the gate's at the last round, once it decided."""
    for row in run.rows:
        walltime = run.timestamp_ms(row) / 1000
        for tag, value in round_scalars(row).items():
            writer.add_scalar(tag, value, global_step=row["round"], walltime=walltime)
    if run.summary is not None:
        walltime = (run.ended_ms or run.timestamp_ms(run.rows[-1])) / 1000
        for tag, value in gate_scalars(run.summary).items():
            writer.add_scalar(tag, value, global_step=run.last_round, walltime=walltime)
        writer.add_text("gate/decision", _decision(run), global_step=run.last_round, walltime=walltime)


def _decision(run: RunFiles) -> str:
    summary = run.summary or {}
    if summary.get("aborted"):
        return f"aborted, nothing published: {summary['aborted']}"
    gate = summary.get("gate") or {}
    version = summary.get("published_version") or summary.get("pending_version")
    reasons = "; ".join(str(r) for r in gate.get("reasons") or [])
    text = f"{gate.get('decision')}" + (f" (version {version})" if version else "")
    return text + (f": {reasons}" if reasons else "")

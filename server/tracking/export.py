"""Export one run to its targets: what ``fedretrain export`` and the cycle's live export both call.

Exports to the same target are taken one at a time on this machine (a lock per target in
the system's temporary folder, not in the run directory or the registry, which an export
only reads), so a cycle's live export and the command never create one run twice.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedretrain.atomic import file_lock
from fedretrain.errors import KeyFileError, RegistryError, TrackingError
from fedretrain.registry.signing import key_id
from fedretrain.registry.store import Registry
from server.tracking.lineage import read_lineage
from server.tracking.runfiles import RunFiles
from server.tracking.to_mlflow import LiveState, MlflowExport, MlflowRun, default_model_name, shown
from server.tracking.to_tensorboard import export_tensorboard

DEFAULT_EXPERIMENT = "fedretrain"


@dataclass(frozen=True)
class Targets:
    """Where an export goes: an MLflow store, a TensorBoard folder, or both.

    ``experiment`` and ``model_name`` default to the run's own config (``tracking.*``),
    then to ``fedretrain`` and ``fedretrain-<key id>``.
    """

    mlflow_uri: str | None = None
    tensorboard_dir: Path | None = None
    experiment: str | None = None
    model_name: str | None = None

    def __post_init__(self) -> None:
        if self.mlflow_uri is None and self.tensorboard_dir is None:
            raise TrackingError("nothing to export to: give an MLflow tracking URI, a TensorBoard folder or both")


@dataclass(frozen=True)
class Exported:
    """What one export did."""

    run: RunFiles
    mlflow: MlflowRun | None
    tensorboard: Path | None
    authenticated: bool  # the champion alias follows a key from outside the registry (or there is none)

    def describe(self, targets: Targets) -> str:
        """One line for the command's output."""
        run, summary = self.run, self.run.summary or {}
        gate = (summary.get("gate") or {}).get("decision")
        parts = [f"exported {run.name}: rounds 0-{run.last_round}, {run.state}"]
        if gate:
            version = summary.get("published_version") or summary.get("pending_version")
            parts[-1] += f", gate {gate}" + (f", version {version}" if version else "")
        if self.mlflow is not None and targets.mlflow_uri is not None:
            where = f"MLflow run {self.mlflow.run_id} in experiment {self.mlflow.experiment!r}"
            where += f" ({shown(targets.mlflow_uri)})"
            if self.mlflow.model_name:
                champion = "none" if self.mlflow.champion is None else f"version {self.mlflow.champion}"
                where += f", model {self.mlflow.model_name!r}: {self.mlflow.versions} version(s), champion {champion}"
            parts.append(where)
        if self.tensorboard is not None:
            parts.append(f"TensorBoard {self.tensorboard}")
        return "; ".join(parts)


def export_run(
    run: RunFiles,
    targets: Targets,
    public_key: Ed25519PublicKey | None = None,
    *,
    live: LiveState | None = None,
) -> Exported:
    """Export ``run`` to ``targets``: MLflow (the run, then the registry's versions) and TensorBoard.

    ``public_key`` verifies the registry's champion chain (default: the registry's own pin,
    not authenticated). ``live``: what the cycle itself knows and its files do not say yet
    (its run id, whether it is still running or crashed); a command reading the files of a
    run without a summary cannot tell running from crashed, so it leaves the status alone.

    Raises
    ------
    TrackingError
        A target refused or could not be reached, or the registry does not verify (then
        the MLflow model loses its ``champion`` alias). The other target is exported first.
    """
    mlflow, tensorboard, authenticated, failures = None, None, True, []
    if targets.mlflow_uri is not None:
        experiment = targets.experiment or run.configured("tracking", "experiment") or DEFAULT_EXPERIMENT
        try:
            exporter = MlflowExport(targets.mlflow_uri, str(experiment), targets.model_name or _configured_model(run))
            with _target_lock(f"mlflow {targets.mlflow_uri} {experiment}"):
                mlflow = exporter.export_run(run, live)
                if run.registry_root is not None:
                    mlflow, authenticated = _export_registry(exporter, run.registry_root, public_key, mlflow)
        except TrackingError as err:
            failures.append(str(err))
    if targets.tensorboard_dir is not None:
        root = Path(targets.tensorboard_dir)
        try:
            with _target_lock(f"tensorboard {root.resolve()}"):
                tensorboard = export_tensorboard(run, root)
        except TrackingError as err:
            failures.append(str(err))
    if failures:
        raise TrackingError("; ".join(failures))
    return Exported(run, mlflow, tensorboard, authenticated)


def _configured_model(run: RunFiles) -> str | None:
    name = run.configured("tracking", "model_name")
    return name if isinstance(name, str) and name else None


def _export_registry(
    exporter: MlflowExport, root: Path, public_key: Ed25519PublicKey | None, exported: MlflowRun
) -> tuple[MlflowRun, bool]:
    try:
        lineage = read_lineage(root, public_key)
    except (RegistryError, KeyFileError) as err:
        name = exporter.model_name or _model_name_of(root, public_key)
        removed = name is not None and exporter.withdraw_champion(name)
        also = f"; the 'champion' alias of MLflow model {name!r} was removed" if removed else ""
        raise TrackingError(f"{err}; none of its versions was exported{also}") from None
    if lineage is None:  # nothing published there yet
        return exported, True
    return exporter.export_versions(lineage, exported), lineage.authenticated


def _model_name_of(root: Path, public_key: Ed25519PublicKey | None) -> str | None:
    try:
        return default_model_name(key_id(public_key or Registry(root).public_key()))
    except RegistryError:
        return None


def _target_lock(target: str) -> AbstractContextManager[bool]:
    digest = hashlib.sha256(target.encode()).hexdigest()[:16]
    return file_lock(Path(tempfile.gettempdir()) / f"fedretrain-export-{os.getuid()}-{digest}")

"""A run, and the registry it publishes into, in MLflow.

One MLflow run per fedretrain run, found again by its tag ``fedretrain.run`` (the run's name),
so an export adds only what MLflow does not hold yet: parameters (config.yaml, flattened:
MLflow keeps a parameter's first value), each metric at ``step=round`` unless that step
already holds that value, tags (they may change: the state, the gate's decision), the status
(RUNNING, then FINISHED, or FAILED for an aborted or crashed cycle).

Every version of the registry becomes a version of one MLflow registered model (default
``fedretrain-<key id>``, the key that signs the registry), found again by its tag
``fedretrain.version``: its files (adapter, manifest, signature) are logged as artifacts of the
MLflow run of the cycle that published it (of the exporting run when that one is not in
MLflow), and the model version's source is them (``runs:/<run>/registry/versions/000001``).
The alias ``champion`` follows the verified chain (server/tracking/lineage.py); a registry
that does not verify loses the alias, so nothing loads it by that name.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedretrain.errors import TrackingError
from server.tracking.figures import (
    RUN_ID_TAG,
    RUN_TAG,
    config_params,
    gate_scalars,
    metric_name,
    round_scalars,
    run_tags,
)
from server.tracking.lineage import Lineage, Version
from server.tracking.runfiles import RunFiles

VERSION_TAG = "fedretrain.version"
CHAMPION = "champion"
# MLflow's limits on one log_batch call.
MAX_METRICS, MAX_PARAMS_OR_TAGS = 1000, 100


@dataclass(frozen=True)
class LiveState:
    """What a cycle exporting itself knows that its files do not say yet."""

    run_id: str  # the cycle's run id (summary.json names it at the end)
    crashed: bool = False  # it ended with an error, before writing its summary


@dataclass(frozen=True)
class MlflowRun:
    """What an export left in MLflow: the run's id, and the registered model with its champion."""

    run_id: str
    experiment: str
    model_name: str | None = None
    versions: int = 0
    champion: int | None = None


class MlflowExport:
    """Exports to the MLflow tracking server or database at ``uri``, into ``experiment``."""

    def __init__(self, uri: str, experiment: str, model_name: str | None = None) -> None:
        self.uri, self.experiment, self.model_name = uri, experiment, model_name
        self.client = mlflow_client(uri)

    def export_run(self, run: RunFiles, live: LiveState | None = None) -> MlflowRun:
        """Bring the MLflow run of ``run`` up to date (``live``: the cycle exports itself)."""
        with mlflow_errors(self.uri):
            experiment_id = self._experiment_id()
            found = self._find_run(experiment_id, RUN_TAG, run.name)
            if found is None:
                found = self.client.create_run(experiment_id, start_time=run.started_ms, run_name=run.name)
            mlflow_id = found.info.run_id
            self._log_params(mlflow_id, found.data.params, config_params(run.config))
            self._log_metrics(mlflow_id, found.data.metrics, _metrics(run))
            tags = run_tags(run, None if live is None else live.run_id)
            self._log_batch(mlflow_id, tags={k: v for k, v in tags.items() if found.data.tags.get(k) != v})
            self._set_status(found, run, live)
        return MlflowRun(run_id=mlflow_id, experiment=self.experiment)

    def export_versions(self, lineage: Lineage, exporting_run: MlflowRun) -> MlflowRun:
        """Register every version of ``lineage`` not registered yet, refresh their tags, and move the alias."""
        name = self.model_name or default_model_name(lineage.key_id)
        with mlflow_errors(self.uri):
            self._registered_model(name, lineage)
            registered = self._registered_versions(name)
            experiment_id = self._experiment_id()
            for version in lineage.versions:
                tags = _version_tags(version)
                if version.number not in registered:
                    registered[version.number] = self._register(name, version, tags, experiment_id, exporting_run)
                    continue
                known = registered[version.number]
                for key, value in tags.items():
                    if known.tags.get(key) != value:
                        self.client.set_model_version_tag(name, known.version, key, value)
            self._move_alias(name, None if lineage.champion is None else registered[lineage.champion].version)
            self.client.set_registered_model_tag(name, "fedretrain.champion_authenticated", str(lineage.authenticated))
        return MlflowRun(exporting_run.run_id, self.experiment, name, len(lineage.versions), lineage.champion)

    def withdraw_champion(self, name: str) -> bool:
        """Remove the ``champion`` alias of ``name`` (a registry that no longer verifies); whether it had one."""
        with mlflow_errors(self.uri):
            model = self._get_model(name)
            if model is None or CHAMPION not in model.aliases:
                return False
            self.client.delete_registered_model_alias(name, CHAMPION)
            return True

    # -- the run ----------------------------------------------------------------------------

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return str(self.client.create_experiment(self.experiment, artifact_location=artifact_location(self.uri)))
        if experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {self.experiment!r} at {shown(self.uri)} is deleted: restore it, or export "
                "into another (--experiment, tracking.experiment)"
            )
        return str(experiment.experiment_id)

    def _find_run(self, experiment_id: str, tag: str, value: str) -> Any:
        """The oldest active run of the experiment whose ``tag`` is ``value``, or None."""
        found = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{tag}` = '{value}'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        return found[0] if found else None

    def _log_params(self, mlflow_id: str, have: Mapping[str, str], params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        # MLflow refuses to change a parameter: one already there keeps its first value.
        new = [Param(metric_name(key), value) for key, value in params.items() if metric_name(key) not in have]
        self._log_batch(mlflow_id, params=new)

    def _log_metrics(self, mlflow_id: str, latest: Mapping[str, float], metrics: Sequence[Any]) -> None:
        history: dict[str, set[tuple[int, float]]] = {}
        for key in {m.key for m in metrics} & set(latest):
            history[key] = {(m.step, m.value) for m in self.client.get_metric_history(mlflow_id, key)}
        new = [m for m in metrics if (m.step, m.value) not in history.get(m.key, set())]
        self._log_batch(mlflow_id, metrics=new)

    def _log_batch(
        self,
        mlflow_id: str,
        *,
        metrics: Sequence[Any] = (),
        params: Sequence[Any] = (),
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.entities import RunTag

        for start in range(0, len(metrics), MAX_METRICS):
            self.client.log_batch(mlflow_id, metrics=metrics[start : start + MAX_METRICS])
        for start in range(0, len(params), MAX_PARAMS_OR_TAGS):
            self.client.log_batch(mlflow_id, params=params[start : start + MAX_PARAMS_OR_TAGS])
        items = [RunTag(key, value) for key, value in (tags or {}).items()]
        for start in range(0, len(items), MAX_PARAMS_OR_TAGS):
            self.client.log_batch(mlflow_id, tags=items[start : start + MAX_PARAMS_OR_TAGS])

    def _set_status(self, found: Any, run: RunFiles, live: LiveState | None) -> None:
        """FINISHED or FAILED (aborted) once the summary is there, FAILED when the cycle crashed;
        RUNNING again when a cycle resumes. Without a summary a command leaves it as it is."""
        info, crashed = found.info, live is not None and live.crashed
        if run.summary is not None or crashed:
            status = "FINISHED" if run.state == "finished" else "FAILED"
            end = run.ended_ms
            if info.status != status or (end is not None and info.end_time != end):
                self.client.set_terminated(info.run_id, status, end_time=end)
        elif live is not None and info.status != "RUNNING":
            self.client.update_run(info.run_id, status="RUNNING")

    # -- the registry -----------------------------------------------------------------------

    def _get_model(self, name: str) -> Any:
        """The registered model ``name``, or None when there is none."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None

    def _registered_model(self, name: str, lineage: Lineage) -> None:
        if self._get_model(name) is None:
            self.client.create_registered_model(
                name,
                tags={"fedretrain.registry": str(lineage.root), "fedretrain.key_id": lineage.key_id},
                description=f"The versions of the fedretrain registry {lineage.root}, signed by key {lineage.key_id}; "
                "the alias 'champion' is the version its signed champion chain names.",
            )

    def _registered_versions(self, name: str) -> dict[int, Any]:
        found = self.client.search_model_versions(f"name = '{name}'")
        return {int(mv.tags[VERSION_TAG]): mv for mv in found if str(mv.tags.get(VERSION_TAG, "")).isdigit()}

    def _register(
        self, name: str, version: Version, tags: dict[str, str], experiment_id: str, exporting: MlflowRun
    ) -> Any:
        published_by = str((version.manifest.get("run") or {}).get("run_id") or "")
        # A cycle's run id is hex (server/cycle/run.py); anything else is not searched for.
        source_run = self._find_run(experiment_id, RUN_ID_TAG, published_by) if published_by.isalnum() else None
        mlflow_id = exporting.run_id if source_run is None else source_run.info.run_id
        path = f"registry/versions/{version.number:06d}"
        self.client.log_artifacts(mlflow_id, str(version.folder), artifact_path=path)
        gate = version.manifest.get("gate") or {}
        return self.client.create_model_version(
            name,
            source=f"runs:/{mlflow_id}/{path}",
            run_id=mlflow_id,
            tags=tags,
            description=f"fedretrain version {version.number}: gate {gate.get('decision')}, validation improvement "
            f"{gate.get('improvement')} nats (interval [{gate.get('ci_low')}, {gate.get('ci_high')}])",
        )

    def _move_alias(self, name: str, mlflow_version: Any) -> None:
        aliases = self.client.get_registered_model(name).aliases
        if mlflow_version is None:
            if CHAMPION in aliases:
                self.client.delete_registered_model_alias(name, CHAMPION)
        elif str(aliases.get(CHAMPION)) != str(mlflow_version):
            self.client.set_registered_model_alias(name, CHAMPION, str(mlflow_version))


def default_model_name(registry_key_id: str) -> str:
    """The registered model of a registry: named by the key that signs it, which moving the folder keeps."""
    return f"fedretrain-{registry_key_id}"


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for tracking and model registry at ``uri``.

    A coordinator reports nothing about itself to MLflow's makers (telemetry off), and an
    unreachable server fails in seconds rather than retrying for minutes (unless the
    environment already says otherwise: MLFLOW_HTTP_REQUEST_MAX_RETRIES, ..._TIMEOUT).
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # MLflow's SQL store on SQLAlchemy 2.1 (Flower's) warns of its own loader option on every
    # query; an operator can do nothing about it.
    warnings.filterwarnings("ignore", message=r".*``noload`` loader strategy is deprecated", module=r"mlflow\.")
    try:
        from mlflow import MlflowClient
    except ImportError as err:
        raise TrackingError(
            f"exporting to MLflow needs mlflow-skinny ({err}): pip install 'fedretrain[tracking]'"
        ) from None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def mlflow_errors(uri: str) -> Iterator[None]:
    """MLflow's refusals and an unreachable server as a :class:`TrackingError` naming the store."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as err:  # requests' errors are OSErrors
        message = str(getattr(err, "message", err)).strip().splitlines()
        raise TrackingError(f"MLflow at {shown(uri)}: {message[0] if message else type(err).__name__}") from err


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (``mlartifacts/``, as
    ``mlflow server`` does), else where the tracking server or database says (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///") :])
    return str(database.resolve().parent / "mlartifacts")


def shown(uri: str) -> str:
    """``uri`` without a user name (a password is refused by the config: fedretrain/config/schema.py)."""
    head, sep, rest = uri.partition("://")
    return f"{head}{sep}{rest.split('@', 1)[-1]}" if sep else uri


def _metrics(run: RunFiles) -> list[Any]:
    from mlflow.entities import Metric

    out = []
    for row in run.rows:
        stamp = run.timestamp_ms(row)
        out += [Metric(metric_name(k), v, stamp, row["round"]) for k, v in round_scalars(row).items()]
    if run.summary is not None:
        stamp = run.ended_ms or run.timestamp_ms(run.rows[-1])
        out += [Metric(k, v, stamp, run.last_round) for k, v in gate_scalars(run.summary).items()]
    return out


def _version_tags(version: Version) -> dict[str, str]:
    manifest = version.manifest
    run, gate = manifest.get("run") or {}, manifest.get("gate") or {}
    tags = {
        VERSION_TAG: str(version.number),
        "fedretrain.status": version.status,
        "fedretrain.manifest_sha256": version.manifest_sha256,
        "fedretrain.created_at": str(manifest.get("created_at")),
        "fedretrain.expires_at": str(manifest.get("expires_at")),
        "fedretrain.parent": str(manifest.get("parent")),
        "fedretrain.run_id": str(run.get("run_id")),
        "fedretrain.run_name": str(run.get("name")),
        "fedretrain.base_model_sha256": str((manifest.get("base_model") or {}).get("sha256")),
    }
    for key in ("decision", "improvement", "ci_low", "ci_high", "margin"):
        tags[f"gate.{key}"] = str(gate.get(key))
    return tags

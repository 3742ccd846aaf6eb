"""The coordinator's side of publishing: the registry, the champion, and delivery to sites.

``open_registry`` checks the registry, its champion chain and the signing key before a cycle
starts; ``champion_adapter`` is the baseline (and starting point) of a cycle: the version the
champion chain names, verified with the signing key's public half (which comes from the
coordinator's config, not from the registry folder), never what ``champion.json`` says;
``publish_candidate`` writes a passing candidate as a new signed version; and
``deliver`` sends a version to every connected site in a ``query.publish`` message
and collects what each site did with it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedretrain.arrays import from_torch_state_dict
from fedretrain.config import Config, Job
from fedretrain.errors import ConfigError, FedretrainError, RegistryError
from fedretrain.modeling.loading import resolve_model_path
from fedretrain.registry.base_model import base_model_identity
from fedretrain.registry.bundle import RollbackRecord, VersionBundle
from fedretrain.registry.manifest import utc_now
from fedretrain.registry.signing import load_private_key
from fedretrain.registry.store import Registry
from fedretrain.registry.student import StudentBundle, verify_student
from server.cycle.gate import PENDING, GateResult
from server.cycle.report import finite_or_null
from server.cycle.summary import SiteOutcome
from server.sites.broadcast import Broadcast, broadcast

log = logging.getLogger("fedretrain.server")

PUBLISH_MESSAGE = "query.publish"
STUDENT_MESSAGE = "query.student"


@dataclass
class RegistryHandle:
    registry: Registry
    signing_key: Any  # Ed25519PrivateKey
    expiry_days: float


@dataclass(frozen=True)
class Champion:
    version: int
    arrays: dict[str, np.ndarray]
    bundle: VersionBundle
    rollback: RollbackRecord | None  # the record that made it champion again, if any


def open_registry(cfg: Config) -> RegistryHandle:
    """The registry at ``registry.root``, signed with ``registry.signing_key``."""
    if not cfg.registry.root:
        raise ConfigError("registry.root: the coordinator needs a registry directory to publish into")
    if not cfg.registry.signing_key:
        raise ConfigError("registry.signing_key: set the coordinator's private key (fedretrain keys coordinator)")
    key = load_private_key(Path(cfg.registry.signing_key))
    registry = Registry(Path(cfg.registry.root))
    registry.check_signing_key(key.public_key())  # before training, not at publish time
    registry.verified_champion(key.public_key())  # a chain that does not verify stops the cycle here
    return RegistryHandle(registry, key, cfg.registry.expiry_days)


def champion_adapter(handle: RegistryHandle) -> Champion | None:
    """The version the verified champion chain names, verified again before it is trusted as the
    baseline; its bundle carries the chain's last record for the sites.

    Raises
    ------
    RegistryError
        Naming the file at fault, if the chain or the champion version does not verify.
    """
    registry = handle.registry
    public_key = handle.signing_key.public_key()
    head = registry.verified_champion(public_key)
    if head is None:
        return None
    version = head.version
    problems = registry.verify(version, public_key)
    if problems:
        raise RegistryError(
            f"{registry.root}: the champion version {version} fails verification: " + "; ".join(problems)
        )
    files = registry.bundle(version)
    bundle = VersionBundle(files.manifest_bytes, files.signature, files.files, head.pointer)
    arrays = from_torch_state_dict(safetensors.torch.load(bundle.files["adapter_model.safetensors"]))
    rollback = None
    if head.record["reason"] == "rollback":  # the chain checked that this record exists and verifies
        rollback = dict(registry.rollbacks())[head.record["rollback_sequence"]]
    return Champion(version=version, arrays=arrays, bundle=bundle, rollback=rollback)


@dataclass(frozen=True)
class RunFigures:
    """The run a published version came from, as its manifest records it."""

    run_id: str
    name: str
    rounds: int
    seed: int
    baseline_version: int | None
    # The coordinator's client-level DP (strategies/central_dp.py): epsilon per cycle, beside
    # the sites' own epsilon in the manifest's "sites"; None when off.
    central_dp: dict[str, Any] | None = None


def publish_candidate(
    handle: RegistryHandle,
    cfg: Config,
    adapter_dir: Path,
    result: GateResult,
    run: RunFigures,
    sites: Mapping[str, SiteOutcome],
    target_modules: Sequence[str],
    *,
    pending: bool = False,
) -> int:
    """Write the candidate as a new signed version; it becomes champion unless approval is required
    or ``pending`` (a staged rollout: the canaries' figures decide, server/cycle/rollout.py).

    Every site receives the manifest, so it names sites by pseudonym only. ``target_modules``
    are the LoRA targets as resolved for the base model (``LoraModel.target_modules``).
    """
    registry = handle.registry
    model_dir = Path(resolve_model_path(cfg.model.name_or_path))
    gate = finite_or_null(result.to_dict(site_name=registry.pseudonym))
    return registry.publish(
        adapter_dir,
        signing_key=handle.signing_key,
        base_model=base_model_identity(cfg.model.name_or_path, model_dir, cfg.model.init_missing_seed),
        lora=cfg.lora.to_manifest(target_modules),
        run=finite_or_null(dataclasses.asdict(run)),
        sites={registry.pseudonym(s): finite_or_null(v.manifest_figures()) for s, v in sites.items()},
        gate=gate,
        expiry_days=handle.expiry_days,
        require_approval=pending or result.decision == PENDING,
    )


def deliver(
    grid: Grid,
    bundle: VersionBundle,
    rollback: RollbackRecord | None,
    job: Job,
    timeout_s: float,
    min_nodes: int = 0,
    student: StudentBundle | None = None,
) -> dict[str, Any]:
    """Send ``bundle`` to every connected site; return who installed it and who refused, and why.

    The sites that installed it and asked for its student (``wants-student``: their own
    ``model-variant='student'``) then get ``student`` (server/cycle/distill.py) in a
    ``query.student`` message; without one they are listed as waiting for it."""
    payload: dict[str, Any] = dict(bundle.to_mapping())
    if rollback is not None:
        payload.update(rollback.to_mapping())
    content = RecordDict({"version": ConfigRecord(payload), "config": ConfigRecord(job.to_flat())})
    sent = broadcast(
        grid,
        content,
        PUBLISH_MESSAGE,
        timeout_s,
        lambda _s, _n, reply: dict(reply["metrics"]),
        what=f"version {bundle.version}",
        min_nodes=min_nodes,
    )
    outcome = {"version": bundle.version, "rollback": rollback is not None, **_replies(sent)}
    total = len(sent.answered) + len(sent.refused) + len(sent.no_reply)
    log.info("version %d: installed at %d of %d sites", bundle.version, len(sent.answered), total)
    wanting = {site: node for site, (node, metrics) in sent.answered.items() if metrics.get("wants-student") == 1}
    if wanting:
        outcome["students"] = send_student(grid, bundle.version, student, wanting, job, timeout_s)
    return outcome


def student_for(handle: RegistryHandle, version: int) -> StudentBundle | None:
    """The stored student of ``version`` when it verifies against its teacher; None (logged) otherwise.

    A damaged student at rest must not stop a publication, or every later cycle's catch-up:
    the version goes out, and the sites that chose a student wait for one that verifies."""
    registry = handle.registry
    try:
        student = registry.student(version)
        if student is None:
            return None
        teacher = (registry.version_dir(version) / "manifest.json").read_bytes()
        verify_student(
            student, handle.signing_key.public_key(), teacher_manifest_bytes=teacher, now=utc_now(), check_expiry=False
        )
    except (FedretrainError, OSError) as err:
        log.error("version %d: its stored student does not verify, none is sent: %s", version, err)
        return None
    return student


def send_student(
    grid: Grid, version: int, student: StudentBundle | None, wanting: dict[str, int], job: Job, timeout_s: float
) -> dict[str, Any]:
    """Send the student of ``version`` to the sites that asked for it (site id -> node id)."""
    if student is None:
        log.info(
            "version %d: no student to send to %s (distill.enabled=false, or it failed its gate)",
            version,
            ", ".join(sorted(wanting)),
        )
        return {"version": version, "installed": {}, "refused": [], "no_reply": [], "waiting": sorted(wanting)}
    payload: dict[str, Any] = dict(student.to_mapping())
    content = RecordDict({"student": ConfigRecord(payload), "config": ConfigRecord(job.to_flat())})
    sent = broadcast(
        grid,
        content,
        STUDENT_MESSAGE,
        timeout_s,
        lambda _s, _n, reply: dict(reply["metrics"]),
        what=f"the student of version {version}",
        node_ids=wanting.values(),
    )
    log.info(
        "version %d: its student installed at %d of %d sites that chose it", version, len(sent.answered), len(wanting)
    )
    return {"version": version, **_replies(sent), "waiting": []}


def _replies(sent: Broadcast[dict[str, Any]]) -> dict[str, Any]:
    """Who installed what was sent (with the site's figures and node), who refused and why, who was silent."""
    return {
        "installed": {site: {"node_id": node, **metrics} for site, (node, metrics) in sent.answered.items()},
        "refused": sent.refused,
        "no_reply": sent.no_reply,
    }

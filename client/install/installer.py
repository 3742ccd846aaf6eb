"""What a site does when the coordinator publishes a version: verify, then install, or refuse.

The checks run in this order and fail closed (the first failure ends it, the
current version stays in force and the reason goes back to the coordinator):

1. a coordinator key is pinned in the site's own node_config (``coordinator-key``);
2. the signed champion pointer record that came with the version (``pointer``): signed by that
   key, naming this version and the exact bytes of its manifest, with a sequence newer than
   the last pointer this site accepted (the same record again is a re-send of the version the
   site already runs); a rollback comes with the rollback pointer that names its record.
   A version without a pointer is refused: coordinators older than signed pointers are not
   served (an explicit incompatibility);
3. with a rollback record: its signature, a sequence number newer than any
   rollback seen, and issued from a version no older than the newest this site
   accepted (the one way back to an older version);
4. the manifest's signature against that pinned key, the files' sha256, the
   version newer than the last accepted and not expired, the base model's hash
   equal to this site's base model, safetensors loads, keys and shapes equal to
   this site's adapter, every value finite (``fedretrain.registry.bundle.verify_bundle``);
5. if the site's policy asks (``smoke-eval=true``), the new version scores no
   worse than the current one on the site's held-out data (not for a signed
   rollback: that is the operator's decision);
6. atomic install into the site's model store, then ``pointer.json`` beside its ``state.json``
   (the last accepted pointer's sequence and hash; a crash between the two only means the
   same pointer is accepted once more).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from client.install.model_store import ModelStore
from client.round.site import site_model
from fedretrain.arrays import from_torch_state_dict
from fedretrain.atomic import atomic_write_json
from fedretrain.config import Job, SiteConfig
from fedretrain.data.encoding import encode_texts
from fedretrain.data.notes import read_records
from fedretrain.errors import KeyFileError, VerificationError
from fedretrain.modeling.loading import resolve_model_path
from fedretrain.modeling.lora_model import LoraModel, load_adapter_arrays
from fedretrain.registry.base_model import base_model_identity
from fedretrain.registry.bundle import RollbackRecord, VersionBundle, verify_bundle, verify_rollback
from fedretrain.registry.manifest import sha256_hex
from fedretrain.registry.pointer import verify_pointer
from fedretrain.registry.signing import load_public_key, verify_signature
from fedretrain.training.evaluate import evaluate_loss

log = logging.getLogger("fedretrain.client")


@dataclass(frozen=True)
class InstallOutcome:
    metrics: dict[str, float | int]


def receive_version(
    site: SiteConfig,
    job: Job,
    bundle: VersionBundle,
    rollback: RollbackRecord | None = None,
    *,
    now: datetime | None = None,
) -> InstallOutcome:
    """Verify ``bundle`` (and ``rollback``) and install it; raise ``VerificationError`` to refuse."""
    now = now or datetime.now(UTC)
    key = _pinned_key(site)
    store = ModelStore(site.model_store_path)
    state = store.state()
    previous = state.current
    current = bundle.version == state.current and _same_as_stored(store, bundle)
    pointer = _checked_pointer(store, bundle, key, rollback, resend_ok=current)

    if current:
        # The coordinator re-sends its champion (and the rollback that made it champion)
        # at the start of every cycle: a site already there has nothing to do.
        _remember_pointer(store, pointer)
        return InstallOutcome(
            {"installed-version": bundle.version, "previous-version": previous or 0, "already-current": 1}
        )
    allow_version, sequence = None, None
    if rollback is not None:
        record = verify_rollback(rollback, key, last_sequence=state.rollback_sequence)
        if record["target_version"] != bundle.version:
            raise VerificationError(
                "rollback",
                f"the rollback record points at version {record['target_version']}, "
                f"the bundle is version {bundle.version}",
            )
        if record["from_version"] < state.highest_accepted:
            # Issued before this site accepted a newer version: replaying it would downgrade the site.
            raise VerificationError(
                "rollback",
                f"the rollback from version {record['from_version']} predates "
                f"version {state.highest_accepted}, accepted here since",
            )
        allow_version, sequence = bundle.version, int(record["sequence"])
    # The signature before anything costly: unsigned junk must not make the site load or hash a model.
    verify_signature(key, bundle.manifest_bytes, bundle.signature)

    lm = site_model(job, site.device)
    model_dir = Path(resolve_model_path(job.model.name_or_path))
    identity = base_model_identity(job.model.name_or_path, model_dir, job.model.init_missing_seed)
    tensors = verify_bundle(
        bundle,
        key,
        now=now,
        last_accepted=state.highest_accepted or None,
        allow_version=allow_version,
        base_model_sha256=identity["sha256"],
        expected_shapes={name: shape for name, shape, _ in lm.spec.entries},
    )
    metrics: dict[str, float | int] = {}
    if site.smoke_eval and rollback is None:  # a signed rollback is an operator's decision: no veto
        metrics.update(_smoke_eval(site, job, lm, store, tensors, bundle.version))
    store.install(bundle, via="rollback" if rollback is not None else "publish", rollback_sequence=sequence)
    _remember_pointer(store, pointer)
    from client.install.trial import end_trial_if  # it imports this module

    if end_trial_if(store, bundle.version):  # the version on trial (or an older one) is installed now
        metrics["trial-ended"] = 1
    log.info("site %s installed version %d (previous %s)", site.site_id, bundle.version, previous)
    metrics.update({"installed-version": bundle.version, "previous-version": previous or 0, "already-current": 0})
    return InstallOutcome(metrics)


def _pinned_key(site: SiteConfig):  # noqa: ANN202 - an Ed25519PublicKey
    if not site.coordinator_key:
        raise VerificationError(
            "signature",
            f"site {site.site_id!r} pins no coordinator key (node_config "
            "coordinator-key); it installs nothing it cannot verify",
        )
    try:
        return load_public_key(Path(site.coordinator_key))
    except KeyFileError as err:
        raise VerificationError("signature", f"the pinned coordinator key is unusable: {err}") from err


def _checked_pointer(
    store: ModelStore, bundle: VersionBundle, key: Ed25519PublicKey, rollback: RollbackRecord | None, *, resend_ok: bool
) -> dict[str, Any]:
    """The verified pointer that makes ``bundle`` champion (VerificationError ``pointer`` otherwise)."""
    if bundle.pointer is None:
        raise VerificationError(
            "pointer",
            f"version {bundle.version} came without a signed champion pointer; "
            "this site installs only what the coordinator's chain names",
        )
    last = _last_pointer(store)
    body = verify_pointer(bundle.pointer, key)
    if body["version"] != bundle.version or body["manifest_sha256"] != sha256_hex(bundle.manifest_bytes):
        raise VerificationError(
            "pointer",
            f"the pointer record makes version {body['version']} champion, not "
            f"the manifest of version {bundle.version} that came with it",
        )
    same = body["sequence"] == last["sequence"] and bundle.pointer.sha256 == last["sha256"]
    if body["sequence"] <= last["sequence"] and not (same and resend_ok):
        raise VerificationError(
            "pointer",
            f"pointer sequence {body['sequence']} is not newer than "
            f"{last['sequence']}, accepted here (a replayed pointer record)",
        )
    rollback_sequence = None if rollback is None else rollback.record.get("sequence")
    if body["rollback_sequence"] != rollback_sequence:
        raise VerificationError(
            "pointer",
            f"the pointer record names rollback {body['rollback_sequence']}, "
            f"the delivery carries rollback {rollback_sequence}",
        )
    return {"sequence": body["sequence"], "sha256": bundle.pointer.sha256, "version": body["version"]}


def _last_pointer(store: ModelStore) -> dict[str, Any]:
    path = store.root / "pointer.json"
    if not path.is_file():
        return {"sequence": 0, "sha256": None, "version": None}
    try:
        last = json.loads(path.read_text(encoding="utf-8"))
        if type(last["sequence"]) is not int:
            raise TypeError("sequence is not an integer")
    except (ValueError, TypeError, KeyError) as err:
        raise VerificationError("store", f"{path}: unreadable ({err}); refusing to guess") from err
    return last


def _remember_pointer(store: ModelStore, pointer: dict[str, Any]) -> None:
    atomic_write_json(store.root / "pointer.json", pointer)


def _same_as_stored(store: ModelStore, bundle: VersionBundle) -> bool:
    stored = store.stored_bundle(bundle.version)
    return (
        stored is not None and stored.manifest_bytes == bundle.manifest_bytes and stored.signature == bundle.signature
    )


def _smoke_eval(
    site: SiteConfig, job: Job, lm: LoraModel, store: ModelStore, tensors: dict[str, torch.Tensor], version: int
) -> dict[str, float]:
    """Held-out loss of the new version against the current one; refuse if it is worse."""
    texts = [r.text for r in read_records(site.heldout_path)]
    dataset = encode_texts(lm.tokenizer, texts, job.model.max_length)
    current = store.current_adapter()
    if current is None:
        current_loss = evaluate_loss(lm.model, dataset, batch_size=job.train.eval_batch_size, use_adapter=False).loss
    else:
        load_adapter_arrays(lm, current)
        current_loss = evaluate_loss(lm.model, dataset, batch_size=job.train.eval_batch_size).loss
    load_adapter_arrays(lm, from_torch_state_dict(tensors))
    new_loss = evaluate_loss(lm.model, dataset, batch_size=job.train.eval_batch_size).loss
    if not new_loss <= current_loss:
        raise VerificationError(
            "smoke_eval",
            f"version {version} scores {new_loss:.4f} on this site's held-out "
            f"data, worse than the current {current_loss:.4f}",
        )
    return {"smoke-new-loss": new_loss, "smoke-current-loss": current_loss}

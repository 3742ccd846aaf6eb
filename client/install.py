"""What a site does when the coordinator publishes a version: verify, then install, or refuse.

The checks run in this order and fail closed (the first failure ends it, the
current version stays in force and the reason goes back to the coordinator):

1. a coordinator key is pinned in the site's own node_config (``coordinator-key``);
2. with a rollback record: its signature, a sequence number newer than any
   rollback seen, and issued from a version no older than the newest this site
   accepted (the one way back to an older version);
3. the manifest's signature against that pinned key, the files' sha256, the
   version newer than the last accepted and not expired, the base model's hash
   equal to this site's base model, safetensors loads, keys and shapes equal to
   this site's adapter, every value finite (``fedretrain.registry.bundle.verify_bundle``);
4. if the site's policy asks (``smoke-eval=true``), the new version scores no
   worse than the current one on the site's held-out data (not for a signed
   rollback: that is the operator's decision);
5. atomic install into the site's model store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from client.site import site_model
from client.store import ModelStore
from fedretrain.config import Job, SiteConfig
from fedretrain.data.encoding import encode_texts
from fedretrain.data.schema import read_records
from fedretrain.errors import KeyFileError, VerificationError
from fedretrain.modeling.loading import resolve_model_path
from fedretrain.modeling.lora_model import LoraModel, load_adapter_arrays
from fedretrain.records import from_torch_state_dict
from fedretrain.registry.base_model import base_model_identity
from fedretrain.registry.bundle import RollbackRecord, VersionBundle, verify_bundle, verify_rollback
from fedretrain.registry.signing import load_public_key, verify_signature
from fedretrain.training.evaluate import evaluate_loss

log = logging.getLogger("fedretrain.client")


@dataclass(frozen=True)
class InstallOutcome:
    metrics: dict[str, float | int]


def receive_version(site: SiteConfig, job: Job, bundle: VersionBundle, rollback: RollbackRecord | None = None,
                    *, now: datetime | None = None) -> InstallOutcome:
    """Verify ``bundle`` (and ``rollback``) and install it; raise ``VerificationError`` to refuse."""
    now = now or datetime.now(UTC)
    key = _pinned_key(site)
    store = ModelStore(site.model_store_path)
    state = store.state()
    previous = state.current

    if bundle.version == state.current and _same_as_stored(store, bundle):
        # The coordinator re-sends its champion (and the rollback that made it champion)
        # at the start of every cycle: a site already there has nothing to do.
        return InstallOutcome({"installed-version": bundle.version, "previous-version": previous or 0,
                               "already-current": 1})
    allow_version, sequence = None, None
    if rollback is not None:
        record = verify_rollback(rollback, key, last_sequence=state.rollback_sequence)
        if record["target_version"] != bundle.version:
            raise VerificationError("rollback", f"the rollback record points at version {record['target_version']}, "
                                                f"the bundle is version {bundle.version}")
        if record["from_version"] < state.highest_accepted:
            # Issued before this site accepted a newer version: replaying it would downgrade the site.
            raise VerificationError("rollback", f"the rollback from version {record['from_version']} predates "
                                                f"version {state.highest_accepted}, accepted here since")
        allow_version, sequence = bundle.version, int(record["sequence"])
    # The signature before anything costly: unsigned junk must not make the site load or hash a model.
    verify_signature(key, bundle.manifest_bytes, bundle.signature)

    lm = site_model(job, site.device)
    identity = base_model_identity(job.model.name_or_path, Path(resolve_model_path(job.model.name_or_path)))
    tensors = verify_bundle(
        bundle, key, now=now, last_accepted=state.highest_accepted or None, allow_version=allow_version,
        base_model_sha256=identity["sha256"],
        expected_shapes={name: shape for name, shape, _ in lm.spec.entries},
    )
    metrics: dict[str, float | int] = {}
    if site.smoke_eval and rollback is None:  # a signed rollback is an operator's decision: no veto
        metrics.update(_smoke_eval(site, job, lm, store, tensors, bundle.version))
    store.install(bundle, via="rollback" if rollback is not None else "publish", rollback_sequence=sequence)
    log.info("site %s installed version %d (previous %s)", site.site_id, bundle.version, previous)
    metrics.update({"installed-version": bundle.version, "previous-version": previous or 0, "already-current": 0})
    return InstallOutcome(metrics)


def _pinned_key(site: SiteConfig):  # noqa: ANN202 - an Ed25519PublicKey
    if not site.coordinator_key:
        raise VerificationError("signature", f"site {site.site_id!r} pins no coordinator key (node_config "
                                             "coordinator-key); it installs nothing it cannot verify")
    try:
        return load_public_key(Path(site.coordinator_key))
    except KeyFileError as err:
        raise VerificationError("signature", f"the pinned coordinator key is unusable: {err}") from err


def _same_as_stored(store: ModelStore, bundle: VersionBundle) -> bool:
    stored = store.stored_bundle(bundle.version)
    return stored is not None and stored.manifest_bytes == bundle.manifest_bytes and stored.signature == bundle.signature


def _smoke_eval(site: SiteConfig, job: Job, lm: LoraModel, store: ModelStore, tensors: dict[str, torch.Tensor],
                version: int) -> dict[str, float]:
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
        raise VerificationError("smoke_eval", f"version {version} scores {new_loss:.4f} on this site's held-out "
                                              f"data, worse than the current {current_loss:.4f}")
    return {"smoke-new-loss": new_loss, "smoke-current-loss": current_loss}

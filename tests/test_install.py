"""A site receiving published versions: it installs what verifies against its pinned key, refuses
every tampered or stale version with the last good one kept, follows a signed rollback, and can
generate text with what it installed."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import make_client_app
from client.handlers import ERROR_CODES
from client.install.generate import generate
from client.install.installer import receive_version
from client.install.model_store import ModelStore
from client.round.site import site_model
from fedretrain.config import Job, SiteConfig, compose_config
from fedretrain.errors import RegistryError, VerificationError
from fedretrain.modeling.loading import resolve_model_path
from fedretrain.modeling.lora_model import load_adapter_arrays
from fedretrain.registry.base_model import base_model_identity
from fedretrain.registry.bundle import RollbackRecord, VersionBundle
from fedretrain.registry.manifest import sha256_hex
from fedretrain.registry.pointer import sign_pointer
from fedretrain.registry.signing import generate_keypair, load_private_key
from fedretrain.registry.store import Registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "site-a"


@pytest.fixture(scope="module")
def job() -> Job:
    return Job.from_config(compose_config(["experiment=smoke"]), run_id="publish-test")


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory, job):
    """A registry holding versions 1 and 2 (small, different, finite adapters)."""
    root = tmp_path_factory.mktemp("coordinator")
    keys = generate_keypair(root / "keys")
    signing_key = load_private_key(keys.private_path)
    registry = Registry(root / "registry")
    for version, scale in ((1, 0.01), (2, 0.02)):
        publish(registry, signing_key, job, root / f"adapter-{version}", scale)
    return registry, signing_key, keys.public_path


def publish(
    registry: Registry, signing_key, job: Job, directory: Path, scale: float, *, require_approval: bool = False
) -> int:
    lm = site_model(job, "cpu")
    rng = np.random.default_rng(int(scale * 1000))
    load_adapter_arrays(
        lm, {k: (rng.standard_normal(shape) * scale).astype(np.float32) for k, shape, _ in lm.spec.entries}
    )
    lm.model.save_pretrained(str(directory))
    identity = base_model_identity("embedded", Path(resolve_model_path("embedded")))
    return registry.publish(
        directory,
        signing_key=signing_key,
        base_model=identity,
        lora=job.lora.to_manifest(lm.target_modules),
        run={"name": "test"},
        sites={},
        gate={"decision": "publish"},
        expiry_days=30,
        require_approval=require_approval,
    )


def make_site(tmp_path: Path, key: Path | None, smoke_eval: bool = False) -> SiteConfig:
    data = tmp_path / "site"
    shutil.copytree(EXAMPLE, data, dirs_exist_ok=True)
    return SiteConfig(
        site_id="site-a",
        data_dir=str(data),
        epsilon_ceiling=8.0,
        delta=1e-5,
        coordinator_key=None if key is None else str(key),
        smoke_eval=smoke_eval,
        device="cpu",
    )


def resigned(bundle: VersionBundle, signer, files=None, **edits) -> VersionBundle:
    """``bundle`` with ``files`` swapped in and manifest fields edited, properly signed by ``signer``."""
    files = dict(files or bundle.files)
    manifest = {**bundle.manifest, **edits}
    manifest["files"] = {name: sha256_hex(data) for name, data in files.items() if name in manifest["files"]}
    return VersionBundle.signed(manifest, files, signer)


def delivered(registry: Registry, version: int) -> VersionBundle:
    """``version`` as the coordinator sent it when it became champion: with the last pointer record naming it."""
    pointer = [p for _, p in registry.pointers() if p.record["version"] == version][-1]
    return dataclasses.replace(registry.bundle(version), pointer=pointer)


def pointed(bundle: VersionBundle, signer, sequence: int) -> VersionBundle:
    """``bundle`` with a fresh pointer record for its manifest, signed by ``signer`` (the checks behind
    the pointer are what a case tests)."""
    pointer = sign_pointer(
        signer,
        sequence=sequence,
        version=bundle.manifest["version"],
        reason="publish",
        created_at=datetime.now(UTC),
        manifest_bytes=bundle.manifest_bytes,
        previous=None,
    )
    return dataclasses.replace(bundle, pointer=pointer)


def tensors_changed(bundle: VersionBundle, change) -> dict[str, bytes]:
    tensors = safetensors.torch.load(bundle.files["adapter_model.safetensors"])
    change(tensors)
    return {**bundle.files, "adapter_model.safetensors": safetensors.torch.save(tensors)}


def first_key(bundle: VersionBundle) -> str:
    return sorted(safetensors.torch.load(bundle.files["adapter_model.safetensors"]))[0]


def test_a_verified_version_is_installed_and_generates_text(tmp_path, job, coordinator):
    registry, _, public = coordinator
    site = make_site(tmp_path, public)

    outcome = receive_version(site, job, delivered(registry, 1))

    store = ModelStore(site.model_store_path)
    assert outcome.metrics["installed-version"] == 1 and outcome.metrics["previous-version"] == 0
    assert store.state().current == 1
    assert (store.version_dir(1) / "adapter_model.safetensors").read_bytes() == registry.bundle(1).files[
        "adapter_model.safetensors"
    ]
    # Sent again (the start-of-cycle sync): nothing to do.
    assert receive_version(site, job, delivered(registry, 1)).metrics["already-current"] == 1
    # The site uses what it installed: peft loads the version directory onto the base model.
    result = generate(site.model_store_path, "Patient presents with", coordinator_key=public, max_new_tokens=8)
    assert result.version == 1 and result.text.startswith("Patient presents with") and result.new_tokens > 0


def tamperings(registry: Registry, key) -> dict:
    v2 = delivered(registry, 2)
    other = Ed25519PrivateKey.generate()
    flipped = dict(v2.files)
    flipped["adapter_model.safetensors"] = flipped["adapter_model.safetensors"][:-1] + bytes(
        [flipped["adapter_model.safetensors"][-1] ^ 1]
    )
    no_config_hash = {
        **v2.manifest,
        "files": {"adapter_model.safetensors": v2.manifest["files"]["adapter_model.safetensors"]},
    }
    name = first_key(v2)
    return {
        "flipped bit in the adapter": (VersionBundle(v2.manifest_bytes, v2.signature, flipped), {}, "hashes"),
        "edited manifest": (
            VersionBundle(v2.manifest_bytes.replace(b'"version":2', b'"version":3'), v2.signature, v2.files),
            {},
            "signature",
        ),
        "signed by another key": (VersionBundle.signed(v2.manifest, v2.files, other), {}, "signature"),
        "expired": (v2, {"now": datetime.now(UTC) + timedelta(days=31)}, "expiry"),
        "manifest missing a file's hash": (VersionBundle.signed(no_config_hash, v2.files, key), {}, "hashes"),
        "NaN in a tensor": (
            resigned(v2, key, tensors_changed(v2, lambda t: t[name].view(-1).__setitem__(0, float("nan")))),
            {},
            "finite",
        ),
        "wrong shape": (
            resigned(v2, key, tensors_changed(v2, lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()))),
            {},
            "shapes",
        ),
        "another base model": (
            resigned(v2, key, base_model={"name": "embedded", "sha256": "ab" * 32}),
            {},
            "base_model",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "flipped bit in the adapter",
        "edited manifest",
        "signed by another key",
        "expired",
        "manifest missing a file's hash",
        "NaN in a tensor",
        "wrong shape",
        "another base model",
    ],
)
def test_tampered_versions_are_refused_and_the_last_good_one_kept(tmp_path, job, coordinator, case):
    registry, key, public = coordinator
    site = make_site(tmp_path, public)
    receive_version(site, job, delivered(registry, 1))
    bundle, kwargs, check = tamperings(registry, key)[case]

    with pytest.raises(VerificationError) as refused:
        receive_version(site, job, pointed(bundle, key, sequence=2), **kwargs)

    assert refused.value.check == check
    store = ModelStore(site.model_store_path)
    assert store.state().current == 1
    assert sorted(p.name for p in (site.model_store_path / "versions").iterdir()) == ["000001"]


def test_a_replayed_older_version_and_an_unpinned_site_are_refused(tmp_path, job, coordinator):
    registry, key, public = coordinator
    site = make_site(tmp_path, public)
    receive_version(site, job, delivered(registry, 1))
    receive_version(site, job, delivered(registry, 2))

    with pytest.raises(VerificationError, match="replayed pointer record") as replay:
        receive_version(site, job, delivered(registry, 1))
    # Behind the pointer, the version check holds on its own (a newer pointer cannot bring back version 1).
    with pytest.raises(VerificationError, match="not newer than the accepted 2") as older:
        receive_version(site, job, pointed(registry.bundle(1), key, sequence=3))
    with pytest.raises(VerificationError, match="pins no coordinator key") as unpinned:
        receive_version(make_site(tmp_path / "other", None), job, delivered(registry, 1))

    assert (replay.value.check, older.value.check, unpinned.value.check) == ("pointer", "version", "signature")
    assert ModelStore(site.model_store_path).state().current == 2


def test_a_site_follows_a_signed_rollback_and_refuses_an_unsigned_one(tmp_path, job, coordinator):
    registry, key, public = coordinator
    site = make_site(tmp_path, public)
    receive_version(site, job, delivered(registry, 1))
    receive_version(site, job, delivered(registry, 2))
    target, record = rollback_record(registry, key, target=1)
    forged = RollbackRecord(record.payload_bytes, Ed25519PrivateKey.generate().sign(record.payload_bytes))

    with pytest.raises(VerificationError) as unsigned:
        receive_version(site, job, target, forged)
    assert unsigned.value.check == "signature" and ModelStore(site.model_store_path).state().current == 2
    outcome = receive_version(site, job, target, record)

    state = ModelStore(site.model_store_path).state()
    assert outcome.metrics["installed-version"] == 1 and outcome.metrics["previous-version"] == 2
    assert (state.current, state.highest_accepted, state.rollback_sequence) == (1, 2, record.record["sequence"])
    # Version 2 is still stored, and a replay of version 2 without a newer record is refused.
    assert ModelStore(site.model_store_path).version_dir(2).is_dir()
    with pytest.raises(VerificationError, match="not newer"):
        receive_version(site, job, delivered(registry, 2))


def rollback_record(registry: Registry, key, target: int) -> tuple[VersionBundle, RollbackRecord]:
    """The delivery of a rollback to ``target``: the bundle (with its rollback pointer) and the record."""
    # A copy of the registry so the module's registry keeps version 2 as champion.
    copy = Registry(Path(str(registry.root) + f"-rollback-{datetime.now(UTC).timestamp()}"))
    shutil.copytree(registry.root, copy.root)
    record = copy.rollback(target, signing_key=key, reason="test")
    return copy.bundle(target), record


def test_smoke_evaluation_refuses_a_version_worse_on_heldout_data(tmp_path, job, coordinator):
    registry, key, public = coordinator
    site = make_site(tmp_path, public, smoke_eval=True)
    v2 = registry.bundle(2)
    # Finite, well-formed, signed, and useless: every LoRA value 3.0.
    loud = resigned(v2, key, tensors_changed(v2, lambda t: [x.fill_(3.0) for x in t.values()]), version=3)

    # LoRA B = 0: exactly the base model, so no worse than it.
    neutral = resigned(
        v2, key, tensors_changed(v2, lambda t: [x.zero_() for n, x in t.items() if "lora_B" in n]), version=4
    )

    with pytest.raises(VerificationError, match="worse than the current") as refused:
        receive_version(site, job, pointed(loud, key, sequence=3))
    good = receive_version(site, job, pointed(neutral, key, sequence=4))

    assert refused.value.check == "smoke_eval"
    assert good.metrics["smoke-new-loss"] == pytest.approx(good.metrics["smoke-current-loss"], abs=1e-9)
    assert ModelStore(site.model_store_path).state().current == 4


def test_the_client_app_answers_a_publish_message(tmp_path, job, coordinator, instruction_identity):
    registry, _, public = coordinator
    site = make_site(tmp_path, public)
    app = make_client_app()
    context = Context(run_id=1, node_id=7, node_config=site.to_node_config(), state=RecordDict(), run_config={})

    def send(bundle: VersionBundle) -> Message:
        content = RecordDict({"version": ConfigRecord(bundle.to_mapping()), "config": ConfigRecord(job.to_flat())})
        return app(Message(content, dst_node_id=7, message_type="query.publish"), context)

    tampered = dataclasses.replace(registry.bundle(2), signature=bytes(64))
    refused, installed = send(tampered), send(registry.bundle(2))

    assert refused.has_error() and refused.error.code == ERROR_CODES[VerificationError]
    assert refused.error.reason.startswith("VerificationError: signature")
    assert installed.content["metrics"]["installed-version"] == 2
    assert installed.content["site"]["site-id"] == "site-a"


def test_an_old_rollback_cannot_downgrade_a_site_that_accepted_a_newer_version(tmp_path, job, coordinator):
    # The operator rolled back 2 -> 1 while this site was away; since then it accepted version 3.
    registry, key, public = coordinator
    copy = Registry(tmp_path / "registry")
    shutil.copytree(registry.root, copy.root)
    old_rollback = copy.rollback(1, signing_key=key, reason="while the site was away")
    publish(copy, key, job, tmp_path / "adapter-3", 0.03)
    site = make_site(tmp_path, public)
    receive_version(site, job, copy.bundle(3))
    replay = delivered(copy, 1)  # with the rollback's pointer record, older than version 3's

    with pytest.raises(VerificationError, match="replayed pointer record") as refused:
        receive_version(site, job, replay, old_rollback)
    # A site that lost its pointer memory (or predates signed pointers) still refuses it.
    (site.model_store_path / "pointer.json").unlink()
    with pytest.raises(VerificationError, match="predates version 3") as predates:
        receive_version(site, job, replay, old_rollback)

    assert (refused.value.check, predates.value.check) == ("pointer", "rollback")
    assert ModelStore(site.model_store_path).state().current == 3


def test_a_rollback_is_followed_even_where_smoke_evaluation_would_veto_it(tmp_path, job, coordinator):
    registry, key, public = coordinator
    site = make_site(tmp_path, public, smoke_eval=True)
    store = ModelStore(site.model_store_path)
    store.install(registry.bundle(1), via="publish")
    store.install(registry.bundle(2), via="publish")  # as if installed earlier, without a smoke test

    outcome = receive_version(site, job, *rollback_record(registry, key, target=1))

    assert outcome.metrics["installed-version"] == 1 and "smoke-new-loss" not in outcome.metrics


def test_a_stored_copy_changed_at_rest_is_replaced_by_the_verified_bundle(tmp_path, job, coordinator):
    registry, key, public = coordinator
    site = make_site(tmp_path, public)
    receive_version(site, job, delivered(registry, 1))
    receive_version(site, job, delivered(registry, 2))
    stored = ModelStore(site.model_store_path).version_dir(1) / "adapter_model.safetensors"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\0")

    receive_version(site, job, *rollback_record(registry, key, target=1))

    assert stored.read_bytes() == registry.bundle(1).files["adapter_model.safetensors"]


def test_the_registry_refuses_to_roll_back_to_an_expired_version(tmp_path, job, coordinator):
    _, key, _ = coordinator
    registry = Registry(tmp_path / "registry")
    lm = site_model(job, "cpu")
    lm.model.save_pretrained(str(tmp_path / "adapter"))
    identity = base_model_identity("embedded", Path(resolve_model_path("embedded")))
    fields = {
        "base_model": identity,
        "lora": job.lora.to_manifest(lm.target_modules),
        "run": {"name": "t"},
        "sites": {},
        "gate": {"decision": "publish"},
    }
    registry.publish(
        tmp_path / "adapter", signing_key=key, expiry_days=1, now=datetime.now(UTC) - timedelta(days=2), **fields
    )
    registry.publish(tmp_path / "adapter", signing_key=key, expiry_days=30, **fields)

    with pytest.raises(RegistryError, match="expired"):
        registry.rollback(1, signing_key=key, reason="too late")
    assert registry.champion() == 2

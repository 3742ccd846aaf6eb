"""A published version as bytes: every tampering is refused with the check that caught it."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedretrain.errors import RegistryError, VerificationError
from fedretrain.registry.bundle import (
    ADAPTER_FILES,
    RollbackRecord,
    VersionBundle,
    base_model_identity,
    verify_bundle,
    verify_rollback,
)
from fedretrain.registry.manifest import build_manifest
from fedretrain.registry.pointer import ChampionPointer, sign_pointer, verify_chain, verify_pointer
from fedretrain.registry.signing import canonical_json, key_id, sign

NOW = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)
BASE = {"name": "tiny-llama", "sha256": "ab" * 32}
LORA = {"r": 2, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
# The tiny Llama below: hidden 16, r 2, q_proj and v_proj (2 kv heads x head_dim 8 = 16 outputs).
PREFIX = "base_model.model.model.layers.0.self_attn"
SHAPES = {
    f"{PREFIX}.{m}.lora_{ab}.weight": ((2, 16) if ab == "A" else (16, 2)) for m in ("q_proj", "v_proj") for ab in "AB"
}


@pytest.fixture(scope="module")
def adapter_files(tiny_adapter_dir) -> dict[str, bytes]:
    """The two files peft's save_pretrained writes for a LoRA on a tiny Llama."""
    return {name: (tiny_adapter_dir / name).read_bytes() for name in ADAPTER_FILES}


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _manifest(files: dict[str, bytes], signer: Ed25519PrivateKey, *, version: int = 2, **edits) -> dict:
    manifest = build_manifest(
        version=version,
        parent=version - 1 or None,
        created_at=NOW,
        expires_at=NOW + timedelta(days=30),
        key_id=key_id(signer.public_key()),
        files=files,
        base_model=BASE,
        lora=LORA,
        run={"name": "demo", "rounds": 3},
        sites={"s-0123456789ab": {"epsilon": 2.5}},
        gate={"decision": "publish"},
    )
    manifest.update(edits)
    return manifest


def _signed(files: dict[str, bytes], signer: Ed25519PrivateKey, **edits) -> VersionBundle:
    return VersionBundle.signed(_manifest(files, signer, **edits), files, signer)


def _with_tensors(files: dict[str, bytes], change) -> dict[str, bytes]:
    tensors = safetensors.torch.load(files["adapter_model.safetensors"])
    change(tensors)
    return {**files, "adapter_model.safetensors": safetensors.torch.save(tensors)}


def test_a_good_bundle_verifies_and_returns_its_tensors(adapter_files, key) -> None:
    # Prepare
    bundle = _signed(adapter_files, key)

    # Execute
    tensors = verify_bundle(
        bundle, key.public_key(), now=NOW, last_accepted=1, base_model_sha256=BASE["sha256"], expected_shapes=SHAPES
    )

    # Assert
    assert {name: tuple(t.shape) for name, t in tensors.items()} == SHAPES
    assert bundle.version == 2 and bundle.manifest["parent"] == 1
    config_sha = hashlib.sha256(adapter_files["adapter_config.json"]).hexdigest()
    assert bundle.manifest["files"]["adapter_config.json"] == config_sha


def test_bundle_travels_as_a_mapping_and_as_a_directory(adapter_files, key, tmp_path) -> None:
    # Prepare
    bundle = _signed(adapter_files, key)

    # Execute
    mapping = bundle.to_mapping()
    bundle.write_to(tmp_path)

    # Assert: the same bytes come back both ways.
    assert sorted(mapping) == ["file:adapter_config.json", "file:adapter_model.safetensors", "manifest", "signature"]
    assert VersionBundle.from_mapping(mapping) == bundle
    assert VersionBundle.from_dir(tmp_path) == bundle
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*ADAPTER_FILES, "manifest.json", "manifest.sig"])
    assert bundle.nbytes == sum(len(v) for v in mapping.values())
    assert RollbackRecord.from_mapping(mapping) is None


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _resigned_without_config_hash(files, key):
    manifest = _manifest(files, key)
    del manifest["files"]["adapter_config.json"]
    return VersionBundle.signed(manifest, files, key), {}


def _nan_in_a_tensor(files, key):
    def poison(tensors):
        tensors[f"{PREFIX}.v_proj.lora_B.weight"][3, 1] = float("nan")

    return _signed(_with_tensors(files, poison), key), {}


def _indented_manifest(files, key):
    manifest_bytes = json.dumps(_manifest(files, key), indent=1).encode()
    return VersionBundle(manifest_bytes, sign(key, manifest_bytes), files), {}


def _shipping(files, key, shipped):
    # Signed over ``files``, but ships ``shipped``.
    good = _signed(files, key)
    return VersionBundle(good.manifest_bytes, good.signature, shipped), {}


# case -> (build the tampered bundle and the verify_bundle arguments that go with it, expected check)
TAMPERINGS = {
    "flipped bit in the adapter": (
        lambda f, k: _shipping(
            f, k, {**f, "adapter_model.safetensors": _flip_last_byte(f["adapter_model.safetensors"])}
        ),
        "hashes",
    ),
    "edited manifest": (
        lambda f, k: (VersionBundle(canonical_json(_manifest(f, k, version=3)), _signed(f, k).signature, f), {}),
        "signature",
    ),
    "signed by another key": (lambda f, k: (_signed(f, Ed25519PrivateKey.generate()), {}), "signature"),
    "replayed older version": (lambda f, k: (_signed(f, k), {"last_accepted": 2}), "version"),
    "expired": (lambda f, k: (_signed(f, k), {"now": NOW + timedelta(days=30)}), "expiry"),
    "manifest missing a file's hash": (_resigned_without_config_hash, "hashes"),
    "shipped file not in the manifest": (lambda f, k: _shipping(f, k, {**f, "README.md": b"hi"}), "hashes"),
    "listed file not shipped": (
        lambda f, k: _shipping(f, k, {"adapter_model.safetensors": f["adapter_model.safetensors"]}),
        "hashes",
    ),
    "NaN in a tensor": (_nan_in_a_tensor, "finite"),
    "wrong shape": (
        lambda f, k: (_signed(f, k), {"expected_shapes": {**SHAPES, f"{PREFIX}.q_proj.lora_A.weight": (4, 16)}}),
        "shapes",
    ),
    "wrong base model": (lambda f, k: (_signed(f, k), {"base_model_sha256": "cd" * 32}), "base_model"),
    "not a safetensors file": (
        lambda f, k: (_signed({**f, "adapter_model.safetensors": b"\0" * 64}, k), {}),
        "safetensors",
    ),
    "non-canonical manifest": (_indented_manifest, "manifest"),
    "unknown format": (lambda f, k: (_signed(f, k, format="fedretrain.version/9"), {}), "manifest"),
    "unknown field": (lambda f, k: (_signed(f, k, secret_extra="run me"), {}), "manifest"),
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_each_tampering_is_refused_by_its_check(adapter_files, key, case) -> None:
    # Prepare
    tamper, check = TAMPERINGS[case]
    bundle, overrides = tamper(adapter_files, key)
    kwargs = {
        "now": NOW,
        "last_accepted": 1,
        "base_model_sha256": BASE["sha256"],
        "expected_shapes": SHAPES,
        **overrides,
    }

    # Execute
    with pytest.raises(VerificationError) as err:
        verify_bundle(bundle, key.public_key(), **kwargs)

    # Assert
    assert err.value.check == check, str(err.value)


def test_failures_name_the_bad_tensor(adapter_files, key) -> None:
    # Prepare
    bad = f"{PREFIX}.v_proj.lora_B.weight"

    def poison(tensors):
        tensors[bad][0, 0] = float("inf")

    nan_files = _with_tensors(adapter_files, poison)

    # Execute / Assert
    with pytest.raises(VerificationError, match=bad):
        verify_bundle(_signed(nan_files, key), key.public_key(), now=NOW)
    with pytest.raises(VerificationError, match=f"{PREFIX}.q_proj.lora_A.weight.*expected \\(4, 16\\)"):
        verify_bundle(
            _signed(adapter_files, key),
            key.public_key(),
            now=NOW,
            expected_shapes={**SHAPES, f"{PREFIX}.q_proj.lora_A.weight": (4, 16)},
        )


def test_checks_run_in_order_hashes_before_expiry(adapter_files, key) -> None:
    # Prepare: both tampered and expired.
    good = _signed(adapter_files, key)
    bundle = VersionBundle(
        good.manifest_bytes,
        good.signature,
        {**adapter_files, "adapter_config.json": adapter_files["adapter_config.json"] + b" "},
    )

    # Execute / Assert
    with pytest.raises(VerificationError) as err:
        verify_bundle(bundle, key.public_key(), now=NOW + timedelta(days=365))
    assert err.value.check == "hashes"


def test_allow_version_readmits_an_older_version(adapter_files, key) -> None:
    # Prepare: version 1, while the site has accepted 2.
    bundle = _signed(adapter_files, key, version=1)

    # Execute / Assert: refused as a replay, admitted when a rollback names it.
    with pytest.raises(VerificationError) as err:
        verify_bundle(bundle, key.public_key(), now=NOW, last_accepted=2)
    assert err.value.check == "version"
    assert set(verify_bundle(bundle, key.public_key(), now=NOW, last_accepted=2, allow_version=1)) == set(SHAPES)


def test_bf16_adapters_load_as_bf16(adapter_files, key) -> None:
    # Prepare
    bf16_files = _with_tensors(adapter_files, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))

    # Execute
    tensors = verify_bundle(_signed(bf16_files, key), key.public_key(), now=NOW, expected_shapes=SHAPES)

    # Assert
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def _rollback(signer: Ed25519PrivateKey, sequence: int = 1, **edits) -> RollbackRecord:
    body = {
        "kind": "rollback",
        "sequence": sequence,
        "target_version": 1,
        "from_version": 2,
        "created_at": "2026-11-21T10:00:00Z",
        "reason": "gate regression",
        "key_id": key_id(signer.public_key()),
        **edits,
    }
    payload = canonical_json(body)
    return RollbackRecord(payload, sign(signer, payload))


def test_a_signed_rollback_record_is_accepted(key) -> None:
    # Prepare
    record = _rollback(key, sequence=2)

    # Execute
    body = verify_rollback(RollbackRecord.from_mapping(record.to_mapping()), key.public_key(), last_sequence=1)

    # Assert
    assert body["target_version"] == 1 and body["sequence"] == 2
    assert verify_rollback(record, key.public_key(), last_sequence=None) == body


def test_unsigned_forged_or_replayed_rollbacks_are_refused(key) -> None:
    # Prepare
    good = _rollback(key)
    unsigned = RollbackRecord(good.payload_bytes, b"")
    forged = _rollback(Ed25519PrivateKey.generate())
    not_a_rollback = _rollback(key, kind="approval")

    # Execute / Assert
    for record, last, check in [
        (unsigned, None, "signature"),
        (forged, None, "signature"),
        (good, 1, "rollback"),
        (good, 5, "rollback"),
        (not_a_rollback, None, "rollback"),
    ]:
        with pytest.raises(VerificationError) as err:
            verify_rollback(record, key.public_key(), last_sequence=last)
        assert err.value.check == check
    with pytest.raises(VerificationError) as err:
        RollbackRecord.from_mapping({"rollback": good.payload_bytes})
    assert err.value.check == "signature"


def test_a_champion_pointer_is_canonical_json_linked_by_hash_and_travels_with_the_bundle(adapter_files, key) -> None:
    # Prepare
    bundle = _signed(adapter_files, key)
    first = sign_pointer(
        key, sequence=1, version=1, reason="publish", created_at=NOW, manifest_bytes=b"v1", previous=None
    )

    # Execute
    second = sign_pointer(
        key,
        sequence=2,
        version=2,
        reason="publish",
        created_at=NOW,
        manifest_bytes=bundle.manifest_bytes,
        previous=first,
    )
    carried = VersionBundle(bundle.manifest_bytes, bundle.signature, bundle.files, second)
    mapping = carried.to_mapping()

    # Assert: the exact signed bytes, worked out by hand; the link is the SHA-256 of the first record's bytes.
    link = hashlib.sha256(first.payload_bytes).hexdigest()
    assert (
        second.payload_bytes
        == (
            f'{{"created_at":"2026-11-21T10:00:00Z","key_id":"{key_id(key.public_key())}","kind":"champion",'
            f'"manifest_sha256":"{hashlib.sha256(bundle.manifest_bytes).hexdigest()}",'
            f'"previous_sha256":"{link}","reason":"publish","rollback_sequence":null,"sequence":2,"version":2}}'
        ).encode()
    )
    assert verify_pointer(second, key.public_key(), last_sequence=1)["previous_sha256"] == link
    assert [b["sequence"] for b in verify_chain([(1, first), (2, second)], key.public_key())] == [1, 2]
    assert VersionBundle.from_mapping(mapping) == carried and carried.nbytes == sum(len(v) for v in mapping.values())
    assert VersionBundle.from_mapping(bundle.to_mapping()).pointer is None


def test_unsigned_foreign_replayed_or_malformed_pointers_are_refused(key) -> None:
    # Prepare
    good = sign_pointer(
        key, sequence=3, version=2, reason="publish", created_at=NOW, manifest_bytes=b"m", previous=None
    )
    foreign = sign_pointer(
        Ed25519PrivateKey.generate(),
        sequence=3,
        version=2,
        reason="publish",
        created_at=NOW,
        manifest_bytes=b"m",
        previous=None,
    )
    rollback_without_record = canonical_json(json.loads(good.payload_bytes) | {"reason": "rollback"})
    extra_field = canonical_json(json.loads(good.payload_bytes) | {"note": "x"})

    # Execute / Assert
    for pointer, last, check in [
        (ChampionPointer(good.payload_bytes, b""), None, "signature"),
        (foreign, None, "signature"),
        (good, 3, "pointer"),
        (good, 7, "pointer"),
        (ChampionPointer(rollback_without_record, sign(key, rollback_without_record)), None, "pointer"),
        (ChampionPointer(extra_field, sign(key, extra_field)), None, "pointer"),
    ]:
        with pytest.raises(VerificationError) as err:
            verify_pointer(pointer, key.public_key(), last_sequence=last)
        assert err.value.check == check
    # A chain must start at 1 and link: a lone record 3 is not a chain.
    with pytest.raises(VerificationError, match="pointers/000001.json: its body says sequence 3"):
        verify_chain([(1, good)], key.public_key())


def test_base_model_identity_hashes_config_and_weights_by_name(tmp_path) -> None:
    # Prepare
    (tmp_path / "config.json").write_bytes(b'{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "tokenizer.json").write_bytes(b"not part of the identity")
    sha = {
        name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        for name in ("config.json", "model.safetensors")
    }
    expected = hashlib.sha256(
        f"config.json\0{sha['config.json']}\nmodel.safetensors\0{sha['model.safetensors']}\n".encode()
    ).hexdigest()

    # Execute
    identity = base_model_identity("tiny", tmp_path)

    # Assert: by hand; then a rename and an edit (cached by size and mtime) both change it.
    assert identity == {"name": "tiny", "sha256": expected}
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001.safetensors")
    renamed = base_model_identity("tiny", tmp_path)["sha256"]
    assert renamed != expected
    (tmp_path / "model-00001.safetensors").write_bytes(b"other weights")
    assert base_model_identity("tiny", tmp_path)["sha256"] not in (expected, renamed)


def test_a_seed_for_missing_parameters_is_part_of_the_base_model_identity(tmp_path) -> None:
    # Prepare
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    plain = base_model_identity("tiny", tmp_path)["sha256"]
    lines = "".join(
        f"{name}\0{hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()}\n"
        for name in ("config.json", "model.safetensors")
    )

    # Execute
    seeded = {seed: base_model_identity("tiny", tmp_path, init_missing_seed=seed)["sha256"] for seed in (0, 1)}

    # Assert: by hand, one more line after the files; each seed is another model.
    assert seeded[0] == hashlib.sha256(f"{lines}init_missing_seed\x000\n".encode()).hexdigest()
    assert len({plain, seeded[0], seeded[1]}) == 3


def test_base_model_identity_refuses_a_directory_without_weights(tmp_path) -> None:
    # Prepare
    (tmp_path / "config.json").write_text("{}")

    # Execute / Assert
    with pytest.raises(RegistryError, match="no .*weight file"):
        base_model_identity("tiny", tmp_path)
    with pytest.raises(RegistryError, match="no config.json"):
        base_model_identity("tiny", tmp_path / "absent")

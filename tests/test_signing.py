"""Coordinator keys, signatures and canonical JSON: real Ed25519 keys in real files."""

from __future__ import annotations

import hashlib
import logging
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from fedretrain.errors import KeyFileError, VerificationError
from fedretrain.registry.signing import (
    canonical_json,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign,
    verify_signature,
)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_keypair_writes_a_private_key_only_its_owner_can_read(tmp_path) -> None:
    # Execute
    pair = generate_keypair(tmp_path / "keys")

    # Assert: names, modes, PEM kinds, and the id is sha256(raw public key)[:16].
    assert pair.private_path == tmp_path / "keys" / "coordinator.key"
    assert pair.public_path == tmp_path / "keys" / "coordinator.pub"
    assert _mode(pair.private_path) == 0o600
    assert _mode(pair.public_path) == 0o644
    assert pair.private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pair.public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    public_key = load_public_key(pair.public_path)
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(pair.key_id) == 16
    assert pair.key_id == hashlib.sha256(raw).hexdigest()[:16]
    assert key_id(load_private_key(pair.private_path).public_key()) == pair.key_id


def test_generate_keypair_refuses_to_overwrite_without_force(tmp_path) -> None:
    # Prepare
    first = generate_keypair(tmp_path)
    before = first.private_path.read_bytes()

    # Execute / Assert: refused, the message names the file and the way out; nothing changed.
    with pytest.raises(KeyFileError, match=r"coordinator\.key.*--force"):
        generate_keypair(tmp_path)
    assert first.private_path.read_bytes() == before

    # Execute / Assert: with force, a new key replaces it.
    second = generate_keypair(tmp_path, force=True)
    assert second.key_id != first.key_id
    assert _mode(second.private_path) == 0o600


def test_refuses_when_only_the_public_file_exists(tmp_path) -> None:
    # Prepare
    (tmp_path / "site.pub").write_text("someone else's key")

    # Execute / Assert
    with pytest.raises(KeyFileError, match=r"site\.pub"):
        generate_keypair(tmp_path, "site")
    assert not (tmp_path / "site.key").exists()


def test_sign_and_verify_round_trip_and_another_key_is_refused(tmp_path) -> None:
    # Prepare
    ours = generate_keypair(tmp_path, "ours")
    theirs = generate_keypair(tmp_path, "theirs")
    payload = canonical_json({"version": 1})
    signature = sign(load_private_key(ours.private_path), payload)

    # Execute / Assert: the right key verifies; 64 raw bytes.
    assert len(signature) == 64
    verify_signature(load_public_key(ours.public_path), payload, signature)

    # Assert: another key, an edited payload, a truncated signature: all refused as "signature".
    for key, data, sig in [
        (theirs.public_path, payload, signature),
        (ours.public_path, canonical_json({"version": 2}), signature),
        (ours.public_path, payload, signature[:-1]),
    ]:
        with pytest.raises(VerificationError) as err:
            verify_signature(load_public_key(key), data, sig)
        assert err.value.check == "signature"


def test_load_refuses_missing_garbage_and_wrong_key_type(tmp_path) -> None:
    # Prepare: a PEM key of another algorithm (P-256).
    ec_key = generate_private_key(SECP256R1())
    (tmp_path / "ec.key").write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (tmp_path / "ec.pub").write_bytes(
        ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "junk.pub").write_text("not a key")

    # Execute / Assert: each error names the file.
    with pytest.raises(KeyFileError, match=r"missing\.key does not exist"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match=r"ec\.key.*Ed25519"):
        load_private_key(tmp_path / "ec.key")
    with pytest.raises(KeyFileError, match=r"ec\.pub.*Ed25519"):
        load_public_key(tmp_path / "ec.pub")
    with pytest.raises(KeyFileError, match=r"junk\.pub"):
        load_public_key(tmp_path / "junk.pub")


def test_load_private_key_warns_when_others_may_read_it(tmp_path, caplog) -> None:
    # Prepare
    pair = generate_keypair(tmp_path)
    pair.private_path.chmod(0o644)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedretrain"):
        load_private_key(pair.private_path)

    # Assert
    assert "644" in caplog.text and "chmod 600" in caplog.text


def test_canonical_json_is_sorted_compact_utf8_and_refuses_nan() -> None:
    # Execute / Assert: key order does not matter; no spaces; UTF-8 rather than \\u escapes.
    assert canonical_json({"b": 1, "a": [1.5, None, "é"]}) == '{"a":[1.5,null,"é"],"b":1}'.encode()
    assert canonical_json({"a": 1, "b": 2}) == canonical_json({"b": 2, "a": 1})

    # Assert: JSON has no NaN or infinity; a signed document must not carry one.
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            canonical_json({"epsilon": bad})

"""A published version as bytes, and the checks every reader runs before using it.

A version is four files. ``adapter_model.safetensors`` and ``adapter_config.json``
are exactly what peft's ``save_pretrained`` wrote; ``manifest.json`` is the
canonical JSON of the manifest (its format is documented in
:mod:`fedretrain.registry.manifest`: version, parent, times, key id, file hashes,
base model, LoRA settings, run, sites, gate) and ``manifest.sig`` the raw 64-byte
Ed25519 signature of those exact bytes. A rollback travels as a separate signed
record (:class:`RollbackRecord`) that names the older version to re-admit::

    {"kind": "rollback", "sequence": 1, "target_version": 2, "from_version": 3,
     "created_at": "2026-11-21T10:00:00Z", "reason": str, "key_id": str}

A version sent as champion also carries the signed champion pointer record that made it
champion (``VersionBundle.pointer``, :mod:`fedretrain.registry.pointer`); it travels as
``pointer`` / ``pointer-signature`` beside the version's files and is not stored with them.

:func:`verify_bundle` is shared by the registry and by the sites: it fails closed
and raises :class:`~fedretrain.errors.VerificationError` naming the first check
that failed; nothing is installed unless every check passes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedretrain.atomic import atomic_write_bytes
from fedretrain.errors import VerificationError
from fedretrain.registry.base_model import base_model_identity
from fedretrain.registry.manifest import (
    MANIFEST_FORMAT,
    build_manifest,
    check_fields,
    check_manifest,
    format_time,
    parse_json_object,
    parse_signed_json,
    parse_time,
    sha256_hex,
    utc_now,
)
from fedretrain.registry.pointer import ChampionPointer
from fedretrain.registry.signing import canonical_json, key_id, sign, verify_signature

__all__ = [
    "ADAPTER_FILES",
    "MANIFEST_FORMAT",
    "RollbackRecord",
    "VersionBundle",
    "base_model_identity",
    "build_manifest",
    "format_time",
    "parse_time",
    "sha256_hex",
    "utc_now",
    "verify_bundle",
    "verify_rollback",
]

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
MANIFEST_FILE, SIGNATURE_FILE = "manifest.json", "manifest.sig"

_ROLLBACK_FIELDS: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "sequence": (int,),
    "target_version": (int,),
    "from_version": (int,),
    "created_at": (str,),
    "reason": (str,),
    "key_id": (str,),
}


@dataclass(frozen=True)
class VersionBundle:
    """One published version: signed manifest bytes, signature, adapter files by name, and,
    when it is sent as champion, the signed pointer record that made it champion."""

    manifest_bytes: bytes
    signature: bytes
    files: Mapping[str, bytes]
    pointer: ChampionPointer | None = None

    @classmethod
    def signed(
        cls, manifest: Mapping[str, Any], files: Mapping[str, bytes], private_key: Ed25519PrivateKey
    ) -> VersionBundle:
        """Serialise ``manifest`` canonically and sign it (ValueError on NaN/inf in it)."""
        manifest_bytes = canonical_json(dict(manifest))
        return cls(manifest_bytes, sign(private_key, manifest_bytes), dict(files))

    @property
    def manifest(self) -> dict[str, Any]:
        """The parsed manifest (VerificationError ``manifest`` if it is not a JSON object)."""
        return parse_json_object(self.manifest_bytes, "manifest")

    @property
    def version(self) -> int:
        """The manifest's version number."""
        version = self.manifest.get("version")
        if type(version) is not int:
            raise VerificationError("manifest", f"'version' must be an integer, got {version!r}")
        return version

    @property
    def nbytes(self) -> int:
        """Total size of everything that travels."""
        pointer = 0 if self.pointer is None else len(self.pointer.payload_bytes) + len(self.pointer.signature)
        return len(self.manifest_bytes) + len(self.signature) + sum(len(v) for v in self.files.values()) + pointer

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> VersionBundle:
        """Read a version directory. Missing adapter files are left out (``hashes`` then refuses)."""
        path = Path(path)
        manifest_bytes = _read_required(path / MANIFEST_FILE, "manifest")
        signature = _read_required(path / SIGNATURE_FILE, "signature")
        files = {name: (path / name).read_bytes() for name in ADAPTER_FILES if (path / name).is_file()}
        return cls(manifest_bytes, signature, files)

    def write_to(self, directory: str | os.PathLike[str]) -> None:
        """Write the adapter files, then the manifest and its signature, each atomically."""
        directory = Path(directory)
        for name, data in self.files.items():
            if name not in ADAPTER_FILES:
                raise VerificationError("hashes", f"refusing to write unexpected file {name!r}")
            atomic_write_bytes(directory / name, data)
        atomic_write_bytes(directory / MANIFEST_FILE, self.manifest_bytes)
        atomic_write_bytes(directory / SIGNATURE_FILE, self.signature)

    def to_mapping(self) -> dict[str, bytes]:
        """Flat ``str -> bytes`` form for a Flower ConfigRecord."""
        out = {"manifest": self.manifest_bytes, "signature": self.signature}
        out.update({f"file:{name}": data for name, data in self.files.items()})
        if self.pointer is not None:
            out.update(self.pointer.to_mapping())
        return out

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> VersionBundle:
        """Inverse of :meth:`to_mapping`; other keys (a rollback record) are ignored."""
        manifest_bytes = _bytes_value(mapping, "manifest", "manifest")
        signature = _bytes_value(mapping, "signature", "signature")
        files = {
            key[len("file:") :]: _bytes_value(mapping, key, "hashes") for key in mapping if key.startswith("file:")
        }
        return cls(manifest_bytes, signature, files, ChampionPointer.from_mapping(mapping))


@dataclass(frozen=True)
class RollbackRecord:
    """A signed order to re-admit an older version: canonical JSON bytes and signature."""

    payload_bytes: bytes
    signature: bytes

    @property
    def record(self) -> dict[str, Any]:
        """The parsed record (VerificationError ``rollback`` if it is not canonical JSON)."""
        return parse_signed_json(self.payload_bytes, "rollback")

    def to_mapping(self) -> dict[str, bytes]:
        """Flat ``str -> bytes`` form for a Flower ConfigRecord."""
        return {"rollback": self.payload_bytes, "rollback-signature": self.signature}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> RollbackRecord | None:
        """Inverse of :meth:`to_mapping`; None when the mapping carries no rollback."""
        if "rollback" not in mapping:
            return None
        return cls(
            _bytes_value(mapping, "rollback", "rollback"), _bytes_value(mapping, "rollback-signature", "signature")
        )


_WITHDRAWAL_FIELDS: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "version": (int,),
    "created_at": (str,),
    "reason": (str,),
    "key_id": (str,),
}


@dataclass(frozen=True)
class WithdrawalRecord:
    """A signed order to take a pending version off trial: the staged rollout's rollback at its
    canaries (server/cycle/rollout.py). It names one version; that version can never become
    champion afterwards, so replaying the record changes nothing."""

    payload_bytes: bytes
    signature: bytes

    @property
    def record(self) -> dict[str, Any]:
        """The parsed record (VerificationError ``withdrawal`` if it is not canonical JSON)."""
        return parse_signed_json(self.payload_bytes, "withdrawal")

    def to_mapping(self) -> dict[str, bytes]:
        """Flat ``str -> bytes`` form for a Flower ConfigRecord."""
        return {"withdrawal": self.payload_bytes, "withdrawal-signature": self.signature}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> WithdrawalRecord:
        """Inverse of :meth:`to_mapping` (VerificationError when it carries none)."""
        return cls(
            _bytes_value(mapping, "withdrawal", "withdrawal"),
            _bytes_value(mapping, "withdrawal-signature", "signature"),
        )


def verify_withdrawal(record: WithdrawalRecord, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Check a withdrawal record's signature and form; return it.

    Raises
    ------
    VerificationError
        ``signature`` for a bad signature, ``withdrawal`` for anything else.
    """
    verify_signature(public_key, record.payload_bytes, record.signature)
    body = record.record
    check_fields(body, _WITHDRAWAL_FIELDS, "withdrawal", "withdrawal record")
    if body["kind"] != "withdrawal":
        raise VerificationError("withdrawal", f"kind is {body['kind']!r}, expected 'withdrawal'")
    if body["key_id"] != key_id(public_key):
        raise VerificationError("withdrawal", f"key_id {body['key_id']} is not the pinned key {key_id(public_key)}")
    if body["version"] < 1:
        raise VerificationError("withdrawal", "version must be >= 1")
    return body


def verify_bundle(
    bundle: VersionBundle,
    public_key: Ed25519PublicKey,
    *,
    now: datetime,
    last_accepted: int | None = None,
    allow_version: int | None = None,
    base_model_sha256: str | None = None,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    check_expiry: bool = True,
) -> dict[str, torch.Tensor]:
    """Run every check on ``bundle`` in order and return its adapter tensors.

    Checks: ``signature`` (with the pinned ``public_key``; then ``manifest``:
    canonical form, fields, format), ``hashes``, ``version`` (newer than
    ``last_accepted`` unless it is ``allow_version``, re-admitted by a verified
    rollback), ``expiry`` (``now < expires_at``; skipped when ``check_expiry`` is
    False, for audits), ``base_model``, ``safetensors``, ``shapes``, ``finite``.

    Raises
    ------
    VerificationError
        At the first failed check; ``check`` names it.
    """
    verify_signature(public_key, bundle.manifest_bytes, bundle.signature)
    manifest = parse_signed_json(bundle.manifest_bytes, "manifest")
    check_manifest(manifest, key_id(public_key))
    _check_hashes(manifest["files"], bundle.files)
    version = manifest["version"]
    if last_accepted is not None and version <= last_accepted and version != allow_version:
        raise VerificationError("version", f"version {version} is not newer than the accepted {last_accepted}")
    if now.tzinfo is None:
        raise ValueError("verify_bundle needs a timezone-aware 'now'")
    if check_expiry and not now < parse_time(manifest["expires_at"]):
        raise VerificationError("expiry", f"version {version} expired at {manifest['expires_at']}")
    if base_model_sha256 is not None and manifest["base_model"]["sha256"] != base_model_sha256:
        raise VerificationError(
            "base_model",
            f"built on base model {manifest['base_model']['sha256'][:16]}..., "
            f"this site has {base_model_sha256[:16]}...",
        )
    tensors = _load_tensors(bundle.files[ADAPTER_FILES[0]])
    if expected_shapes is not None:
        _check_shapes(tensors, expected_shapes)
    _check_finite(tensors)
    return tensors


def verify_rollback(
    record: RollbackRecord, public_key: Ed25519PublicKey, *, last_sequence: int | None
) -> dict[str, Any]:
    """Check a rollback record's signature, form, and that its sequence is new; return it.

    Raises
    ------
    VerificationError
        ``signature`` for a bad signature, ``rollback`` for anything else.
    """
    verify_signature(public_key, record.payload_bytes, record.signature)
    body = record.record
    check_fields(body, _ROLLBACK_FIELDS, "rollback", "rollback record")
    if body["kind"] != "rollback":
        raise VerificationError("rollback", f"kind is {body['kind']!r}, expected 'rollback'")
    if body["key_id"] != key_id(public_key):
        raise VerificationError("rollback", f"key_id {body['key_id']} is not the pinned key {key_id(public_key)}")
    if body["sequence"] < 1 or body["target_version"] < 1:
        raise VerificationError("rollback", "sequence and target_version must be >= 1")
    if last_sequence is not None and body["sequence"] <= last_sequence:
        raise VerificationError(
            "rollback", f"sequence {body['sequence']} is not newer than {last_sequence} (a replayed rollback)"
        )
    return body


def _check_hashes(listed: dict[str, Any], shipped: Mapping[str, bytes]) -> None:
    for name in ADAPTER_FILES:
        if name not in listed:
            raise VerificationError("hashes", f"the manifest lists no hash for {name}")
        if name not in shipped:
            raise VerificationError("hashes", f"{name} is listed in the manifest but was not shipped")
    unexpected = sorted((set(listed) | set(shipped)) - set(ADAPTER_FILES))
    if unexpected:
        raise VerificationError(
            "hashes", f"unexpected files {unexpected}; a version holds exactly {list(ADAPTER_FILES)}"
        )
    for name in ADAPTER_FILES:
        if sha256_hex(shipped[name]) != listed[name]:
            raise VerificationError("hashes", f"{name} does not match its SHA-256 in the manifest")


def _load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    # safetensors.torch.load (not numpy) so bf16 adapters load as they were saved.
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:  # any parse failure of untrusted bytes is a refusal
        raise VerificationError("safetensors", f"cannot load {ADAPTER_FILES[0]}: {err}") from err
    if not tensors:
        raise VerificationError("safetensors", f"{ADAPTER_FILES[0]} holds no tensors")
    return tensors


def _check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        tensor = tensors[name]
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise VerificationError("finite", f"tensor '{name}' holds NaN or infinite values")


def _check_shapes(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    for name in sorted(set(tensors) | set(expected)):
        if name not in expected:
            raise VerificationError("shapes", f"unexpected tensor '{name}'")
        if name not in tensors:
            raise VerificationError("shapes", f"missing tensor '{name}'")
        if tuple(tensors[name].shape) != tuple(expected[name]):
            raise VerificationError(
                "shapes", f"tensor '{name}' has shape {tuple(tensors[name].shape)}, expected {tuple(expected[name])}"
            )


def _bytes_value(mapping: Mapping[str, Any], key: str, check: str) -> bytes:
    if key not in mapping:
        raise VerificationError(check, f"'{key}' is missing")
    value = mapping[key]
    if not isinstance(value, bytes):
        raise VerificationError(check, f"'{key}' must be bytes, got {type(value).__name__}")
    return value


def _read_required(path: Path, check: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise VerificationError(check, f"cannot read {path}: {err.strerror or err}") from err

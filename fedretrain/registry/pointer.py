"""Signed champion pointer records: every move of the champion, as a hash-linked chain.

Each move (publish, approve, rollback) is one record, the canonical JSON of::

    {"kind": "champion", "sequence": 3, "version": 2, "reason": "approve",
     "created_at": "2026-11-21T10:00:00Z", "manifest_sha256": "<sha256 of version 2's manifest.json>",
     "previous_sha256": "<sha256 of record 2's bytes>",  # null for record 1
     "rollback_sequence": null,                          # the rollback record's sequence for a rollback
     "key_id": "<16 hex: the signing key>"}

signed with the coordinator's Ed25519 key like a manifest (raw 64-byte signature of
those exact bytes). Sequences run 1, 2, 3, ... without gaps, and each record names
the hash of the one before it, so a record cannot be removed from the middle,
reordered or replayed without breaking the chain; the manifest hash binds the
record to exactly one version's bytes.

The champion is what the last record of a verified chain says. The pointer of the
current champion also travels with the version to the sites (``pointer`` and
``pointer-signature`` in the ``query.publish`` message), and a site refuses a
record that is not signed by its pinned key or not newer than the last it accepted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedretrain.errors import VerificationError
from fedretrain.registry.manifest import check_fields, format_time, parse_signed_json, sha256_hex
from fedretrain.registry.signing import canonical_json, key_id, sign, verify_signature

REASONS = ("publish", "approve", "rollback")
_FIELDS: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "sequence": (int,),
    "version": (int,),
    "reason": (str,),
    "created_at": (str,),
    "manifest_sha256": (str,),
    "previous_sha256": (str, type(None)),
    "rollback_sequence": (int, type(None)),
    "key_id": (str,),
}


@dataclass(frozen=True)
class ChampionPointer:
    """One signed champion pointer record: canonical JSON bytes and their signature."""

    payload_bytes: bytes
    signature: bytes

    @property
    def record(self) -> dict[str, Any]:
        """The parsed record (VerificationError ``pointer`` if it is not canonical JSON)."""
        return parse_signed_json(self.payload_bytes, "pointer")

    @property
    def sha256(self) -> str:
        """What the next record names as its ``previous_sha256``."""
        return sha256_hex(self.payload_bytes)

    def to_mapping(self) -> dict[str, bytes]:
        """Flat ``str -> bytes`` form for a Flower ConfigRecord."""
        return {"pointer": self.payload_bytes, "pointer-signature": self.signature}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> ChampionPointer | None:
        """Inverse of :meth:`to_mapping`; None when the mapping carries no pointer."""
        if "pointer" not in mapping:
            return None
        payload, signature = mapping["pointer"], mapping.get("pointer-signature", b"")
        if not isinstance(payload, bytes) or not isinstance(signature, bytes):
            raise VerificationError("pointer", "'pointer' and 'pointer-signature' must be bytes")
        return cls(payload, signature)


def sign_pointer(
    private_key: Ed25519PrivateKey,
    *,
    sequence: int,
    version: int,
    reason: str,
    created_at: datetime,
    manifest_bytes: bytes,
    previous: ChampionPointer | None,
    rollback_sequence: int | None = None,
) -> ChampionPointer:
    """Sign the record that makes ``version`` champion, linked to ``previous`` (None: the first)."""
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
    body = {
        "kind": "champion",
        "sequence": sequence,
        "version": version,
        "reason": reason,
        "created_at": format_time(created_at),
        "manifest_sha256": sha256_hex(manifest_bytes),
        "previous_sha256": None if previous is None else previous.sha256,
        "rollback_sequence": rollback_sequence,
        "key_id": key_id(private_key.public_key()),
    }
    payload = canonical_json(body)
    return ChampionPointer(payload, sign(private_key, payload))


def verify_pointer(
    pointer: ChampionPointer, public_key: Ed25519PublicKey, *, last_sequence: int | None = None
) -> dict[str, Any]:
    """Check one record's signature and form, and that its sequence is newer than ``last_sequence``.

    Raises
    ------
    VerificationError
        ``signature`` for a bad or missing signature, ``pointer`` for anything else.
    """
    verify_signature(public_key, pointer.payload_bytes, pointer.signature)
    body = pointer.record
    check_fields(body, _FIELDS, "pointer", "champion pointer")
    if body["kind"] != "champion":
        raise VerificationError("pointer", f"kind is {body['kind']!r}, expected 'champion'")
    if body["key_id"] != key_id(public_key):
        raise VerificationError("pointer", f"key_id {body['key_id']} is not the pinned key {key_id(public_key)}")
    if body["sequence"] < 1 or body["version"] < 1:
        raise VerificationError("pointer", "sequence and version must be >= 1")
    if body["reason"] not in REASONS:
        raise VerificationError("pointer", f"reason {body['reason']!r} is not one of {list(REASONS)}")
    if (body["reason"] == "rollback") != (body["rollback_sequence"] is not None):
        raise VerificationError("pointer", "a rollback pointer, and only one, names a rollback_sequence")
    if last_sequence is not None and body["sequence"] <= last_sequence:
        raise VerificationError(
            "pointer", f"sequence {body['sequence']} is not newer than {last_sequence} (a replayed pointer record)"
        )
    return body


def verify_chain(
    records: Sequence[tuple[int, ChampionPointer]], public_key: Ed25519PublicKey, *, folder: str = "pointers"
) -> list[dict[str, Any]]:
    """Verify a whole chain, given as ``(number in the file name, record)`` in file order.

    Every record verifies with ``public_key``; record ``i`` (from 1) is in file ``i``,
    says sequence ``i`` and names the hash of record ``i - 1`` (null for the first).

    Raises
    ------
    VerificationError
        At the first break, naming the record's file (``folder/000003.json``).
    """
    bodies: list[dict[str, Any]] = []
    previous: ChampionPointer | None = None
    for expected, (number, pointer) in enumerate(records, start=1):
        where = f"{folder}/{number:06d}.json"
        try:
            body = verify_pointer(pointer, public_key)
        except VerificationError as err:
            raise VerificationError(err.check, f"{where}: {err.reason}") from err
        if number != expected:
            raise VerificationError("pointer", f"{where}: expected {expected:06d}.json before it (a record is missing)")
        if body["sequence"] != number:
            raise VerificationError(
                "pointer", f"{where}: its body says sequence {body['sequence']} (a replayed or moved record)"
            )
        link = None if previous is None else previous.sha256
        if body["previous_sha256"] != link:
            raise VerificationError(
                "pointer", f"{where}: does not link to the record before it (records removed, reordered or replaced)"
            )
        bodies.append(body)
        previous = pointer
    return bodies

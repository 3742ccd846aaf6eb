"""The signed manifest of a version: its format, its time stamps, and its schema check.

A manifest is a JSON object, signed as the exact bytes of
:func:`~fedretrain.registry.signing.canonical_json`::

    {"format": "fedretrain.version/1", "version": 3, "parent": 2,   # parent: int or null
     "created_at": "2026-11-21T10:00:00Z", "expires_at": "2026-12-21T10:00:00Z",
     "key_id": "<16 hex: the signing key>",
     "files": {"adapter_model.safetensors": "<sha256 hex>", "adapter_config.json": "<sha256 hex>"},
     "base_model": {"name": str, "sha256": "<base_model_identity>"[, "init_missing_seed": int]},
     "lora": {"r": int, "alpha": int, "dropout": float, "target_modules": [str, ...]},
     "run": {...}, "sites": {"s-<pseudonym>": {"epsilon": ...}}, "gate": {...}}

Times are UTC, whole seconds, with a trailing ``Z``. ``run``, ``sites`` and ``gate``
are free-form objects written by the coordinator (no NaN or infinity: JSON has none).
The schema is closed: a missing or an unknown field is refused, so a reader never
acts on a field it does not understand.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fedretrain.errors import VerificationError
from fedretrain.registry.signing import canonical_json

MANIFEST_FORMAT = "fedretrain.version/1"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

_NUMBER = (int, float)
# Field -> accepted JSON types. ``bool`` is always refused (Python counts it as an int).
MANIFEST_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "version": (int,),
    "parent": (int, type(None)),
    "created_at": (str,),
    "expires_at": (str,),
    "key_id": (str,),
    "files": (dict,),
    "base_model": (dict,),
    "lora": (dict,),
    "run": (dict,),
    "sites": (dict,),
    "gate": (dict,),
}
# Present only when it applies: a base model loaded with model.init_missing_seed.
_OPTIONAL_NESTED: dict[str, dict[str, tuple[type, ...]]] = {"base_model": {"init_missing_seed": (int,)}}
_NESTED_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "base_model": {"name": (str,), "sha256": (str,)},
    "lora": {"r": (int,), "alpha": _NUMBER, "dropout": _NUMBER, "target_modules": (list,)},
}


def utc_now() -> datetime:
    """Return the current UTC time, truncated to whole seconds."""
    return datetime.now(UTC).replace(microsecond=0)


def format_time(moment: datetime) -> str:
    """Format an aware datetime as ``2026-11-21T10:00:00Z`` (UTC, whole seconds)."""
    if moment.tzinfo is None:
        raise ValueError("format_time needs a timezone-aware datetime")
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    """Parse exactly the ``2026-11-21T10:00:00Z`` form into an aware UTC datetime.

    Raises
    ------
    ValueError
        For any other form.
    """
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


def sha256_hex(data: bytes) -> str:
    """Return the SHA-256 of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def build_manifest(
    *,
    version: int,
    parent: int | None,
    created_at: datetime,
    expires_at: datetime,
    key_id: str,
    files: Mapping[str, bytes],
    base_model: Mapping[str, Any],
    lora: Mapping[str, Any],
    run: Mapping[str, Any],
    sites: Mapping[str, Any],
    gate: Mapping[str, Any],
) -> dict[str, Any]:
    """Assemble a manifest dict; ``files`` maps each file name to its bytes (hashed here)."""
    return {
        "format": MANIFEST_FORMAT,
        "version": version,
        "parent": parent,
        "created_at": format_time(created_at),
        "expires_at": format_time(expires_at),
        "key_id": key_id,
        "files": {name: sha256_hex(data) for name, data in files.items()},
        "base_model": dict(base_model),
        "lora": dict(lora),
        "run": dict(run),
        "sites": dict(sites),
        "gate": dict(gate),
    }


def parse_json_object(payload: bytes, check: str) -> dict[str, Any]:
    """Parse ``payload`` as a JSON object, unverified (VerificationError ``check`` otherwise)."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise VerificationError(check, f"not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise VerificationError(check, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_signed_json(payload: bytes, check: str) -> dict[str, Any]:
    """Parse signed bytes that must be a JSON object in canonical form.

    A non-canonical encoding (other key order, spaces, duplicate keys) is refused:
    two readers must never see two meanings in one signed byte string.

    Raises
    ------
    VerificationError
        With ``check`` as its check name.
    """
    try:
        obj = json.loads(payload.decode("utf-8"))
        canonical = canonical_json(obj)
    except (UnicodeDecodeError, ValueError, TypeError) as err:
        raise VerificationError(check, f"not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise VerificationError(check, f"expected a JSON object, got {type(obj).__name__}")
    if canonical != payload:
        raise VerificationError(check, "not in canonical JSON form (sorted keys, no spaces)")
    return obj


def check_manifest(manifest: dict[str, Any], signer: str) -> None:
    """Check fields, types, format, version/parent, times, and that ``signer`` is the ``key_id``.

    Raises
    ------
    VerificationError
        ``check == "manifest"``.
    """
    check_fields(manifest, MANIFEST_FIELDS, "manifest", "manifest")
    if manifest["format"] != MANIFEST_FORMAT:
        raise VerificationError("manifest", f"unknown format {manifest['format']!r}, expected {MANIFEST_FORMAT}")
    for name, fields in _NESTED_FIELDS.items():
        check_fields(manifest[name], fields, "manifest", f"manifest '{name}'", _OPTIONAL_NESTED.get(name, {}))
    if not all(isinstance(module, str) for module in manifest["lora"]["target_modules"]):
        raise VerificationError("manifest", "lora.target_modules must be a list of strings")
    version, parent = manifest["version"], manifest["parent"]
    if version < 1 or (parent is not None and not 1 <= parent < version):
        raise VerificationError("manifest", f"bad version/parent {version}/{parent}")
    if manifest["key_id"] != signer:
        raise VerificationError("manifest", f"key_id {manifest['key_id']} is not the pinned key {signer}")
    try:
        created, expires = parse_time(manifest["created_at"]), parse_time(manifest["expires_at"])
    except ValueError as err:
        raise VerificationError("manifest", f"bad time: {err}") from err
    if not created < expires:
        raise VerificationError("manifest", "expires_at is not after created_at")


def check_fields(
    obj: dict[str, Any],
    fields: Mapping[str, tuple[type, ...]],
    check: str,
    what: str,
    optional: Mapping[str, tuple[type, ...]] | None = None,
) -> None:
    """Require exactly ``fields`` (and allow ``optional``), each of one of its JSON types (never a bool)."""
    optional = optional or {}
    if not set(fields) <= set(obj) <= set(fields) | set(optional):
        missing = sorted(set(fields) - set(obj))
        extra = sorted(set(obj) - set(fields) - set(optional))
        raise VerificationError(check, f"{what}: missing fields {missing}, unexpected fields {extra}")
    for name, types in {**fields, **{k: v for k, v in optional.items() if k in obj}}.items():
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, types):
            allowed = "/".join(t.__name__ for t in types)
            raise VerificationError(check, f"{what}: field '{name}' must be {allowed}, got {value!r}")

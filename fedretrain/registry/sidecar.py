"""The registry's side files: the pinned key, the gate decision log, the site pseudonym key.

None of them is a version. ``registry.json`` pins the registry to one signing key
at the first publish: ``{"format": "fedretrain.registry/1", "key_id", "public_key_pem"}``;
publish, approve and rollback with any other key are refused. Decisions are appended to ``decisions.jsonl`` (one
sorted-key JSON object per line, rewritten atomically: the file is small).
Pseudonyms are ``s-`` + the first 12 hex digits of HMAC-SHA256 of the site id
under a 32-byte random key kept beside the registry (0600): stable for one
registry, unlinkable to the site id without the key, so manifests and logs can
name sites without naming them.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from hashlib import sha256
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedretrain.atomic import atomic_write_bytes, atomic_write_json
from fedretrain.errors import KeyFileError, RegistryError
from fedretrain.registry.signing import key_id, public_key_from_pem, public_key_pem

REGISTRY_FORMAT = "fedretrain.registry/1"
PSEUDONYM_KEY_BYTES = 32


def write_pin(path: Path, public_key: Ed25519PublicKey) -> None:
    """Write ``registry.json`` pinning ``public_key``."""
    atomic_write_json(
        path,
        {
            "format": REGISTRY_FORMAT,
            "key_id": key_id(public_key),
            "public_key_pem": public_key_pem(public_key).decode("ascii"),
        },
        mode=0o644,
    )


def read_pin(path: Path) -> Ed25519PublicKey:
    """Read the pinned public key from ``registry.json``.

    Raises
    ------
    RegistryError
        If the file is missing, of another format, or its key id does not match its key.
    """
    if not path.is_file():
        raise RegistryError(f"{path} does not exist: nothing was published in {path.parent} yet")
    try:
        pinned = json.loads(path.read_text(encoding="utf-8"))
        if pinned.get("format") != REGISTRY_FORMAT:
            raise RegistryError(f"{path} has format {pinned.get('format')!r}, expected {REGISTRY_FORMAT}")
        key = public_key_from_pem(str(pinned["public_key_pem"]).encode(), source=str(path))
    except (ValueError, AttributeError, KeyError, KeyFileError) as err:
        raise RegistryError(f"{path} is not a valid registry pin: {err}") from err
    if key_id(key) != pinned.get("key_id"):
        raise RegistryError(f"{path}: key_id does not match its public key")
    return key


def append_decision(path: Path, decision: Mapping[str, Any]) -> None:
    """Append ``decision`` as one JSON line (the caller holds the registry lock)."""
    try:
        line = json.dumps(dict(decision), sort_keys=True, allow_nan=False) + "\n"
    except (ValueError, TypeError) as err:
        raise RegistryError(f"gate decision is not plain JSON: {err}") from err
    old = path.read_bytes() if path.is_file() else b""
    atomic_write_bytes(path, old + line.encode("utf-8"), mode=0o644)


def read_decisions(path: Path) -> list[dict[str, Any]]:
    """Every decision in ``path``, oldest first ([] if there is no file)."""
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            out.append(json.loads(line))
        except ValueError as err:
            raise RegistryError(f"{path}:{number}: not JSON: {err}") from err
    return out


def pseudonym(key_path: Path, site_id: str, lock: Callable[[], AbstractContextManager[None]]) -> str:
    """Return ``s-<12 hex>`` for ``site_id``, making the key under ``lock`` on first use."""
    if not key_path.is_file():
        with lock():
            if not key_path.is_file():
                atomic_write_bytes(key_path, secrets.token_bytes(PSEUDONYM_KEY_BYTES), mode=0o600)
    key = key_path.read_bytes()
    if len(key) != PSEUDONYM_KEY_BYTES:
        raise RegistryError(f"{key_path} must hold {PSEUDONYM_KEY_BYTES} bytes, holds {len(key)}")
    return "s-" + hmac.new(key, site_id.encode("utf-8"), sha256).hexdigest()[:12]

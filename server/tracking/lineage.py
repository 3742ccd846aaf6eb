"""The registry's versions as an export copies them, and which one is champion.

The champion is what the signed chain of pointer records says, verified against a key
(never what ``champion.json`` claims), because a tracker's ``champion`` alias is what a
downstream job loads (``models:/NAME@champion``). The key is the coordinator's own during a
cycle, ``--pubkey`` from the command line; without one, the key pinned in the registry's
own ``registry.json``, which proves only that the folder agrees with itself (as
``fedretrain registry verify`` without ``--pubkey``): the export says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedretrain.errors import RegistryError
from fedretrain.registry.lifecycle import rollback_spans, version_status
from fedretrain.registry.signing import key_id
from fedretrain.registry.store import Registry


@dataclass(frozen=True)
class Version:
    """One verified version: its number, folder, manifest and status (champion, pending, ...)."""

    number: int
    folder: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    status: str


@dataclass(frozen=True)
class Lineage:
    """A registry's verified versions, its champion and whose key vouched for them."""

    root: Path
    key_id: str
    versions: tuple[Version, ...]
    champion: int | None
    authenticated: bool  # verified with a key from outside the registry folder


def read_lineage(root: Path, public_key: Ed25519PublicKey | None) -> Lineage | None:
    """The registry at ``root`` verified with ``public_key`` (default: its own pin); None before
    anything was published there.

    Raises
    ------
    RegistryError
        Naming what failed, when any version, the champion chain or a rollback record does
        not verify (the audit of ``fedretrain registry verify``).
    """
    registry = Registry(root)
    if not (registry.root / "registry.json").is_file():
        return None
    key = public_key or registry.public_key()
    problems = registry.check(key).problems
    if problems:
        raise RegistryError(f"{registry.root} does not verify: " + "; ".join(problems))
    head = registry.verified_champion(key)
    champion = None if head is None else head.version
    rollbacks = rollback_spans(record for _, record in registry.rollbacks())
    versions = []
    for number in registry.versions():
        folder = registry.version_dir(number)
        status = version_status(
            number,
            champion=champion,
            approved=(folder / "approval.json").is_file(),
            rollbacks=rollbacks,
            withdrawn=(folder / "withdrawal.json").is_file(),
        )
        manifest_sha256 = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
        versions.append(Version(number, folder, registry.manifest(number), manifest_sha256, status))
    return Lineage(
        root=registry.root.resolve(),
        key_id=key_id(key),
        versions=tuple(versions),
        champion=champion,
        authenticated=public_key is not None,
    )

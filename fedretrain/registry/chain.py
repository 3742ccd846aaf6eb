"""Which version is champion, as far as a key from outside the registry can tell.

:func:`verified_head` reads ``pointers/`` (see :mod:`fedretrain.registry.pointer`) and
checks, against the given public key:

- the chain itself: every record signed, numbered 1, 2, 3, ... in its file name and its
  body, each linked to the hash of the one before;
- each record against the versions: the version exists and its ``manifest.json`` has the
  hash the record names; a publish or an approval moves the champion forward, a rollback
  back, and names a signed rollback record from the previous champion to its version;
  an approval record names a version with a signed ``approval.json``;
- the signed artefacts against the chain, so that removing the newest records is seen too:
  every signed rollback record and every approval has its pointer record, and every version
  without a signed approval request (``approval.required``) was published straight to
  champion, so it has a publish record;
- ``champion.json``, the convenience copy, says what the last record says.

A publish killed between renaming its version into place and writing its record leaves a version
that no record names; it is refused like a removed record, and the message says how to recover
(no site ever received that version: delivery follows the record).

What it cannot see: the folder rolled back whole to an earlier state (the newest version
directories removed with their records). Sites remember the newest version and pointer they
accepted and refuse to go back; keep a copy of the registry elsewhere.

Registries older than signed pointers have ``champion.json`` and no ``pointers/``; they are
refused (a deleted chain looks the same), with a message saying to publish into a new registry
folder. Signing a first record for whatever ``champion.json`` says would sign an unverified claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedretrain.errors import FedretrainError, RegistryError, VerificationError
from fedretrain.registry.bundle import verify_rollback
from fedretrain.registry.manifest import sha256_hex
from fedretrain.registry.pointer import ChampionPointer, verify_chain

if TYPE_CHECKING:
    from fedretrain.registry.store import Registry


@dataclass(frozen=True)
class ChainHead:
    """The last record of a verified chain: the champion, and the record that made it so."""

    pointer: ChampionPointer
    record: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.record["version"])


def verified_head(registry: Registry, public_key: Ed25519PublicKey) -> ChainHead | None:
    """The champion per the verified chain; None when no version was ever champion.

    Raises
    ------
    RegistryError
        Naming the file at fault, when anything in the module docstring's list fails.
    """
    folder = registry.root / "pointers"
    records = registry.pointers()
    if not records and (registry.root / "champion.json").is_file():
        raise RegistryError(
            f"{registry.root}/champion.json is not backed by a signed champion chain ({folder} is empty): "
            "the registry predates signed champion pointers, or its chain was deleted. There is no in-place "
            "migration: publish into a new registry folder (sites then clear their model store, since version "
            "numbers start again at 1)"
        )
    try:
        bodies = verify_chain(records, public_key, folder=str(folder))
    except VerificationError as err:
        raise RegistryError(err.reason) from err
    previous: dict[str, Any] | None = None
    for (number, _), body in zip(records, bodies, strict=True):
        _check_record(registry, public_key, f"{folder}/{number:06d}.json", body, previous)
        previous = body
    _check_coverage(registry, public_key, bodies)
    head = ChainHead(records[-1][1], bodies[-1]) if records else None
    _check_copy(registry, head)
    return head


def _check_record(
    registry: Registry, key: Ed25519PublicKey, where: str, body: dict[str, Any], previous: dict[str, Any] | None
) -> None:
    version, reason = body["version"], body["reason"]
    if version not in registry.versions():
        raise RegistryError(f"{where}: names version {version}, which does not exist")
    manifest = registry.version_dir(version) / "manifest.json"
    if sha256_hex(manifest.read_bytes()) != body["manifest_sha256"]:
        raise RegistryError(f"{where}: {manifest} is not the manifest this record made champion")
    before = None if previous is None else previous["version"]
    if reason == "rollback":
        _check_rollback_record(registry, key, where, body, before)
    elif before is not None and version <= before:
        raise RegistryError(f"{where}: a {reason} moves the champion forward, but {before} -> {version}")
    if reason == "approve" and not (registry.version_dir(version) / "approval.json").is_file():
        raise RegistryError(f"{where}: approves version {version}, which has no approval.json")


def _check_rollback_record(
    registry: Registry, key: Ed25519PublicKey, where: str, body: dict[str, Any], before: int | None
) -> None:
    sequence = body["rollback_sequence"]
    record = dict(registry.rollbacks()).get(sequence)
    if record is None:
        raise RegistryError(f"{where}: names rollback record {sequence}, which does not exist")
    try:
        rollback = verify_rollback(record, key, last_sequence=None)
    except VerificationError as err:
        raise RegistryError(f"{registry.root}/rollbacks/{sequence:06d}.json: {err}") from err
    if (rollback["from_version"], rollback["target_version"]) != (before, body["version"]):
        raise RegistryError(
            f"{where}: moves {before} -> {body['version']}, but rollback record {sequence} "
            f"moves {rollback['from_version']} -> {rollback['target_version']}"
        )


def _check_coverage(registry: Registry, key: Ed25519PublicKey, bodies: list[dict[str, Any]]) -> None:
    # A signed artefact without its pointer record means records were cut from the end.
    moved = {(body["reason"], body["version"]) for body in bodies}
    rolled = {body["rollback_sequence"] for body in bodies if body["reason"] == "rollback"}
    for sequence, _ in registry.rollbacks():
        if sequence not in rolled:
            raise RegistryError(
                f"{registry.root}/rollbacks/{sequence:06d}.json has no pointer record in "
                f"{registry.root}/pointers (pointer records removed?)"
            )
    for version in registry.versions():
        folder = registry.version_dir(version)
        if (folder / "approval.json").is_file() and ("approve", version) not in moved:
            raise RegistryError(
                f"{folder}/approval.json has no pointer record in {registry.root}/pointers (pointer records removed?)"
            )
        if not registry.approval_requested(version, key) and ("publish", version) not in moved:
            raise RegistryError(
                f"version {version} was published straight to champion, but no record in "
                f"{registry.root}/pointers says so: pointer records were removed, or a publish "
                f"was interrupted after writing {folder} (then no site has it: move it out of "
                f"versions/, e.g. to {folder.parent}/.interrupted-{version:06d}, and publish again)"
            )


def _check_copy(registry: Registry, head: ChainHead | None) -> None:
    path = registry.root / "champion.json"
    try:
        copy = registry.champion_record()
    except FedretrainError as err:
        raise RegistryError(f"{path}: {err}") from err
    if head is None:
        if copy is not None:
            raise RegistryError(f"{path} names version {copy['version']}, but no pointer record exists")
        return
    want = {
        "version": head.version,
        "reason": head.record["reason"],
        "rollback_sequence": head.record["rollback_sequence"],
    }
    got = None if copy is None else {name: copy.get(name) for name in want}
    if got != want:
        raise RegistryError(
            f"{path} says {got}, but the last signed pointer record ({head.record['sequence']:06d}) says {want}"
        )

"""Audit a registry: does every version still verify, and does everything point somewhere real?

Used by ``fedretrain registry verify`` and before ``approve`` / ``rollback`` (a
version that no longer verifies is never made champion again). Problems make an
audit fail; notes are for the operator (an expired version, a staging directory
left by an interrupted publish: harmless, since readers ignore it).

With a public key from outside the folder (``registry verify --pubkey``) the audit
also refuses a ``registry.json`` pinned to another key. Without one it can only use
the key stored in ``registry.json``: that shows the folder is consistent with itself,
not who wrote it (anyone who can edit the folder can re-sign it all and swap the pin).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedretrain.errors import FedretrainError, RegistryError, VerificationError
from fedretrain.registry.bundle import WithdrawalRecord, verify_bundle, verify_rollback, verify_withdrawal
from fedretrain.registry.chain import verified_head
from fedretrain.registry.manifest import parse_signed_json, parse_time, utc_now
from fedretrain.registry.signing import key_id, verify_signature

if TYPE_CHECKING:
    from fedretrain.registry.store import Registry


@dataclass(frozen=True)
class CheckReport:
    """What an audit found: ``problems`` make it fail, ``notes`` are for the operator."""

    problems: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when there is no problem (notes do not count)."""
        return not self.problems


def inspect_version(registry: Registry, version: int, public_key: Ed25519PublicKey) -> CheckReport:
    """Verify one version with every check but freshness; an expired version is a note."""
    where = f"version {version}"
    try:
        bundle = registry.bundle(version)
        verify_bundle(bundle, public_key, now=utc_now(), check_expiry=False)
    except FedretrainError as err:
        return CheckReport((f"{where}: {err}",), ())
    manifest = bundle.manifest
    problems, notes = [], []
    if manifest["version"] != version:
        problems.append(f"{where}: its manifest says version {manifest['version']}")
    if manifest["parent"] is not None and manifest["parent"] not in registry.versions():
        problems.append(f"{where}: parent version {manifest['parent']} does not exist")
    if parse_time(manifest["expires_at"]) <= utc_now():
        notes.append(f"{where}: expired at {manifest['expires_at']}; sites refuse it")
    problems.extend(_approval_problems(registry.version_dir(version), version, public_key))
    problems.extend(_withdrawal_problems(registry.version_dir(version), version, public_key))
    return CheckReport(tuple(problems), tuple(notes))


def check_registry(registry: Registry, public_key: Ed25519PublicKey | None = None) -> CheckReport:
    """Audit every version, the champion chain, ``champion.json`` and every rollback record of ``registry``,
    against ``public_key`` (default: the key pinned in ``registry.json``)."""
    notes = [
        f"{path} was left by an interrupted publish; readers ignore it, it can be removed"
        for path in sorted((registry.root / "versions").glob(".staging-*"))
    ]
    if not registry.root.is_dir():
        return CheckReport((f"no registry at {registry.root}",), ())
    versions = registry.versions()
    problems = pin_problems(registry, public_key)
    try:
        key = public_key or registry.public_key()
    except RegistryError as err:
        empty = not versions and not registry.pointers() and not (registry.root / "champion.json").is_file()
        return CheckReport(() if empty else (str(err),), tuple(notes))
    for version in versions:
        report = inspect_version(registry, version, key)
        problems.extend(report.problems)
        notes.extend(report.notes)
    problems.extend(_champion_problems(registry, key, versions))
    problems.extend(_rollback_problems(registry, key, versions))
    problems.extend(_student_problems(registry, key, versions))
    return CheckReport(tuple(problems), tuple(notes))


def pin_problems(registry: Registry, public_key: Ed25519PublicKey | None) -> list[str]:
    """A problem when ``registry.json`` pins another key than ``public_key`` (None: nothing to compare)."""
    path = registry.root / "registry.json"
    if public_key is None:
        return []
    if not path.is_file():
        return [f"{path} is missing, but the registry holds versions"] if registry.versions() else []
    try:
        pinned = key_id(registry.public_key())
    except RegistryError as err:
        return [str(err)]
    given = key_id(public_key)
    return [] if pinned == given else [f"{path} pins signing key {pinned}, not the given key {given}"]


def _approval_problems(folder: Path, version: int, public_key: Ed25519PublicKey) -> list[str]:
    if not (folder / "approval.json").is_file():
        return []
    payload = (folder / "approval.json").read_bytes()
    signature = (folder / "approval.sig").read_bytes() if (folder / "approval.sig").is_file() else b""
    try:
        verify_signature(public_key, payload, signature)
        body = parse_signed_json(payload, "manifest")
    except VerificationError as err:
        return [f"version {version}: approval: {err}"]
    if body.get("kind") != "approval" or body.get("version") != version:
        return [f"version {version}: approval.json approves {body.get('kind')} {body.get('version')}"]
    return []


def _withdrawal_problems(folder: Path, version: int, public_key: Ed25519PublicKey) -> list[str]:
    if not (folder / "withdrawal.json").is_file():
        return []
    signature = (folder / "withdrawal.sig").read_bytes() if (folder / "withdrawal.sig").is_file() else b""
    try:
        body = verify_withdrawal(WithdrawalRecord((folder / "withdrawal.json").read_bytes(), signature), public_key)
    except VerificationError as err:
        return [f"version {version}: withdrawal: {err}"]
    if body["version"] != version:
        return [f"version {version}: withdrawal.json withdraws version {body['version']}"]
    if (folder / "approval.json").is_file():
        return [f"version {version} is both approved and withdrawn"]
    return []


def _champion_problems(registry: Registry, public_key: Ed25519PublicKey, versions: list[int]) -> list[str]:
    try:
        head = verified_head(registry, public_key)
    except (RegistryError, VerificationError, OSError) as err:
        return [str(err)]
    if head is not None and not registry.was_admitted(head.version):
        return [f"champion {head.version} waits for approval but was never approved"]
    return []


def _student_problems(registry: Registry, public_key: Ed25519PublicKey, versions: list[int]) -> list[str]:
    """Every stored student verifies against its teacher as stored (expiry aside: the teacher's note says it)."""
    from fedretrain.registry.student import StudentBundle, verify_student

    folder = registry.root / "students"
    if not folder.is_dir():
        return []
    problems = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        where = f"student {path.name}"
        if not path.name.isdigit() or int(path.name) not in versions:
            problems.append(f"{where}: no version {path.name} to be the student of")
            continue
        try:
            teacher = (registry.version_dir(int(path.name)) / "manifest.json").read_bytes()
            student = StudentBundle.from_dir(path)
            verify_student(student, public_key, teacher_manifest_bytes=teacher, now=utc_now(), check_expiry=False)
        except (FedretrainError, OSError) as err:
            problems.append(f"{where}: {err}")
    return problems


def _rollback_problems(registry: Registry, public_key: Ed25519PublicKey, versions: list[int]) -> list[str]:
    problems, last = [], None
    for sequence, record in registry.rollbacks():
        where = f"rollback record {sequence}"
        try:
            body = verify_rollback(record, public_key, last_sequence=last)
        except VerificationError as err:
            problems.append(f"{where}: {err}")
            continue
        finally:
            last = sequence
        if body["sequence"] != sequence:
            problems.append(f"{where}: its file name says {sequence}, its body says {body['sequence']}")
        for field in ("target_version", "from_version"):
            if body[field] not in versions:
                problems.append(f"{where}: {field} {body[field]} does not exist")
    return problems

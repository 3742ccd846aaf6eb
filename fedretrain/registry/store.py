"""The coordinator's model registry: signed versions on disk, a signed champion chain, signed rollbacks.

Layout under the registry root::

    registry.json      {"format": "fedretrain.registry/1", "key_id", "public_key_pem"}: written at the
                       first publish; pins the registry to one signing key
    versions/000001/   adapter_model.safetensors, adapter_config.json, manifest.json, manifest.sig,
                       [approval.required, approval.required.sig], [approval.json, approval.sig],
                       [withdrawal.json, withdrawal.sig] (a pending version taken back at its canaries)
    students/000001/   model.safetensors, config.json, student.json, student.sig: the student
                       distilled from version 1, signed and bound to it (:mod:`fedretrain.registry.student`)
    pointers/000001.json + .sig    signed champion pointer records, one per move of the champion,
                       hash-linked (:mod:`fedretrain.registry.pointer`): the champion is what the
                       last record of the verified chain says (:mod:`fedretrain.registry.chain`)
    champion.json      {"version", "set_at", "reason": publish|approve|rollback, "rollback_sequence"}:
                       a convenience copy of the last pointer record, for people and triggers; never
                       trusted (``registry verify`` refuses it when it disagrees with the chain)
    rollbacks/000001.json + .sig   signed rollback records, sequence 1, 2, 3, ...
    decisions.jsonl    one JSON line per gate decision
    pseudonym.key      32 random bytes (0600): the HMAC key behind site pseudonyms
    .lock              fcntl lock: one writer at a time

Readers never lock. Every file is replaced atomically, and a version directory is
built in ``versions/.staging-*`` and appears by one rename once complete, so a
crash leaves at most a staging directory that readers ignore. Nothing is ever
deleted: a rollback moves the champion and adds a record. Every write verifies the chain
against the signing key's public half first and refuses (writing nothing) when it does
not verify; the new record is written after the version, signature before record.

Registries written before signed pointers (a ``champion.json`` and no ``pointers/``) are
refused by every write and by ``registry verify``; see :mod:`fedretrain.registry.chain`.

A version's status (champion, pending, rolled-back, approved, superseded) is defined in
:mod:`fedretrain.registry.lifecycle`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedretrain.atomic import atomic_write_bytes, atomic_write_json
from fedretrain.errors import RegistryError
from fedretrain.registry.audit import CheckReport, check_registry, inspect_version
from fedretrain.registry.bundle import ADAPTER_FILES, RollbackRecord, VersionBundle, WithdrawalRecord, verify_bundle
from fedretrain.registry.chain import ChainHead, verified_head
from fedretrain.registry.lifecycle import rollback_spans, version_status
from fedretrain.registry.manifest import build_manifest, format_time, parse_time, utc_now
from fedretrain.registry.pointer import ChampionPointer, sign_pointer
from fedretrain.registry.sidecar import append_decision, pseudonym, read_decisions, read_pin, write_pin
from fedretrain.registry.signing import canonical_json, key_id, sign, verify_signature
from fedretrain.registry.student import StudentBundle, build_student_manifest, verify_student

APPROVAL_REQUIRED = "approval.required"
WITHDRAWAL = "withdrawal"
_NUMBERED = re.compile(r"[0-9]{6}")
_MAX_EXPIRY_DAYS = 100 * 365


def _write_manifest(staging: Path, manifest_bytes: bytes, signature: bytes) -> None:
    # Written after the adapter files: a staging dir without a manifest is never renamed into place.
    atomic_write_bytes(staging / "manifest.json", manifest_bytes, mode=0o644)
    atomic_write_bytes(staging / "manifest.sig", signature, mode=0o644)


class Registry:
    """A registry directory (see the module docstring). Cheap to construct; touches nothing."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """All complete versions, ascending (staging directories are ignored)."""
        return _numbered(self.root / "versions", want_dirs=True)

    def version_dir(self, version: int) -> Path:
        """The directory of an existing version (RegistryError if there is none)."""
        if version not in self.versions():
            raise RegistryError(f"no version {version} in {self.root} (have {self.versions()})")
        return self._dir(version)

    def champion(self) -> int | None:
        """The champion per ``champion.json`` (unverified: for display and triggers; decisions
        use :meth:`verified_champion`), or None before the first version became champion."""
        record = self.champion_record()
        return None if record is None else record["version"]

    def verified_champion(self, public_key: Ed25519PublicKey) -> ChainHead | None:
        """The champion per the chain of pointer records verified with ``public_key``.

        Raises
        ------
        RegistryError
            Naming the file at fault, if the chain does not verify (see :mod:`fedretrain.registry.chain`).
        """
        return verified_head(self, public_key)

    def pointers(self) -> list[tuple[int, ChampionPointer]]:
        """Every ``(number, record)`` in ``pointers/``, ascending; a missing .sig reads as b""."""
        return [
            (number, ChampionPointer(payload, signature))
            for number, payload, signature in _signed_files(self.root / "pointers")
        ]

    def approval_requested(self, version: int, public_key: Ed25519PublicKey) -> bool:
        """True if ``version`` carries an approval request signed with ``public_key``."""
        folder = self.version_dir(version)
        if not (folder / APPROVAL_REQUIRED).is_file():
            return False
        payload = (folder / APPROVAL_REQUIRED).read_bytes()
        signature = _read_or_empty(folder / f"{APPROVAL_REQUIRED}.sig")
        try:
            verify_signature(public_key, payload, signature)
        except ValueError:  # VerificationError
            return False
        return payload == _approval_request(version, public_key)

    def champion_record(self) -> dict[str, Any] | None:
        """The parsed ``champion.json`` (unverified), or None if there is none yet."""
        record = _read_json(self.root / "champion.json")
        if record is not None and (type(record.get("version")) is not int or record["version"] < 1):
            raise RegistryError(f"{self.root}/champion.json has no valid 'version'")
        return record

    def was_admitted(self, version: int) -> bool:
        """True if ``version`` was published straight to champion or approved: sites may have run it."""
        folder = self.version_dir(version)
        return not (folder / APPROVAL_REQUIRED).exists() or (folder / "approval.json").is_file()

    def rollbacks(self) -> list[tuple[int, RollbackRecord]]:
        """Every ``(sequence, record)`` in ``rollbacks/``, ascending; a missing .sig reads as b""."""
        return [
            (sequence, RollbackRecord(payload, signature))
            for sequence, payload, signature in _signed_files(self.root / "rollbacks")
        ]

    def status(self, version: int) -> str:
        """``champion``, ``pending``, ``rolled-back``, ``approved`` or ``superseded`` (see lifecycle),
        for display: with ``champion.json``'s champion (writers use the verified chain's)."""
        return self._status(version, self.champion())

    def bundle(self, version: int) -> VersionBundle:
        """The version's files as a :class:`VersionBundle` (unverified), with the last pointer
        record when that record names this version (sites verify it)."""
        bundle = VersionBundle.from_dir(self.version_dir(version))
        records = self.pointers()
        if not records:
            return bundle
        pointer = records[-1][1]
        try:
            names = pointer.record.get("version")
        except ValueError:  # an unreadable record; a site refuses the bundle without it
            return bundle
        return VersionBundle(
            bundle.manifest_bytes, bundle.signature, bundle.files, pointer if names == version else None
        )

    def manifest(self, version: int) -> dict[str, Any]:
        """The version's parsed manifest (unverified)."""
        manifest = _read_json(self.version_dir(version) / "manifest.json")
        if manifest is None:
            raise RegistryError(f"version {version} has no manifest.json")
        return manifest

    def latest_rollback(self) -> RollbackRecord | None:
        """The rollback record with the highest sequence, or None."""
        records = self.rollbacks()
        return records[-1][1] if records else None

    def public_key(self) -> Ed25519PublicKey:
        """The signing key this registry is pinned to (``registry.json``)."""
        return read_pin(self.root / "registry.json")

    def decisions(self) -> list[dict[str, Any]]:
        """Every recorded gate decision, oldest first."""
        return read_decisions(self.root / "decisions.jsonl")

    # -- writing (one writer at a time) ---------------------------------------------------------

    def publish(
        self,
        adapter_dir: str | os.PathLike[str],
        *,
        signing_key: Ed25519PrivateKey,
        base_model: Mapping[str, Any],
        lora: Mapping[str, Any],
        run: Mapping[str, Any],
        sites: Mapping[str, Any],
        gate: Mapping[str, Any],
        expiry_days: float,
        require_approval: bool = False,
        now: datetime | None = None,
    ) -> int:
        """Sign and store the adapter in ``adapter_dir`` as the next version; return its number.

        The new version becomes champion unless ``require_approval``; then it waits,
        ``pending``, for :meth:`approve`. The adapter files are copied byte for byte.

        Raises
        ------
        RegistryError
            If the adapter files are missing, the manifest cannot be built (NaN in
            ``run``...), the result fails verification, or the key is not the pinned one.
        """
        if not 0 < expiry_days <= _MAX_EXPIRY_DAYS:  # also refuses NaN and infinity
            raise RegistryError(f"expiry_days must be in (0, {_MAX_EXPIRY_DAYS}], got {expiry_days}")
        files = _read_adapter(Path(adapter_dir))
        now = now or utc_now()
        with self._lock():
            self.check_signing_key(signing_key.public_key())
            head = self.verified_champion(signing_key.public_key())
            version = max(self.versions(), default=0) + 1
            manifest = build_manifest(
                version=version,
                parent=None if head is None else head.version,
                created_at=now,
                expires_at=now + timedelta(days=expiry_days),
                key_id=key_id(signing_key.public_key()),
                files=files,
                base_model=base_model,
                lora=lora,
                run=run,
                sites=sites,
                gate=gate,
            )
            try:
                bundle = VersionBundle.signed(manifest, files, signing_key)
                verify_bundle(bundle, signing_key.public_key(), now=now)
            except (ValueError, TypeError) as err:  # VerificationError is a ValueError
                raise RegistryError(f"refusing to publish {adapter_dir}: {err}") from err
            self._pin(signing_key.public_key(), create=True)
            self._install(version, bundle, signing_key if require_approval else None)
            if not require_approval:
                self._move_champion(signing_key, head, version, "publish", None, now)
        return version

    def approve(
        self, version: int, *, signing_key: Ed25519PrivateKey, approver: str, now: datetime | None = None
    ) -> None:
        """Sign an approval of a ``pending`` version and make it champion."""
        now = now or utc_now()
        with self._lock():
            head = self._pending_head(version, signing_key, "approved")
            self._require_valid(version)
            body = {
                "kind": "approval",
                "version": version,
                "approver": approver,
                "created_at": format_time(now),
                "key_id": key_id(signing_key.public_key()),
            }
            payload = canonical_json(body)
            # The signature first: approval.json alone is what marks a version approved.
            atomic_write_bytes(self._dir(version) / "approval.sig", sign(signing_key, payload), mode=0o644)
            atomic_write_bytes(self._dir(version) / "approval.json", payload, mode=0o644)
            self._move_champion(signing_key, head, version, "approve", None, now)

    def withdraw(
        self, version: int, *, signing_key: Ed25519PrivateKey, reason: str, now: datetime | None = None
    ) -> WithdrawalRecord:
        """Sign the withdrawal of a ``pending`` version (its staged rollout's rollback at the canaries).

        The champion does not move (a pending version never was champion); the version can
        no longer be approved, and the signed record is what tells the canaries to drop it.
        """
        now = now or utc_now()
        with self._lock():
            self._pending_head(version, signing_key, "withdrawn")
            body = {
                "kind": "withdrawal",
                "version": version,
                "reason": reason,
                "created_at": format_time(now),
                "key_id": key_id(signing_key.public_key()),
            }
            payload = canonical_json(body)
            record = WithdrawalRecord(payload, sign(signing_key, payload))
            # The signature first: withdrawal.json alone is what marks a version withdrawn.
            atomic_write_bytes(self._dir(version) / f"{WITHDRAWAL}.sig", record.signature, mode=0o644)
            atomic_write_bytes(self._dir(version) / f"{WITHDRAWAL}.json", payload, mode=0o644)
        return record

    def student(self, version: int) -> StudentBundle | None:
        """The student distilled from ``version`` as stored (unverified), or None."""
        folder = self.root / "students" / f"{version:06d}"
        return StudentBundle.from_dir(folder) if folder.is_dir() else None

    def publish_student(
        self,
        version: int,
        files: Mapping[str, bytes],
        *,
        signing_key: Ed25519PrivateKey,
        architecture: Mapping[str, Any],
        gate: Mapping[str, Any],
        distill: Mapping[str, Any],
        now: datetime | None = None,
    ) -> StudentBundle:
        """Sign and store the student of ``version`` (its gate passed); one student a version, never replaced.

        Raises
        ------
        RegistryError
            The version is missing or fails verification, it has a student already, the key is
            not the pinned one, or the signed student fails its own checks.
        """
        now = now or utc_now()
        with self._lock():
            self.check_signing_key(signing_key.public_key())
            self._require_valid(version)
            folder = self.root / "students"
            if (folder / f"{version:06d}").exists():
                raise RegistryError(f"version {version} has a student already; a student is never replaced")
            teacher = (self._dir(version) / "manifest.json").read_bytes()
            manifest = build_student_manifest(
                teacher_manifest_bytes=teacher,
                created_at=now,
                signer=signing_key.public_key(),
                files=files,
                architecture=architecture,
                gate=gate,
                distill=distill,
            )
            try:
                bundle = StudentBundle.signed(manifest, files, signing_key)
                verify_student(bundle, signing_key.public_key(), teacher_manifest_bytes=teacher, now=now)
            except (ValueError, TypeError) as err:  # VerificationError is a ValueError
                raise RegistryError(f"refusing to store the student of version {version}: {err}") from err
            folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
            staging.chmod(0o755)
            bundle.write_to(staging)
            os.rename(staging, folder / f"{version:06d}")
            _sync_dir(folder)
        return bundle

    def withdrawal(self, version: int) -> WithdrawalRecord | None:
        """The version's withdrawal record as stored (unverified), or None."""
        folder = self.version_dir(version)
        if not (folder / f"{WITHDRAWAL}.json").is_file():
            return None
        return WithdrawalRecord(
            (folder / f"{WITHDRAWAL}.json").read_bytes(), _read_or_empty(folder / f"{WITHDRAWAL}.sig")
        )

    def rollback(
        self, version: int, *, signing_key: Ed25519PrivateKey, reason: str, now: datetime | None = None
    ) -> RollbackRecord:
        """Make an older, once-admitted ``version`` champion again, with a signed record."""
        now = now or utc_now()
        with self._lock():
            self._pin(signing_key.public_key(), create=False)
            head = self.verified_champion(signing_key.public_key())
            champion = None if head is None else head.version
            self.version_dir(version)
            if champion is None or version >= champion:
                raise RegistryError(f"can only roll back to a version older than the champion ({champion})")
            if not any(p.record["version"] == version for _, p in self.pointers()):  # verified just above
                raise RegistryError(f"version {version} was never champion nor approved")
            self._require_valid(version)
            if parse_time(self.manifest(version)["expires_at"]) <= now:
                # Every site would refuse it, and the coordinator would keep re-sending it.
                raise RegistryError(
                    f"version {version} expired at {self.manifest(version)['expires_at']}; "
                    "roll back to a version that has not expired"
                )
            sequence = max((seq for seq, _ in self.rollbacks()), default=0) + 1
            body = {
                "kind": "rollback",
                "sequence": sequence,
                "target_version": version,
                "from_version": champion,
                "created_at": format_time(now),
                "reason": reason,
                "key_id": key_id(signing_key.public_key()),
            }
            payload = canonical_json(body)
            record = RollbackRecord(payload, sign(signing_key, payload))
            stem = self.root / "rollbacks" / f"{sequence:06d}"
            atomic_write_bytes(stem.with_suffix(".sig"), record.signature, mode=0o644)
            atomic_write_bytes(stem.with_suffix(".json"), record.payload_bytes, mode=0o644)
            self._move_champion(signing_key, head, version, "rollback", sequence, now)
        return record

    def record_decision(self, decision: Mapping[str, Any]) -> None:
        """Append one gate decision to ``decisions.jsonl``."""
        with self._lock():
            append_decision(self.root / "decisions.jsonl", decision)

    def pseudonym(self, site_id: str) -> str:
        """A stable ``s-<12 hex>`` pseudonym for ``site_id`` (see :mod:`fedretrain.registry.sidecar`)."""
        return pseudonym(self.root / "pseudonym.key", site_id, self._lock)

    # -- auditing --------------------------------------------------------------------------------

    def inspect(self, version: int, public_key: Ed25519PublicKey | None = None) -> CheckReport:
        """Verify one version (signature, hashes, tensors, approval); expiry is only a note."""
        return inspect_version(self, version, public_key or self.public_key())

    def verify(self, version: int, public_key: Ed25519PublicKey | None = None) -> list[str]:
        """The problems :meth:`inspect` finds in ``version`` (empty: it verifies)."""
        return list(self.inspect(version, public_key).problems)

    def check(self, public_key: Ed25519PublicKey | None = None) -> CheckReport:
        """Audit the whole registry: every version, the champion pointer, every rollback record."""
        return check_registry(self, public_key)

    # -- internals ---------------------------------------------------------------------------------

    def _status(self, version: int, champion: int | None) -> str:
        folder = self.version_dir(version)
        return version_status(
            version,
            champion=champion,
            approved=(folder / "approval.json").is_file(),
            rollbacks=rollback_spans(record for _, record in self.rollbacks()),
            withdrawn=(folder / f"{WITHDRAWAL}.json").is_file(),
        )

    def _pending_head(self, version: int, signing_key: Ed25519PrivateKey, done: str) -> ChainHead | None:
        """The verified chain's head, once the pin matches ``signing_key`` and ``version`` is pending
        (RegistryError otherwise: only a pending version can be ``done``). Call it under the lock."""
        self._pin(signing_key.public_key(), create=False)
        head = self.verified_champion(signing_key.public_key())
        status = self._status(version, None if head is None else head.version)
        if status != "pending":
            raise RegistryError(f"version {version} is {status}; only a pending version can be {done}")
        return head

    def _dir(self, version: int) -> Path:
        return self.root / "versions" / f"{version:06d}"

    def check_signing_key(self, public_key: Ed25519PublicKey) -> None:
        """Raise RegistryError unless ``public_key`` is the one this registry is pinned to
        (an empty registry accepts any key; its first publish pins it)."""
        if (self.root / "registry.json").is_file() or self.versions():
            self._pin(public_key, create=False)

    def _require_valid(self, version: int) -> None:
        problems = self.verify(version)
        if problems:
            raise RegistryError(f"version {version} fails verification: {'; '.join(problems)}")

    def _pin(self, public_key: Ed25519PublicKey, *, create: bool) -> None:
        # Only an empty registry takes a new pin: a lost registry.json must not let any key in.
        if create and not (self.root / "registry.json").is_file() and not self.versions():
            write_pin(self.root / "registry.json", public_key)
        pinned = key_id(self.public_key())
        if key_id(public_key) != pinned:
            raise RegistryError(f"{self.root} is pinned to signing key {pinned}; this key is {key_id(public_key)}")

    def _install(self, version: int, bundle: VersionBundle, request_key: Ed25519PrivateKey | None) -> None:
        folder = self.root / "versions"
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        staging.chmod(0o755)
        for name in ADAPTER_FILES:
            atomic_write_bytes(staging / name, bundle.files[name], mode=0o644)
        if request_key is not None:  # signed: an unsigned marker could relabel a champion as pending
            request = _approval_request(version, request_key.public_key())
            atomic_write_bytes(staging / f"{APPROVAL_REQUIRED}.sig", sign(request_key, request), mode=0o644)
            atomic_write_bytes(staging / APPROVAL_REQUIRED, request, mode=0o644)
        _write_manifest(staging, bundle.manifest_bytes, bundle.signature)
        os.rename(staging, self._dir(version))
        _sync_dir(folder)

    def _move_champion(
        self,
        signing_key: Ed25519PrivateKey,
        head: ChainHead | None,
        version: int,
        reason: str,
        sequence: int | None,
        now: datetime,
    ) -> None:
        # The caller verified ``head`` under the lock; the new record links to it.
        pointer = sign_pointer(
            signing_key,
            sequence=1 if head is None else head.record["sequence"] + 1,
            version=version,
            reason=reason,
            created_at=now,
            manifest_bytes=(self._dir(version) / "manifest.json").read_bytes(),
            previous=None if head is None else head.pointer,
            rollback_sequence=sequence,
        )
        stem = self.root / "pointers" / f"{pointer.record['sequence']:06d}"
        atomic_write_bytes(stem.with_suffix(".sig"), pointer.signature, mode=0o644)
        atomic_write_bytes(stem.with_suffix(".json"), pointer.payload_bytes, mode=0o644)
        atomic_write_json(
            self.root / "champion.json",
            {
                "version": version,
                "set_at": format_time(now),
                "reason": reason,
                "rollback_sequence": sequence,
            },
            mode=0o644,
        )

    @contextmanager
    def _lock(self) -> Iterator[None]:
        # flock, not a lock file that exists or not: the kernel drops it if the writer dies.
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _numbered(folder: Path, *, want_dirs: bool) -> list[int]:
    # ``000001`` directories (versions) or ``000001.json`` files (rollbacks); anything else is ignored.
    if not folder.is_dir():
        return []
    if want_dirs:
        names = [p.name for p in folder.iterdir() if p.is_dir()]
    else:
        names = [p.stem for p in folder.iterdir() if p.is_file() and p.suffix == ".json"]
    return sorted(int(name) for name in names if _NUMBERED.fullmatch(name))


def _signed_files(folder: Path) -> list[tuple[int, bytes, bytes]]:
    # ``000001.json`` + ``000001.sig`` pairs (rollbacks, pointers); a missing .sig reads as b"".
    return [
        (number, (folder / f"{number:06d}.json").read_bytes(), _read_or_empty(folder / f"{number:06d}.sig"))
        for number in _numbered(folder, want_dirs=False)
    ]


def _read_or_empty(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


def _approval_request(version: int, public_key: Ed25519PublicKey) -> bytes:
    return canonical_json({"kind": "approval-request", "version": version, "key_id": key_id(public_key)})


def _read_adapter(adapter_dir: Path) -> dict[str, bytes]:
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise RegistryError(f"{adapter_dir} is not a saved peft adapter: missing {missing}")
    return {name: (adapter_dir / name).read_bytes() for name in ADAPTER_FILES}


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise RegistryError(f"{path} is not JSON: {err}") from err
    if not isinstance(obj, dict):
        raise RegistryError(f"{path} must hold a JSON object")
    return obj


def _sync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

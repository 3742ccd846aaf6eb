"""A distilled student of a published version: signed, bound to its teacher, checked by every reader.

A student is a whole, smaller causal LM (``save_pretrained``'s ``model.safetensors`` and
``config.json``), distilled from a published version (base model + adapter) on the
coordinator's own validation text (server/cycle/distill.py). It is stored beside its
teacher in the registry (``students/000003/``) and travels to the sites that chose it
(``model-variant=student``), with a signed manifest of its own::

    {"format": "fedretrain.student/1", "teacher_version": 3,
     "teacher_manifest_sha256": "<sha256 of the teacher's manifest.json bytes>",
     "created_at": ..., "expires_at": ...,            # the teacher's expiry: it lives as long
     "key_id": "<16 hex>", "files": {"model.safetensors": "<sha256>", "config.json": "<sha256>"},
     "base_model": {...},                              # the teacher's (the student uses its tokenizer)
     "architecture": {"model_type": str, "layers": int, "teacher_layers": int,
                      "parameters": int, "teacher_parameters": int},
     "gate": {"decision": "passed", "teacher_loss", "student_loss", "gap", "ci_low", "ci_high",
              "tolerance", "examples", ...},
     "distill": {...}}                                  # steps, temperature, ... (free-form)

A student is stored only when its gate passed: its held-out loss no more than
``distill.tolerance`` nats above its teacher's, at the upper end of the interval.

:func:`verify_student` fails closed like :func:`~fedretrain.registry.bundle.verify_bundle`:
signature, canonical form and fields, the teacher (its number and the exact bytes of its
manifest, so a student cannot be moved to another version), file hashes, expiry, the gate's
decision, then the weights: safetensors loads, every value finite, the parameter count the
manifest states. Loading it (:func:`load_student`) refuses any missing, unexpected or
mis-shaped weight that ``from_pretrained`` would otherwise fill in at random.
"""

from __future__ import annotations

import json
import os
import tempfile
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
from fedretrain.registry.manifest import (
    check_fields,
    format_time,
    parse_json_object,
    parse_signed_json,
    parse_time,
    sha256_hex,
)
from fedretrain.registry.signing import canonical_json, key_id, sign, verify_signature

STUDENT_FORMAT = "fedretrain.student/1"
STUDENT_FILES = ("model.safetensors", "config.json")
STUDENT_MANIFEST, STUDENT_SIGNATURE = "student.json", "student.sig"
PASSED = "passed"
_PREFIX = "student:"

_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "teacher_version": (int,),
    "teacher_manifest_sha256": (str,),
    "created_at": (str,),
    "expires_at": (str,),
    "key_id": (str,),
    "files": (dict,),
    "base_model": (dict,),
    "architecture": (dict,),
    "gate": (dict,),
    "distill": (dict,),
}
_ARCHITECTURE: dict[str, tuple[type, ...]] = {
    "model_type": (str,),
    "layers": (int,),
    "teacher_layers": (int,),
    "parameters": (int,),
    "teacher_parameters": (int,),
}


@dataclass(frozen=True)
class StudentBundle:
    """A student as bytes: its signed manifest, the signature, and its two files by name."""

    manifest_bytes: bytes
    signature: bytes
    files: Mapping[str, bytes]

    @classmethod
    def signed(
        cls, manifest: Mapping[str, Any], files: Mapping[str, bytes], private_key: Ed25519PrivateKey
    ) -> StudentBundle:
        """Serialise ``manifest`` canonically and sign it (ValueError on NaN/inf in it)."""
        manifest_bytes = canonical_json(dict(manifest))
        return cls(manifest_bytes, sign(private_key, manifest_bytes), dict(files))

    @property
    def manifest(self) -> dict[str, Any]:
        """The parsed manifest, unverified (VerificationError ``student`` if it is not a JSON object)."""
        return parse_json_object(self.manifest_bytes, "student")

    @property
    def teacher_version(self) -> int:
        version = self.manifest.get("teacher_version")
        if type(version) is not int:
            raise VerificationError("student", f"'teacher_version' must be an integer, got {version!r}")
        return version

    @property
    def nbytes(self) -> int:
        return len(self.manifest_bytes) + len(self.signature) + sum(len(v) for v in self.files.values())

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> StudentBundle:
        """Read a student directory; a missing file is left out (``hashes`` then refuses)."""
        path = Path(path)
        try:
            manifest, signature = (path / STUDENT_MANIFEST).read_bytes(), (path / STUDENT_SIGNATURE).read_bytes()
        except OSError as err:
            raise VerificationError("student", f"cannot read {path}: {err.strerror or err}") from err
        return cls(manifest, signature, {n: (path / n).read_bytes() for n in STUDENT_FILES if (path / n).is_file()})

    def write_to(self, directory: str | os.PathLike[str]) -> None:
        """Write the files, then the manifest and its signature (each atomically): manifest last."""
        directory = Path(directory)
        for name, data in self.files.items():
            if name not in STUDENT_FILES:
                raise VerificationError("hashes", f"refusing to write unexpected file {name!r}")
            atomic_write_bytes(directory / name, data, mode=0o644)
        atomic_write_bytes(directory / STUDENT_SIGNATURE, self.signature, mode=0o644)
        atomic_write_bytes(directory / STUDENT_MANIFEST, self.manifest_bytes, mode=0o644)

    def to_mapping(self) -> dict[str, bytes]:
        """Flat ``str -> bytes`` form for a Flower ConfigRecord, every key prefixed ``student:``."""
        out = {f"{_PREFIX}manifest": self.manifest_bytes, f"{_PREFIX}signature": self.signature}
        out.update({f"{_PREFIX}file:{name}": data for name, data in self.files.items()})
        return out

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> StudentBundle:
        """Inverse of :meth:`to_mapping`; keys without the prefix are ignored."""

        def value(key: str) -> bytes:
            data = mapping.get(key)
            if not isinstance(data, bytes):
                raise VerificationError("student", f"'{key}' is missing or not bytes")
            return data

        files = {key[len(_PREFIX) + len("file:") :]: value(key) for key in mapping if key.startswith(f"{_PREFIX}file:")}
        return cls(value(f"{_PREFIX}manifest"), value(f"{_PREFIX}signature"), files)


def build_student_manifest(
    *,
    teacher_manifest_bytes: bytes,
    created_at: datetime,
    signer: Ed25519PublicKey,
    files: Mapping[str, bytes],
    architecture: Mapping[str, Any],
    gate: Mapping[str, Any],
    distill: Mapping[str, Any],
) -> dict[str, Any]:
    """The manifest of a student of the version whose manifest is ``teacher_manifest_bytes``."""
    teacher = json.loads(teacher_manifest_bytes)
    return {
        "format": STUDENT_FORMAT,
        "teacher_version": teacher["version"],
        "teacher_manifest_sha256": sha256_hex(teacher_manifest_bytes),
        "created_at": format_time(created_at),
        "expires_at": teacher["expires_at"],
        "key_id": key_id(signer),
        "files": {name: sha256_hex(data) for name, data in files.items()},
        "base_model": teacher["base_model"],
        "architecture": dict(architecture),
        "gate": dict(gate),
        "distill": dict(distill),
    }


def verify_student(
    bundle: StudentBundle,
    public_key: Ed25519PublicKey,
    *,
    teacher_manifest_bytes: bytes,
    now: datetime,
    check_expiry: bool = True,
) -> dict[str, torch.Tensor]:
    """Run every check on ``bundle`` (see the module docstring) and return its tensors.

    ``teacher_manifest_bytes``: the exact manifest of the version the reader has verified
    (and, at a site, installed); the student must name it.

    Raises
    ------
    VerificationError
        At the first failed check; ``check`` names it.
    """
    verify_signature(public_key, bundle.manifest_bytes, bundle.signature)
    manifest = parse_signed_json(bundle.manifest_bytes, "student")
    check_fields(manifest, _FIELDS, "student", "student manifest")
    check_fields(manifest["architecture"], _ARCHITECTURE, "student", "student manifest 'architecture'")
    if manifest["format"] != STUDENT_FORMAT:
        raise VerificationError("student", f"unknown format {manifest['format']!r}, expected {STUDENT_FORMAT}")
    if manifest["key_id"] != key_id(public_key):
        raise VerificationError("student", f"key_id {manifest['key_id']} is not the pinned key {key_id(public_key)}")
    teacher = parse_json_object(teacher_manifest_bytes, "teacher")
    if manifest["teacher_version"] != teacher.get("version"):
        raise VerificationError(
            "teacher", f"a student of version {manifest['teacher_version']}, not of version {teacher.get('version')}"
        )
    if manifest["teacher_manifest_sha256"] != sha256_hex(teacher_manifest_bytes):
        raise VerificationError(
            "teacher", f"names another manifest of version {manifest['teacher_version']} than the one verified here"
        )
    if manifest["base_model"] != teacher.get("base_model"):
        raise VerificationError("teacher", "its base model (tokenizer) is not its teacher's")
    _check_hashes(manifest["files"], bundle.files)
    if now.tzinfo is None:
        raise ValueError("verify_student needs a timezone-aware 'now'")
    try:
        expires = parse_time(manifest["expires_at"])
    except ValueError as err:
        raise VerificationError("student", f"bad time: {err}") from err
    if check_expiry and not now < expires:
        raise VerificationError("expiry", f"the student of version {manifest['teacher_version']} expired at {expires}")
    if manifest["gate"].get("decision") != PASSED:
        raise VerificationError("gate", f"its gate decision is {manifest['gate'].get('decision')!r}, not {PASSED!r}")
    try:
        config = json.loads(bundle.files["config.json"])
    except ValueError as err:
        raise VerificationError("config", f"config.json is not JSON: {err}") from err
    if not isinstance(config, dict) or config.get("model_type") != manifest["architecture"]["model_type"]:
        raise VerificationError("config", "config.json's model_type is not the manifest's")
    try:
        tensors = safetensors.torch.load(bundle.files["model.safetensors"])
    except Exception as err:  # any parse failure of untrusted bytes is a refusal
        raise VerificationError("safetensors", f"cannot load model.safetensors: {err}") from err
    for name in sorted(tensors):
        if tensors[name].is_floating_point() and not bool(torch.isfinite(tensors[name]).all()):
            raise VerificationError("finite", f"tensor '{name}' holds NaN or infinite values")
    # save_pretrained stores every parameter once (a tied head is the embeddings): a weight missing
    # or added changes the count, which registry verify then sees without loading the model.
    stored = sum(t.numel() for t in tensors.values())
    if stored != manifest["architecture"]["parameters"]:
        raise VerificationError(
            "shapes", f"model.safetensors holds {stored} values, the manifest {manifest['architecture']['parameters']}"
        )
    return tensors


def load_student(bundle: StudentBundle, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):  # noqa: ANN201
    """A verified student as a transformers model, through ``from_pretrained`` on its files.

    Raises ``VerificationError`` (``shapes``) when any weight is missing, unexpected or
    mis-shaped for its config (from_pretrained would otherwise initialise it at random),
    or when its parameter count is not the manifest's.
    """
    from transformers import AutoModelForCausalLM

    from fedretrain.modeling.embedded import quiet_progress_bars

    with tempfile.TemporaryDirectory(prefix="fedretrain-student-") as tmp:
        for name in STUDENT_FILES:
            Path(tmp, name).write_bytes(bundle.files[name])
        try:
            with quiet_progress_bars():
                loaded: Any = AutoModelForCausalLM.from_pretrained(tmp, output_loading_info=True, dtype=dtype)
            model, info = loaded
        except (OSError, ValueError, RuntimeError) as err:
            raise VerificationError("shapes", f"the student does not load: {err}") from err
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise VerificationError("shapes", f"the student's weights do not match its config: {problems}")
    count = sum(p.numel() for p in model.parameters())
    if count != bundle.manifest["architecture"]["parameters"]:
        raise VerificationError(
            "shapes",
            f"the student has {count} parameters, its manifest {bundle.manifest['architecture']['parameters']}",
        )
    return model.to(device).eval()


def _check_hashes(listed: dict[str, Any], shipped: Mapping[str, bytes]) -> None:
    if set(listed) != set(STUDENT_FILES) or set(shipped) != set(STUDENT_FILES):
        raise VerificationError(
            "hashes",
            f"a student holds exactly {list(STUDENT_FILES)}; listed {sorted(listed)}, shipped {sorted(shipped)}",
        )
    for name in STUDENT_FILES:
        if sha256_hex(shipped[name]) != listed[name]:
            raise VerificationError("hashes", f"the student's {name} does not match its SHA-256 in its manifest")


def student_record(bundle: StudentBundle) -> dict[str, Any]:
    """What a listing shows of a student (unverified): size, gate, teacher."""
    manifest = bundle.manifest
    return {
        "teacher_version": manifest.get("teacher_version"),
        "architecture": manifest.get("architecture"),
        "gate": manifest.get("gate"),
        "bytes": bundle.nbytes,
        "created_at": manifest.get("created_at"),
    }

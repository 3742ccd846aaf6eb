"""Ed25519 keys, signatures and the canonical JSON that gets signed.

The coordinator holds one private key; every site pins the matching public key.
Keys are PEM files: the private key as unencrypted PKCS8 (mode 0600, it must not
leave the coordinator), the public key as SubjectPublicKeyInfo (mode 0644, it is
handed to every site). A key is named by its ``key_id``: the first 16 hex digits
of the SHA-256 of its raw 32 public bytes.

What is signed is always the exact bytes of :func:`canonical_json`, so a verifier
checks the bytes it received and never a re-serialisation of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedretrain.atomic import atomic_write_bytes
from fedretrain.deploy.filemodes import private_dir
from fedretrain.errors import KeyFileError, VerificationError

logger = logging.getLogger("fedretrain")

SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class KeyPair:
    """Where :func:`generate_keypair` wrote a key pair, and the pair's id."""

    private_path: Path
    public_path: Path
    key_id: str


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` to the one byte string that is signed and verified.

    Keys sorted, no whitespace, UTF-8 (not ``\\u`` escapes).

    Raises
    ------
    ValueError
        If ``obj`` holds NaN or an infinity: JSON has no such numbers and a
        signed document must mean the same thing to every reader.
    TypeError
        If ``obj`` holds something JSON cannot represent.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def generate_keypair(directory: str | os.PathLike[str], name: str = "coordinator", *, force: bool = False) -> KeyPair:
    """Create ``<name>.key`` (private, 0600) and ``<name>.pub`` (public, 0644) in ``directory``.

    Raises
    ------
    KeyFileError
        If either file exists and ``force`` is False: replacing a signing key
        orphans every site that pinned the old one.
    """
    directory = Path(directory)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise KeyFileError(
                f"{path} already exists; pass --force to replace it "
                "(sites that pinned the old public key will refuse new versions)"
            )
    if not directory.exists():  # a new key directory is the owner's alone, whatever the umask
        private_dir(directory)
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # The temp file is created 0600 by mkstemp and renamed into place, so the key
    # is never readable by others, not even for an instant.
    atomic_write_bytes(private_path, private_pem, mode=0o600)
    atomic_write_bytes(public_path, public_key_pem(private_key.public_key()), mode=0o644)
    return KeyPair(private_path, public_path, key_id(private_key.public_key()))


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM file; warn if others may read it.

    Raises
    ------
    KeyFileError
        If the file is missing, unreadable, not PEM, or not an Ed25519 private key.
    """
    path = Path(path)
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, expected an Ed25519 private key")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        logger.warning("private key %s has mode %o: group or others may read it (chmod 600 %s)", path, mode, path)
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file.

    Raises
    ------
    KeyFileError
        If the file is missing, unreadable, not PEM, or not an Ed25519 public key.
    """
    path = Path(path)
    return public_key_from_pem(_read_key_file(path), source=str(path))


def public_key_from_pem(data: bytes, *, source: str) -> Ed25519PublicKey:
    """Parse a PEM SubjectPublicKeyInfo; ``source`` names where it came from in errors."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"{source} is not a PEM public key: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{source} holds a {type(key).__name__}, expected an Ed25519 public key")
    return key


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    """Return ``public_key`` as PEM SubjectPublicKeyInfo bytes."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the first 16 hex digits of SHA-256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(private_key: Ed25519PrivateKey, payload: bytes) -> bytes:
    """Return the raw 64-byte Ed25519 signature of ``payload``."""
    return private_key.sign(payload)


def verify_signature(public_key: Ed25519PublicKey, payload: bytes, signature: bytes) -> None:
    """Check that ``signature`` is ``public_key``'s signature of ``payload``.

    Raises
    ------
    VerificationError
        ``check == "signature"`` if it is not (wrong key, edited payload, bad bytes).
    """
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        size = len(signature) if isinstance(signature, bytes) else type(signature).__name__
        raise VerificationError("signature", f"expected a {SIGNATURE_BYTES}-byte Ed25519 signature, got {size}")
    try:
        public_key.verify(signature, payload)
    except InvalidSignature as err:
        raise VerificationError(
            "signature", f"not signed by the pinned key {key_id(public_key)} (or edited since signing)"
        ) from err


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise KeyFileError(f"key file {path} does not exist") from err
    except OSError as err:
        raise KeyFileError(f"cannot read key file {path}: {err.strerror or err}") from err

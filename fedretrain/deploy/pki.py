"""The federation's identities: a CA, the SuperLink's TLS certificate, each site's node key.

Flower 1.41 uses server-only TLS. The SuperLink (uvicorn) presents ``superlink.pem``,
signed by the federation's own CA, and every SuperNode checks it against ``ca.pem``
(``flower-supernode --root-certificates``). Sites do not get client certificates: each
proves who it is with an EC key pair, whose public half the coordinator registers
(``flwr supernode register SITE.pub``) and whose private half signs every request
(``flower-supernode --auth-supernode-private-key SITE.key``).

Every key is ECDSA on NIST P-384. Flower generates node keys on P-384 itself
(``flwr.supercore.primitives.asymmetric.generate_key_pairs``) and its register command
names it first; OpenSSL, Python's ``ssl`` (uvicorn), httpx and gRPC all accept EC
server keys, so the TLS keys use the same curve and SHA-384 signatures. Private keys
are written unencrypted (Flower loads them with ``password=None``), mode 0600, through
a temporary file that is renamed into place, and never replaced without ``force``. The
directory they go into is made 0700 whatever the umask (``filemodes.private_dir``):
a directory others may write to would let them swap ``ca.pem`` or a site's key.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedretrain.atomic import atomic_write_bytes
from fedretrain.deploy.filemodes import private_dir
from fedretrain.errors import ConfigError, KeyFileError

logger = logging.getLogger("fedretrain")

CURVE = ec.SECP384R1
DEFAULT_CA_NAME = "fedretrain federation CA"
CA_DAYS = 1825
SUPERLINK_DAYS = 365
# Certificates start a few minutes in the past so that a site whose clock runs slightly
# behind the coordinator's does not reject a certificate issued a moment ago.
CLOCK_SKEW = timedelta(minutes=5)
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class CaFiles:
    """Where :func:`create_ca` wrote the CA, its SHA-256 fingerprint and its expiry."""

    key_path: Path
    cert_path: Path
    fingerprint: str
    not_after: datetime


@dataclass(frozen=True)
class ServerCertFiles:
    """Where :func:`issue_superlink_cert` wrote the SuperLink's key and certificate."""

    key_path: Path
    cert_path: Path
    hosts: tuple[str, ...]
    not_after: datetime


@dataclass(frozen=True)
class SiteKeyFiles:
    """Where :func:`create_site_keypair` wrote a site's key pair, and its OpenSSH fingerprint."""

    private_path: Path
    public_path: Path
    fingerprint: str


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded CA: its certificate and the private key that matches it."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def create_ca(
    out_dir: str | os.PathLike[str], *, name: str = DEFAULT_CA_NAME, days: int = CA_DAYS, force: bool = False
) -> CaFiles:
    """Create a self-signed CA: ``ca.key`` (PKCS8 PEM, 0600) and ``ca.pem`` (0644) in ``out_dir`` (0700).

    The certificate is a CA (BasicConstraints CA=true, path length 0: it signs only
    end-entity certificates), may sign certificates and CRLs, and carries its
    SubjectKeyIdentifier so that issued certificates can name it.

    Raises
    ------
    ConfigError
        If ``name`` is empty or ``days`` < 1.
    KeyFileError
        If either file exists and ``force`` is False: a new CA orphans every site
        that trusts the old ``ca.pem``.
    """
    if not name.strip() or len(name) > 64:  # X.509 caps a common name at 64 characters
        raise ConfigError(f"--name: the CA's common name must be 1 to 64 characters, got {name!r}")
    _check_days(days)
    key_path, cert_path = Path(out_dir) / "ca.key", Path(out_dir) / "ca.pem"
    _refuse_overwrite(
        (key_path, cert_path),
        force,
        "every site that trusts the old ca.pem will refuse the SuperLink until it gets the new one",
    )
    private_dir(out_dir)
    key = ec.generate_private_key(CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        _builder(subject, subject, key.public_key(), now - CLOCK_SKEW, now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=False, key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_key_and_cert(key, key_path, cert, cert_path)
    return CaFiles(key_path, cert_path, cert_fingerprint(cert), cert.not_valid_after_utc)


def load_ca(ca_dir: str | os.PathLike[str]) -> CertificateAuthority:
    """Load ``ca.pem`` and ``ca.key`` from ``ca_dir`` and check that they belong together.

    Raises
    ------
    KeyFileError
        If a file is missing or unreadable, is not PEM, the key is not an EC or RSA
        private key, the certificate is not a CA or has expired, or the key does not
        match the certificate.
    """
    key_path, cert_path = Path(ca_dir) / "ca.key", Path(ca_dir) / "ca.pem"
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path))
    except ValueError as err:
        raise KeyFileError(f"{cert_path} is not a PEM certificate: {err}") from err
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"{key_path} is not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise KeyFileError(f"{key_path} holds a {type(key).__name__}, expected an EC or RSA CA key")
    if key.public_key() != cert.public_key():
        raise KeyFileError(
            f"{key_path} does not match the certificate {cert_path} (a key or certificate from another CA?)"
        )
    _check_is_usable_ca(cert, cert_path)
    if Path(key_path).stat().st_mode & 0o077:
        logger.warning("CA key %s may be read by group or others (chmod 600 %s)", key_path, key_path)
    return CertificateAuthority(cert, key)


def issue_superlink_cert(
    ca_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    hosts: list[str] | tuple[str, ...],
    *,
    days: int = SUPERLINK_DAYS,
    force: bool = False,
) -> ServerCertFiles:
    """Issue the SuperLink's TLS key and certificate, signed by the CA in ``ca_dir``.

    Writes ``superlink.key`` (PKCS8 PEM, 0600) and ``superlink.pem`` (0644) in
    ``out_dir`` (0700). Each host becomes one subject alternative name, in order: an
    IPAddress if it parses as IPv4/IPv6, else a DNSName. Sites must connect with one
    of these names (``--superlink HOST:PORT``): TLS clients check only the SANs. The
    certificate ends no later than the CA, since it would not verify past it.

    Raises
    ------
    ConfigError
        If ``hosts`` is empty, a host is neither an IP address nor a DNS name
        (the message names it), or ``days`` < 1.
    KeyFileError
        If the CA cannot be loaded (see :func:`load_ca`), or a file exists and
        ``force`` is False.
    """
    names = _subject_alt_names(hosts)
    _check_days(days)
    key_path, cert_path = Path(out_dir) / "superlink.key", Path(out_dir) / "superlink.pem"
    _refuse_overwrite((key_path, cert_path), force, "restart the SuperLink with the new pair afterwards")
    ca = load_ca(ca_dir)
    private_dir(out_dir)
    key = ec.generate_private_key(CURVE())
    now = datetime.now(UTC)
    not_after = min(now + timedelta(days=days), ca.cert.not_valid_after_utc)
    # Clients match the SANs only; a fixed common name avoids X.509's 64-character cap on it.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedretrain SuperLink")])
    cert = (
        _builder(subject, ca.cert.subject, key.public_key(), now - CLOCK_SKEW, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca.cert), critical=False)
        .sign(ca.key, hashes.SHA384())
    )
    _write_key_and_cert(key, key_path, cert, cert_path)
    return ServerCertFiles(key_path, cert_path, tuple(hosts), cert.not_valid_after_utc)


def create_site_keypair(out_dir: str | os.PathLike[str], site_id: str, *, force: bool = False) -> SiteKeyFiles:
    """Create a site's SuperNode authentication keys: ``SITE_ID.key`` (0600) and ``SITE_ID.pub`` (0644)
    in ``out_dir`` (0700).

    The private key is in OpenSSH format, unencrypted: ``flower-supernode
    --auth-supernode-private-key`` reads it with ``load_ssh_private_key(data, None)``
    and requires an EC key. The public key is one OpenSSH line
    (``ecdsa-sha2-nistp384 AAAA... SITE_ID``): ``flwr supernode register`` reads it
    with ``load_ssh_public_key`` and accepts NIST EC curves only. These are the files
    ``ssh-keygen -t ecdsa -b 384`` writes, which Flower's documentation uses.

    Raises
    ------
    ConfigError
        If ``site_id`` is empty or holds '/', '\\' or whitespace (it names files).
    KeyFileError
        If either file exists and ``force`` is False: the coordinator has the old
        public key registered, and the site could no longer connect.
    """
    _check_site_id(site_id)
    private_path, public_path = Path(out_dir) / f"{site_id}.key", Path(out_dir) / f"{site_id}.pub"
    _refuse_overwrite((private_path, public_path), force, "the coordinator must then register the new public key")
    private_dir(out_dir)
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(private_path, private, mode=0o600)
    atomic_write_bytes(public_path, public + f" {site_id}\n".encode(), mode=0o644)
    return SiteKeyFiles(private_path, public_path, ssh_fingerprint(public))


def cert_fingerprint(cert: x509.Certificate) -> str:
    """Return the SHA-256 fingerprint of ``cert``'s DER bytes as colon-separated hex (as openssl prints it)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def ssh_fingerprint(public_line: bytes) -> str:
    """Return the ``SHA256:...`` fingerprint of an OpenSSH public key line (as ``ssh-keygen -l`` prints it)."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def parse_host(host: str) -> x509.GeneralName:
    """Return the SAN for ``host``: an IPAddress if it parses as one, else a DNSName.

    Raises
    ------
    ConfigError
        If ``host`` is empty, holds whitespace, or is not a valid DNS name (letters,
        digits and hyphens in dot-separated labels; no port, no scheme, no underscore).
    """
    if not host or host != host.strip() or any(c.isspace() for c in host):
        raise ConfigError(f"--host: {host!r} is not a host name or IP address (empty or has spaces)")
    address = _ip_address(host)
    if address is not None:
        if getattr(address, "scope_id", None):  # fe80::1%eth0 is local to one machine, not a SAN
            raise ConfigError(f"--host: {host!r} has an IPv6 zone; give the address without '%...'")
        return x509.IPAddress(address)
    labels = host.split(".")
    if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        raise ConfigError(
            f"--host: {host!r} is neither an IP address nor a DNS name "
            "(letters, digits, '-' and '.'; no port or scheme)"
        )
    return x509.DNSName(host)


def _ip_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address, or None when it is a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _subject_alt_names(hosts: list[str] | tuple[str, ...]) -> list[x509.GeneralName]:
    if not hosts:
        raise ConfigError("--host: give at least one name or address the sites will connect to")
    names: list[x509.GeneralName] = []
    for host in hosts:
        name = parse_host(host)
        if name not in names:
            names.append(name)
    return names


def _check_site_id(site_id: str) -> None:
    # Same rule as SiteConfig.site_id: the id names files and appears in logs.
    if not site_id or any(c in site_id for c in "/\\") or any(c.isspace() for c in site_id):
        raise ConfigError(f"site-id: must be a non-empty name without '/', '\\' or spaces, got {site_id!r}")


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"--days: must be a whole number of days >= 1, got {days!r}")


def _check_is_usable_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise KeyFileError(f"{path} is not a CA certificate (BasicConstraints CA=true missing)")
    if cert.not_valid_after_utc <= datetime.now(UTC):
        raise KeyFileError(
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; create a new CA "
            "(fedretrain keys ca --force) and give the new ca.pem to every site"
        )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _key_usage(*, digital_signature: bool, key_cert_sign: bool) -> x509.KeyUsage:
    # An ECDSA server key only signs the handshake (digitalSignature); a CA key signs
    # certificates and CRLs. Nothing here is used for key encipherment.
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:  # a CA made elsewhere without SKI: derive it from the key
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _write_key_and_cert(
    key: ec.EllipticCurvePrivateKey, key_path: Path, cert: x509.Certificate, cert_path: Path
) -> None:
    # PKCS8 PEM ("BEGIN PRIVATE KEY") is what uvicorn's load_cert_chain and gRPC read.
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_bytes(key_path, pem, mode=0o600)
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _refuse_overwrite(paths: tuple[Path, ...], force: bool, consequence: str) -> None:
    for path in paths:
        if path.exists() and not force:
            raise KeyFileError(f"{path} already exists; pass --force to replace it ({consequence})")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise KeyFileError(
            f"{path} does not exist (create the CA with: fedretrain keys ca --out {path.parent})"
        ) from err
    except OSError as err:
        raise KeyFileError(f"cannot read {path}: {err.strerror or err}") from err

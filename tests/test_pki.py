"""The deployment identities: a real CA, a real SuperLink certificate, real site keys, real TLS on 127.0.0.1."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from cli.main import main
from fedretrain.deploy.pki import create_ca, create_site_keypair, issue_superlink_cert, load_ca, ssh_fingerprint
from fedretrain.errors import ConfigError, KeyFileError
from fedretrain.registry.signing import generate_keypair


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ext(cert: x509.Certificate, kind: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


@pytest.fixture
def ca_dir(tmp_path) -> Path:
    create_ca(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.fixture
def superlink_files(ca_dir, tmp_path):
    return issue_superlink_cert(ca_dir, tmp_path / "link", ["127.0.0.1", "localhost"])


# --- the CA ------------------------------------------------------------------------------------------


def test_create_ca_writes_a_p384_ca_certificate_and_a_key_only_its_owner_can_read(tmp_path) -> None:
    # Execute
    ca = create_ca(tmp_path, name="Test federation", days=30)

    # Assert: files, modes and formats.
    assert (ca.key_path, ca.cert_path) == (tmp_path / "ca.key", tmp_path / "ca.pem")
    assert _mode(ca.key_path) == 0o600 and _mode(ca.cert_path) == 0o644
    assert ca.key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS8
    key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    # Assert: a self-signed CA that may sign certificates and CRLs, and names its key.
    cert = _cert(ca.cert_path)
    cert.verify_directly_issued_by(cert)
    assert cert.subject.rfc4514_string() == "CN=Test federation" == cert.issuer.rfc4514_string()
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert _ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    # 30 days from now, plus the 5 minutes back-dated for clock skew.
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30, minutes=5)
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    assert ca.fingerprint == ":".join(digest[i : i + 2] for i in range(0, 64, 2))


@pytest.mark.parametrize("name", ["", "  ", "x" * 65])
def test_create_ca_refuses_a_name_that_cannot_be_a_common_name(tmp_path, name) -> None:
    with pytest.raises(ConfigError, match=r"--name: .*1 to 64 characters"):
        create_ca(tmp_path, name=name)
    assert not list(tmp_path.iterdir())


def test_superlink_cert_accepts_a_long_dns_name(ca_dir, tmp_path) -> None:
    # A 200-character name is a valid DNS name (labels <= 63) but longer than a common name may be.
    host = ".".join(["a" * 60, "b" * 60, "c" * 60, "example", "org"])
    files = issue_superlink_cert(ca_dir, tmp_path, [host])
    assert list(_ext(_cert(files.cert_path), x509.SubjectAlternativeName).value) == [x509.DNSName(host)]


@pytest.mark.parametrize("days", [0, -1])
def test_create_ca_refuses_a_validity_below_one_day(tmp_path, days) -> None:
    with pytest.raises(ConfigError, match=r"--days.*>= 1"):
        create_ca(tmp_path, days=days)
    assert not list(tmp_path.iterdir())


def test_load_ca_names_a_missing_file(tmp_path) -> None:
    with pytest.raises(KeyFileError, match=r"ca\.pem does not exist"):
        load_ca(tmp_path)


def test_load_ca_refuses_a_key_of_the_wrong_type(ca_dir, tmp_path) -> None:
    # Prepare: the coordinator's Ed25519 signing key put where the CA key belongs.
    pair = generate_keypair(tmp_path / "signing")
    shutil.copy(pair.private_path, ca_dir / "ca.key")

    # Execute / Assert
    with pytest.raises(KeyFileError, match=r"ca\.key holds a .*Ed25519.*expected an EC or RSA CA key"):
        load_ca(ca_dir)


def test_load_ca_refuses_a_key_that_does_not_match_the_certificate(ca_dir, tmp_path) -> None:
    # Prepare: the key of a second CA next to the first CA's certificate.
    other = create_ca(tmp_path / "other")
    shutil.copy(other.key_path, ca_dir / "ca.key")

    # Execute / Assert
    with pytest.raises(KeyFileError, match=r"ca\.key does not match the certificate .*ca\.pem"):
        load_ca(ca_dir)


def test_load_ca_refuses_a_certificate_that_is_not_a_ca(superlink_files, tmp_path) -> None:
    # Prepare: the SuperLink's own pair passed off as a CA.
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copy(superlink_files.cert_path, fake / "ca.pem")
    shutil.copy(superlink_files.key_path, fake / "ca.key")

    # Execute / Assert
    with pytest.raises(KeyFileError, match=r"ca\.pem is not a CA certificate"):
        load_ca(fake)


# --- the SuperLink's certificate -----------------------------------------------------------------------


def test_superlink_cert_chains_to_the_ca_and_names_exactly_the_given_hosts(ca_dir, tmp_path) -> None:
    # Execute
    hosts = ["link.example.org", "10.0.0.5", "::1", "localhost"]
    files = issue_superlink_cert(ca_dir, tmp_path / "link", hosts, days=90)

    # Assert: files and modes.
    assert (files.key_path, files.cert_path) == (
        tmp_path / "link" / "superlink.key",
        tmp_path / "link" / "superlink.pem",
    )
    assert _mode(files.key_path) == 0o600 and _mode(files.cert_path) == 0o644
    assert files.hosts == tuple(hosts)
    # Assert: signed by the CA, and names it by its key identifier.
    ca, cert = _cert(ca_dir / "ca.pem"), _cert(files.cert_path)
    cert.verify_directly_issued_by(ca)
    assert (
        _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
        == _ext(ca, x509.SubjectKeyIdentifier).value.key_identifier
    )
    # Assert: each host once, in order, IPs as IPAddress and names as DNSName.
    sans = list(_ext(cert, x509.SubjectAlternativeName).value)
    assert sans == [
        x509.DNSName("link.example.org"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("localhost"),
    ]
    # Assert: an end-entity server certificate with a P-384 key matching superlink.key.
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _ext(cert, x509.KeyUsage).value.digital_signature
    key = serialization.load_pem_private_key(files.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert key.public_key() == cert.public_key()
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=90, minutes=5)


def test_superlink_cert_ends_no_later_than_the_ca(tmp_path) -> None:
    # Prepare: a CA that lives 10 days.
    create_ca(tmp_path, days=10)

    # Execute: ask for a year.
    files = issue_superlink_cert(tmp_path, tmp_path, ["localhost"], days=365)

    # Assert: cut to the CA's end (a certificate past it would not verify anyway).
    assert files.not_after == _cert(tmp_path / "ca.pem").not_valid_after_utc


@pytest.mark.parametrize(
    "host",
    [
        "",
        " ",
        "bad host",
        " link.example.org",
        "link.example.org:9093",
        "https://link.example.org",
        "under_score.org",
        "-dash.org",
        "a..b",
        "10.0.0.256",
        "fe80::1%eth0",
    ],
)
def test_superlink_cert_refuses_a_bad_host_and_names_it(ca_dir, tmp_path, host) -> None:
    with pytest.raises(ConfigError, match=r"--host: " + repr(host).replace("\\", "\\\\").replace(".", r"\.")):
        issue_superlink_cert(ca_dir, tmp_path / "link", ["localhost", host])
    assert not (tmp_path / "link").exists()


def test_superlink_cert_needs_a_host(ca_dir, tmp_path) -> None:
    with pytest.raises(ConfigError, match="at least one"):
        issue_superlink_cert(ca_dir, tmp_path, [])


# --- a site's node key --------------------------------------------------------------------------------


def test_site_keypair_is_accepted_by_flowers_own_loaders(tmp_path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    # Execute
    pair = create_site_keypair(tmp_path, "hospital-a")

    # Assert: files, modes, OpenSSH formats, the site id as the comment.
    assert (pair.private_path, pair.public_path) == (tmp_path / "hospital-a.key", tmp_path / "hospital-a.pub")
    assert _mode(pair.private_path) == 0o600 and _mode(pair.public_path) == 0o644
    assert pair.private_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    algorithm, _blob, comment = pair.public_path.read_text().split()
    assert (algorithm, comment) == ("ecdsa-sha2-nistp384", "hospital-a")
    # Assert: the SuperNode loads the private key exactly as `flower-supernode` does ...
    args = argparse.Namespace(auth_supernode_private_key=str(pair.private_path), auth_supernode_public_key=None)
    private_key, public_key = _try_setup_client_authentication(args)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey) and private_key.curve.name == "secp384r1"
    # ... and `flwr supernode register` sends the same public key the SuperLink will check.
    registered = try_load_public_key(pair.public_path)
    assert registered == public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert pair.fingerprint == ssh_fingerprint(pair.public_path.read_bytes())
    assert pair.fingerprint.startswith("SHA256:") and len(pair.fingerprint) == 7 + 43


@pytest.mark.parametrize("site_id", ["", "a/b", "a\\b", "a b", "a\tb", "../up"])
def test_site_keypair_refuses_a_site_id_that_is_not_a_plain_name(tmp_path, site_id) -> None:
    with pytest.raises(ConfigError, match=r"site-id: .*got " + repr(site_id).replace("\\", "\\\\").replace(".", r"\.")):
        create_site_keypair(tmp_path / "keys", site_id)
    assert not (tmp_path / "keys").exists()


# --- never overwritten without force ------------------------------------------------------------------


def _make(kind: str, ca_dir: Path, out: Path, force: bool = False):
    if kind == "ca":
        files = create_ca(out, force=force)
    elif kind == "superlink":
        files = issue_superlink_cert(ca_dir, out, ["localhost"], force=force)
    else:
        files = create_site_keypair(out, "hospital-a", force=force)
    return [Path(p) for p in vars(files).values() if isinstance(p, Path)]


@pytest.mark.parametrize("kind", ["ca", "superlink", "site"])
def test_existing_keys_are_replaced_only_with_force(ca_dir, tmp_path, kind) -> None:
    # Prepare
    out = tmp_path / "out"
    paths = _make(kind, ca_dir, out)
    before = {path: path.read_bytes() for path in paths}

    # Execute / Assert: refused, naming the private key file; nothing changed.
    with pytest.raises(KeyFileError, match=rf"{paths[0].name} already exists; pass --force"):
        _make(kind, ca_dir, out)
    assert {path: path.read_bytes() for path in paths} == before

    # Execute / Assert: with force, new files with the same modes, and no temp files left.
    _make(kind, ca_dir, out, force=True)
    assert all(path.read_bytes() != before[path] for path in paths)
    assert [_mode(path) for path in paths] == [0o600, 0o644]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)


@pytest.mark.parametrize("kind", ["ca", "superlink", "site"])
def test_keys_and_their_directories_are_private_under_umask_000(ca_dir, tmp_path, kind) -> None:
    # Prepare: the worst umask, under which a plain mkdir makes 0777 (anyone could swap ca.pem).
    out = tmp_path / "deploy" / "keys"
    previous = os.umask(0)
    try:
        # Execute
        private, public = _make(kind, ca_dir, out)
    finally:
        os.umask(previous)

    # Assert: both directories made here are the owner's only; the key 0600, the public half 0644.
    assert (_mode(tmp_path / "deploy"), _mode(out)) == (0o700, 0o700)
    assert (_mode(private), _mode(public)) == (0o600, 0o644)


@pytest.mark.parametrize("kind", ["ca", "superlink", "site"])
def test_a_world_writable_keys_directory_is_made_private(ca_dir, tmp_path, kind) -> None:
    # Prepare: a keys directory left 0777 by an earlier run.
    out = tmp_path / "keys"
    out.mkdir()
    out.chmod(0o777)

    # Execute
    _make(kind, ca_dir, out)

    # Assert
    assert _mode(out) == 0o700


# --- a real TLS handshake on 127.0.0.1 -----------------------------------------------------------------


@contextmanager
def _tls_server(cert_path: Path, key_path: Path) -> Iterator[int]:
    """Serve one TLS connection on an ephemeral port, with the context uvicorn builds for the SuperLink."""
    from uvicorn.config import create_ssl_context

    # flower-superlink passes only ssl_certfile and ssl_keyfile; the rest are uvicorn's defaults.
    context = create_ssl_context(cert_path, key_path, None, ssl.PROTOCOL_TLS_SERVER, ssl.CERT_NONE, None, None)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        # The client may refuse the handshake (ssl.SSLError is an OSError): the client side asserts that.
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(timeout=10)


def _client_context(ca_pem: Path) -> ssl.SSLContext:
    # What the SuperNode builds from --root-certificates (flwr.supercore.protobuf.client), made
    # X.509-strict as Python 3.13's default context is.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem.read_text(encoding="ascii"))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _greeting(port: int, context: ssl.SSLContext, hostname: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=hostname) as tls:
            return tls.recv(2)


def test_tls_handshake_succeeds_against_the_federation_ca(ca_dir, superlink_files) -> None:
    context = _client_context(ca_dir / "ca.pem")
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED

    with _tls_server(superlink_files.cert_path, superlink_files.key_path) as port:
        assert _greeting(port, context) == b"ok"
    with _tls_server(superlink_files.cert_path, superlink_files.key_path) as port:
        assert _greeting(port, context, hostname="localhost") == b"ok"


def test_tls_handshake_fails_with_another_ca(superlink_files, tmp_path) -> None:
    rogue = create_ca(tmp_path / "rogue")

    with _tls_server(superlink_files.cert_path, superlink_files.key_path) as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            _greeting(port, _client_context(rogue.cert_path))


def test_tls_handshake_fails_for_a_name_not_in_the_certificate(ca_dir, superlink_files) -> None:
    with _tls_server(superlink_files.cert_path, superlink_files.key_path) as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname mismatch|IP address mismatch"):
            _greeting(port, _client_context(ca_dir / "ca.pem"), hostname="other.example.org")


# --- the commands ---------------------------------------------------------------------------------------


def test_keys_commands_create_the_files_and_refuse_a_second_run(tmp_path, capsys) -> None:
    out = str(tmp_path / "keys")

    # Execute: the coordinator's CA and SuperLink certificate, a site's key pair.
    assert main(["keys", "ca", "--out", out, "--days", "100"]) == 0
    assert (
        main(["keys", "superlink", "--host", "127.0.0.1", "--host", "link.example.org", "--ca-dir", out, "--out", out])
        == 0
    )
    assert main(["keys", "site", "hospital-a", "--out", out]) == 0

    # Assert: the files, and the output says where each went and what to do with it.
    names = {"ca.key", "ca.pem", "superlink.key", "superlink.pem", "hospital-a.key", "hospital-a.pub"}
    assert {p.name for p in Path(out).iterdir()} == names
    printed = capsys.readouterr().out
    assert "give it to every site" in printed
    assert "flower-superlink --ssl-ca-certfile" in printed and "link.example.org" in printed
    assert "flwr supernode register hospital-a.pub" in printed
    _cert(Path(out) / "superlink.pem").verify_directly_issued_by(_cert(Path(out) / "ca.pem"))

    # Execute / Assert: a second run without --force exits 2 and says why.
    for argv in (
        ["keys", "ca", "--out", out],
        ["keys", "superlink", "--host", "x.org", "--ca-dir", out, "--out", out],
        ["keys", "site", "hospital-a", "--out", out],
    ):
        assert main(argv) == 2
        assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["keys", "site", "hospital-a", "--out", out, "--force"]) == 0


def test_keys_superlink_command_names_a_bad_host(tmp_path, capsys) -> None:
    out = str(tmp_path)
    assert main(["keys", "ca", "--out", out]) == 0

    assert main(["keys", "superlink", "--host", "bad host", "--ca-dir", out, "--out", out]) == 2
    assert "--host: 'bad host'" in capsys.readouterr().err

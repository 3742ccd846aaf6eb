"""Serving a web app on this machine: the dashboard and a site's inference service.

With uvicorn, on a socket bound here, over TLS when asked. On a loopback address (127.0.0.1,
::1, localhost) it may serve plain HTTP. Any other address is refused unless it serves TLS
(``--tls-cert``, ``--tls-key``); the app then needs a login, since what it serves (every
site's privacy spend; a site's model and its users' requests) is not for the network. The
socket is bound before uvicorn starts, so the address printed is the one it serves
(``--port 0``: any free port) and a port in use fails with a sentence, not a traceback.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI

from fedretrain.errors import ConfigError

SSH_HINT = "or forward its port over SSH: ssh -L PORT:127.0.0.1:PORT <this machine>"


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def loopback_host(header: str) -> bool:
    """Whether a request's ``Host`` header names a loopback address (a malformed one does not)."""
    try:
        return urlsplit("//" + header).hostname in LOOPBACK_NAMES
    except ValueError:  # e.g. "[::1" (an unclosed bracket)
        return False


def listen_address(host: str, *, tls: bool) -> tuple[str, bool]:
    """(the address to listen on for ``--host``, whether it is loopback); ConfigError for a
    name that is not an IP address, or for another address without TLS."""
    if host == "localhost":
        return "127.0.0.1", True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"--host {host!r}: give an IP address or localhost (a loopback one, 127.0.0.1 or ::1; any other with TLS)"
        ) from None
    if address.is_loopback and str(address) not in LOOPBACK_NAMES:
        # Requests must name the address they reach, and only these names are taken.
        raise ConfigError(f"--host {host}: of the loopback addresses, give 127.0.0.1, ::1 or localhost")
    if not address.is_loopback and not tls:
        raise ConfigError(
            f"--host {host}: refused without TLS. Off a loopback address (127.0.0.1, ::1, localhost) it would "
            "serve what is not for the network in the clear: give --tls-cert and --tls-key (every page then "
            f"needs a login), {SSH_HINT}"
        )
    return str(address), address.is_loopback


def tls_context(cert: Path, key: Path) -> tuple[str, str]:
    """``--tls-cert`` and ``--tls-key`` as uvicorn takes them, checked first (ConfigError names the flag)."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"--tls-cert {cert} / --tls-key {key}: not a certificate and its key ({err})") from None
    return str(cert), str(key)


def listen(address: str, port: int) -> socket.socket:
    """A TCP socket bound to ``address``:``port`` (ConfigError naming ``--port`` if it cannot be)."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(128)  # now: a browser opened at the printed address waits in the backlog, not refused
    except (OSError, OverflowError) as err:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {address} ({err})") from None
    return sock


def url(sock: socket.socket, *, tls: bool = False) -> str:
    """The address ``sock`` serves, as a browser takes it."""
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}/" if ":" in host else f"{scheme}://{host}:{port}/"


def serve(app: FastAPI, sock: socket.socket, tls: tuple[str, str] | None = None) -> None:
    """Serve ``app`` on ``sock`` (over TLS with ``tls``: certificate and key files) until SIGINT or
    SIGTERM, then return (the requests in hand answered)."""
    import uvicorn

    certificate, key = tls or (None, None)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        server_header=False,
        ssl_certfile=certificate,
        ssl_keyfile=key,
        # A browser may hold a connection open for minutes: a stop waits this long for it, no longer.
        timeout_graceful_shutdown=3,
    )
    # uvicorn shuts down on the signal, then raises it again for the handler it found: this one,
    # so that a stop is a clean exit (status 0), not a death by signal or a KeyboardInterrupt.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(signum: int, frame: object) -> None:
    return None

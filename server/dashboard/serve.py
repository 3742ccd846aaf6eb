"""Serving the dashboard: on a loopback address only, with uvicorn, on a socket bound here.

It has no login and no TLS yet, and it shows every site's privacy spend, the runs and the
registry: so it listens on 127.0.0.1, ::1 or localhost, and any other address is refused.
The socket is bound before uvicorn starts, so the address printed is the one it serves
(``--port 0``: any free port) and a port in use fails with a sentence, not a traceback.
"""

from __future__ import annotations

import ipaddress
import signal
import socket

from fastapi import FastAPI

from fedretrain.errors import ConfigError


def loopback_address(host: str) -> str:
    """The address to listen on for ``--host``; ConfigError unless it is a loopback address."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--host {host!r}: give a loopback IP address (127.0.0.1 or ::1) or localhost") from None
    if not address.is_loopback:
        raise ConfigError(
            f"--host {host}: refused. The dashboard has no login or TLS yet and shows every site's privacy "
            "spend, the runs and the registry, so it listens on a loopback address only (127.0.0.1, ::1, "
            "localhost). To see it from another machine, forward its port over SSH: "
            "ssh -L 8765:127.0.0.1:8765 <this machine>"
        )
    return str(address)


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


def url(sock: socket.socket) -> str:
    """The address ``sock`` serves, as a browser takes it."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGINT or SIGTERM, then return (the requests in hand answered)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)
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

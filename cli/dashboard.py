"""``fedretrain dashboard``: parse, open the roots, serve the read-only dashboard until stopped.

The server modules are imported inside the handler, so that the other commands start fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedretrain.errors import ConfigError

DEFAULT_PORT = 8765


def add_dashboard_command(subparsers: Any) -> None:
    """Add ``dashboard`` to the top-level subparsers."""
    dashboard = subparsers.add_parser(
        "dashboard",
        help="serve a read-only dashboard of the sites, the cycles and the registry on 127.0.0.1",
        description="Reads run directories (--runs), a deployment's coordinator folder (--dir) and the "
        "registries they name (or --registry) on every request, and writes nothing. E.g.: fedretrain "
        "dashboard --runs runs, or fedretrain dashboard --dir coord. Stop it with Ctrl-C or SIGTERM.",
    )
    dashboard.add_argument("--runs", type=Path, help="a folder of run directories (a simulation's output_dir)")
    dashboard.add_argument("--dir", type=Path, help="a deployment's coordinator folder (its runs/ and watch.json)")
    dashboard.add_argument(
        "--registry",
        type=Path,
        action="append",
        default=[],
        help="a registry directory (repeat for each); the registries the runs name are found without it",
    )
    dashboard.add_argument(
        "--host",
        default="127.0.0.1",
        help="127.0.0.1 (default), ::1 or localhost; any other address needs --tls-cert and --tls-key, and a login",
    )
    dashboard.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free port")
    dashboard.add_argument(
        "--poll-seconds", type=float, default=5.0, help="how often an open page checks for changes (default 5)"
    )
    dashboard.add_argument(
        "--signing-key",
        type=Path,
        help="the coordinator's private key: the Versions page then approves and rolls back (after a login)",
    )
    dashboard.add_argument(
        "--token-file",
        type=Path,
        help="a file (mode 600) whose first line is the login token; without it, a token is made and printed "
        "when a login is needed (--signing-key, or an address other than loopback)",
    )
    dashboard.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    dashboard.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    dashboard.add_argument("--approver", help="who approves from the page (default: the login name)")
    dashboard.set_defaults(func=_dashboard)


def _dashboard(args: argparse.Namespace) -> int:
    from fedretrain.web import listen, listen_address, serve, tls_context, url

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    # First: a refused address is said before anything is read.
    address, loopback = listen_address(args.host, tls=args.tls_cert is not None)
    tls = None if args.tls_cert is None else tls_context(args.tls_cert, args.tls_key)
    from cli.registry import login_name
    from fedretrain.registry.signing import load_private_key
    from server.dashboard.access import Access, new_token, read_token
    from server.dashboard.app import create_app  # torch, with the registry's code
    from server.dashboard.catalogue import Catalogue

    if not args.poll_seconds > 0:
        raise ConfigError(f"--poll-seconds must be > 0, got {args.poll_seconds}")
    catalogue = Catalogue.open(args.runs, args.dir, args.registry)
    key = None if args.signing_key is None else load_private_key(args.signing_key)
    token, made = None, False
    if args.token_file is not None:
        token = read_token(args.token_file)
    elif key is not None or not loopback:
        token, made = new_token(), True
    access = Access(token, key, args.signing_key, approver=args.approver or login_name(), tls=tls is not None)
    sock = listen(address, args.port)
    rights = "read-only" if key is None else f"approves and rolls back with {args.signing_key}"
    print(f"fedretrain dashboard: {url(sock, tls=tls is not None)} ({rights}; Ctrl-C stops it)", flush=True)
    if made:
        print(f"fedretrain dashboard: login token {token} (made for this start; --token-file keeps one)", flush=True)
    serve(create_app(catalogue, poll_s=args.poll_seconds, access=access, loopback=loopback), sock, tls)
    print("fedretrain dashboard: stopped")
    return 0

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
    dashboard.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default), ::1 or localhost: loopback only")
    dashboard.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free port")
    dashboard.add_argument(
        "--poll-seconds", type=float, default=5.0, help="how often an open page checks for changes (default 5)"
    )
    dashboard.set_defaults(func=_dashboard)


def _dashboard(args: argparse.Namespace) -> int:
    from server.dashboard.serve import listen, loopback_address, serve, url

    address = loopback_address(args.host)  # first: a refused address is said before anything is read
    from server.dashboard.app import create_app  # torch, with the registry's code
    from server.dashboard.catalogue import Catalogue

    if not args.poll_seconds > 0:
        raise ConfigError(f"--poll-seconds must be > 0, got {args.poll_seconds}")
    catalogue = Catalogue.open(args.runs, args.dir, args.registry)
    sock = listen(address, args.port)
    print(f"fedretrain dashboard: {url(sock)} (read-only; Ctrl-C stops it)", flush=True)
    serve(create_app(catalogue, poll_s=args.poll_seconds), sock)
    print("fedretrain dashboard: stopped")
    return 0

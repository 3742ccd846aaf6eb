"""``fedretrain site serve`` and ``fedretrain site feedback``: the installed version in use at a site.

The server modules are imported inside the handlers, so that the other commands start fast.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

DEFAULT_PORT = 8780
SITE_CONFIG_HELP = (
    "the site's node_config as JSON (simulation: <site>/site.json), or a joined site's <state-dir>/node-config.toml"
)


def add_serve_commands(site_subparsers: Any) -> None:
    """Add ``serve`` and ``feedback`` to ``fedretrain site``."""
    serve = site_subparsers.add_parser(
        "serve",
        help="answer requests with the installed version (OpenAI-style /v1/completions on 127.0.0.1)",
        description="Loads the site's installed version (verified against the pinned coordinator key) and "
        "answers POST /v1/completions; each answer, its version and latency are kept at the site "
        "(<state-dir>/serving/), with any feedback (POST /v1/feedback). A newly installed version is "
        "picked up on the next request. Loopback only. Stop it with Ctrl-C or SIGTERM.",
    )
    serve.add_argument("--site-config", required=True, help=SITE_CONFIG_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default), ::1 or localhost")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free port")
    serve.set_defaults(func=_serve)

    feedback = site_subparsers.add_parser(
        "feedback",
        help="rate or correct an answer the site's service gave, or show each version's live score",
        description="A rating (good/bad) adds to the answering version's live score; a correction (what the "
        "answer should have said) is ingested as a training record (schema, redaction, quarantine). "
        "--scores prints each version's requests, latency, ratings and corrections. Nothing leaves the site.",
    )
    feedback.add_argument("id", nargs="?", help="the answer's id (cmpl-..., in the service's reply)")
    what = feedback.add_mutually_exclusive_group(required=True)
    what.add_argument("--rating", choices=("good", "bad"))
    what.add_argument("--correction", help="the text the answer should have been")
    what.add_argument("--scores", action="store_true", help="print each version's live score as JSON")
    feedback.add_argument("--site-config", required=True, help=SITE_CONFIG_HELP)
    feedback.set_defaults(func=_feedback)


def _serve(args: argparse.Namespace) -> int:
    from fedretrain.web import listen, listen_address, serve, url

    # The service has no login: it listens on loopback only, where the site's own gateway can reach it.
    address, _ = listen_address(args.host, tls=False)
    from cli.site import read_site_config
    from client.serve.app import ServedModel, create_app
    from client.serve.journal import Journal

    site = read_site_config(args.site_config)
    served = ServedModel(site)
    installed = served.current()  # loaded and verified before the address is given out
    sock = listen(address, args.port)
    print(
        f"fedretrain site serve: {url(sock)}v1/completions answers with version {installed.version} "
        f"of site {site.site_id} (Ctrl-C stops it)",
        flush=True,
    )
    serve(create_app(site, Journal.at(site.state_path), served), sock)
    print("fedretrain site serve: stopped")
    return 0


def _feedback(args: argparse.Namespace) -> int:
    from cli.site import read_site_config
    from client.serve.feedback import give_feedback
    from client.serve.journal import Journal
    from fedretrain.errors import ConfigError

    site = read_site_config(args.site_config)
    journal = Journal.at(site.state_path)
    if args.scores:
        print(json.dumps({"site_id": site.site_id, "versions": journal.scores()}, indent=2))
        return 0
    if not args.id:
        raise ConfigError("feedback: give the answer's id (cmpl-...), or --scores")
    entry = give_feedback(site, journal, args.id, rating=args.rating, correction=args.correction, source="cli")
    if args.rating:
        print(f"rated {args.id} ({'version ' + str(entry['version'])}): {args.rating}")
    else:
        ingested = entry["ingested"]
        print(
            f"correction of {args.id} (version {entry['version']}) ingested: {ingested['to_train']} to train, "
            f"{ingested['to_heldout']} held out, {ingested['duplicates']} duplicate"
        )
    return 0

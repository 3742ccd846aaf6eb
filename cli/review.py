"""``fedretrain site review list|accept|reject|correct``: the site's human review queue (client/review.py)."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

SITE_CONFIG_HELP = "the site's node_config as JSON (simulation: <site>/site.json), or a joined site's node-config.toml"


def add_review_commands(site_subparsers: Any) -> None:
    review = site_subparsers.add_parser(
        "review",
        help="review training records: list the least certain, accept, reject or correct them",
        description="The site's own review queue; nothing of it leaves the site. With train.require_review=true "
        "a round trains only on accepted records.",
    )
    actions = review.add_subparsers(dest="action", required=True, metavar="{list,accept,reject,correct}")
    listing = actions.add_parser(
        "list", help="unreviewed training records, the installed version's least certain first"
    )
    listing.add_argument("--site-config", required=True, help=SITE_CONFIG_HELP)
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    listing.add_argument("overrides", nargs="*", help="Hydra overrides for the job (the model that scores them)")
    listing.set_defaults(func=_list)
    for name, verb in (("accept", "train on"), ("reject", "never train on")):
        decide = actions.add_parser(name, help=f"{verb} these records")
        decide.add_argument("ids", nargs="+", metavar="ID", help="record ids (from review list)")
        decide.add_argument("--site-config", required=True, help=SITE_CONFIG_HELP)
        decide.add_argument("--by", default=None, help="who decides (default: the login name)")
        decide.set_defaults(func=_decide, decision=name)
    correction = actions.add_parser("correct", help="replace a record with a corrected text (accepted)")
    correction.add_argument("id", metavar="ID")
    correction.add_argument("--text", required=True, help="the corrected record's text")
    correction.add_argument("--site-config", required=True, help=SITE_CONFIG_HELP)
    correction.add_argument("--by", default=None, help="who corrects (default: the login name)")
    correction.set_defaults(func=_correct)


def _list(args: argparse.Namespace) -> int:
    from cli.site import read_site_config
    from client.review import as_rows, dumps, pending
    from client.round.site import _installed_losses
    from fedretrain.config import Job, compose_config
    from fedretrain.errors import ConfigError

    if args.limit < 1:
        raise ConfigError(f"--limit: at least 1, got {args.limit}")
    site = read_site_config(args.site_config)
    job = Job.from_config(compose_config(args.overrides), run_id="review")
    records = pending(site)
    losses = _installed_losses(site, job, [r.text for r in records]) if records else []
    rows = as_rows(records, losses)[: args.limit]
    print(dumps(rows))
    print(f"{len(records)} record(s) wait for review at site {site.site_id}; shown: the {len(rows)} least certain")
    return 0


def _decide(args: argparse.Namespace) -> int:
    from cli.site import read_site_config
    from client.review import decide

    site = read_site_config(args.site_config)
    entries = decide(site, args.ids, args.decision, by=args.by or getpass.getuser())
    print(f"{args.decision}ed {len(entries)} record(s) at site {site.site_id}")
    return 0


def _correct(args: argparse.Namespace) -> int:
    from cli.site import read_site_config
    from client.review import correct

    site = read_site_config(args.site_config)
    entry = correct(site, args.id, args.text, by=args.by or getpass.getuser())
    print(f"{args.id} corrected: {entry['id']} ingested and accepted, {args.id} rejected")
    return 0

"""``fedretrain site ingest``: parse, call ``client.ingest.pipeline``, print one line per file.

The core is imported inside the handler, like every command's, so that the CLI
starts fast; ingestion needs neither torch nor Flower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedretrain.errors import FedretrainError

if TYPE_CHECKING:
    from client.ingest.pipeline import IngestReport
    from fedretrain.config import SiteConfig


def add_site_commands(site_subparsers: Any) -> None:
    """Add ``ingest [PATH ...] --site-config SITE.json [--inbox [DIR]] [--watch S] [--max-polls N]``."""
    ingest = site_subparsers.add_parser(
        "ingest",
        help="add new records to the site's store (checked, masked, deduplicated, split)",
        description="Appends new records to the site's train.jsonl and heldout.jsonl. Bad lines go to the "
        "quarantine file, duplicates are dropped, and with redact=true e-mail addresses, phone "
        "numbers and record numbers are masked first. Exit 0 when it ran, 2 on an error.",
    )
    ingest.add_argument("paths", nargs="*", metavar="PATH", help="JSONL or CSV files to ingest")
    ingest.add_argument(
        "--site-config",
        required=True,
        help="the site's node_config as JSON (simulation: <site>/site.json), or a joined site's "
        "<state-dir>/node-config.toml",
    )
    ingest.add_argument(
        "--inbox",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="ingest every file in DIR (default: the site's inbox-dir), moving each to "
        "DIR/done/ (or DIR/failed/ when it cannot be read)",
    )
    ingest.add_argument(
        "--watch", type=float, metavar="SECONDS", help="with --inbox: poll the inbox every SECONDS until interrupted"
    )
    ingest.add_argument("--max-polls", type=int, metavar="N", help="with --watch: stop after N polls")
    ingest.set_defaults(func=_site_ingest)

    status = site_subparsers.add_parser(
        "status",
        help="what the coordinator would learn from this site now: new records, drift, epsilon",
        description="Computes the site's status reply on its own data (counts, drift scores, the published "
        "model's loss on new records, privacy totals) and prints it; nothing is sent.",
    )
    status.add_argument(
        "--site-config",
        required=True,
        help="the site's node_config as JSON (simulation: <site>/site.json), or a joined site's "
        "<state-dir>/node-config.toml",
    )
    status.add_argument("overrides", nargs="*", help="Hydra overrides for the job (model, train, privacy, monitor)")
    status.set_defaults(func=_site_status)
    _add_join(site_subparsers)


def _add_join(site_subparsers: Any) -> None:
    join = site_subparsers.add_parser(
        "join",
        help="join a federation: run this site's SuperNode (until stopped)",
        description="Runs Flower's SuperNode with TLS to the coordinator's SuperLink (checked against the "
        "federation's CA) and the site's key for node authentication. The site's settings "
        "become its node config; the coordinator never sees or sets them.",
    )
    join.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink")
    join.add_argument("--ca", type=Path, help="the federation's CA certificate (ca.pem)")
    join.add_argument("--key", type=Path, help="this site's private key (fedretrain keys site SITE_ID)")
    join.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no node key: a test bench on one machine only, never a hospital",
    )
    join.add_argument(
        "--site-config",
        type=Path,
        help="the site's settings as JSON (node-config keys: data-dir, epsilon-ceiling, share-drift-scores, "
        "status-noise, ...); a flag given here wins over the same key in it",
    )
    join.add_argument("--data", type=Path, help="holds train.jsonl and heldout.jsonl (or data-dir in --site-config)")
    join.add_argument(
        "--epsilon-ceiling", type=float, help="the site's lifetime epsilon budget (or epsilon-ceiling in --site-config)"
    )
    join.add_argument("--site-id", help="the site's pseudonymous name (default: the key file's name)")
    join.add_argument("--delta", type=float, help="default 1e-5")
    join.add_argument(
        "--share-drift-scores",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send the drift and loss scores of a status reply to the coordinator, un-noised, so its "
        "drift and performance triggers can fire (see the README's 'What a site discloses')",
    )
    join.add_argument(
        "--coordinator-key",
        type=Path,
        help="the coordinator's public signing key (coordinator.pub); without it nothing is installed",
    )
    join.add_argument("--state-dir", type=Path, help="privacy ledger and model store (default: DATA/.fedretrain)")
    join.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    join.add_argument("--accountant", choices=("rdp", "prv"), help="default rdp")
    join.add_argument(
        "--smoke-eval",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score a published version on held-out data before installing it; refuse a worse one",
    )
    join.add_argument(
        "--port",
        type=int,
        default=9094,
        help="this SuperNode's local Runtime API port (one per SuperNode on a machine)",
    )
    join.add_argument(
        "--model",
        default="embedded",
        help="base model to have ready before joining ('embedded' is built once on first use)",
    )
    join.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts")
    join.add_argument(
        "--clientapp-stuck-after",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="stop a ClientApp process still waiting for its message after this long (its "
        "ServerApp died while sending it; Flower 1.41 would keep it for ever)",
    )
    join.set_defaults(func=_site_join)


def _site_join(args: argparse.Namespace) -> int:
    from client.join import (
        ClientAppWatchdog,
        JoinSettings,
        check_site,
        claim_state,
        node_config_path,
        prepare_site,
        start_supernode,
    )
    from client.worker import WorkerProcess
    from fedretrain.deploy.flower import supervise
    from fedretrain.modeling.loading import resolve_model_path

    secure = bool(args.ca and args.key)
    if args.insecure == secure or (args.insecure and (args.ca or args.key)):
        raise FedretrainError("give --ca and --key (TLS and node authentication), or --insecure for a test bench")
    if not args.clientapp_stuck_after > 0:
        raise FedretrainError(f"--clientapp-stuck-after: must be > 0 seconds, got {args.clientapp_stuck_after}")
    node_config = _join_node_config(args)
    try:
        checked = check_site(node_config)
    except FedretrainError as err:
        if not args.site_config:
            raise
        raise FedretrainError(f"{args.site_config}: {err}") from None
    _check_data(checked)
    print(_disclosure(checked), flush=True)
    # Claimed before anything is written: a second join on this state changes nothing of the first's.
    with claim_state(checked) as state_lock:
        site = prepare_site(node_config)
        resolve_model_path(args.model)
        # The worker first: the SuperNode's first message already finds it listening.
        worker = WorkerProcess(site, node_config_path(site))
        worker.start()
        try:
            worker.keep_running()
            proc = start_supernode(
                site,
                JoinSettings(
                    superlink=args.superlink, ca=args.ca, key=args.key, port=args.port, max_retries=args.max_retries
                ),
                state_lock,
            )
            watchdog = ClientAppWatchdog(proc.pid, site.state_path, args.clientapp_stuck_after)
            watchdog.start()
            try:
                return supervise(proc)
            finally:
                watchdog.stop()
        finally:
            worker.stop()


# Settings that name files: resolved against where `site join` is typed, since the
# SuperNode and the worker may run elsewhere.
_PATH_KEYS = ("data-dir", "state-dir", "coordinator-key", "inbox-dir")


def _join_node_config(args: argparse.Namespace) -> dict[str, Any]:
    """The site's node config: ``--site-config``'s keys, then the flags given, then defaults."""
    settings = _read_settings(args.site_config) if args.site_config else {}
    # A key set to null in the file is unset, as everywhere else a site's config is read.
    node_config: dict[str, Any] = {key: value for key, value in settings.items() if value is not None}
    flags = {
        "site-id": args.site_id,
        "data-dir": args.data,
        "epsilon-ceiling": args.epsilon_ceiling,
        "delta": args.delta,
        "device": args.device,
        "accountant": args.accountant,
        "smoke-eval": args.smoke_eval,
        "share-drift-scores": args.share_drift_scores,
        "coordinator-key": args.coordinator_key,
        "state-dir": args.state_dir,
    }
    node_config.update({key: value for key, value in flags.items() if value is not None})
    if "site-id" not in node_config and args.key:
        node_config["site-id"] = args.key.stem
    node_config.setdefault("delta", 1e-5)
    where = f" in {args.site_config}" if args.site_config else ""
    for key, flag in (("site-id", "--site-id"), ("data-dir", "--data"), ("epsilon-ceiling", "--epsilon-ceiling")):
        if key not in node_config:
            raise FedretrainError(
                f"site join: give {flag}, or {key}{where or ' in --site-config'}"
                + (" (the site id defaults to the key file's name)" if key == "site-id" else "")
            )
    for key in _PATH_KEYS:
        if key in node_config:
            value = node_config[key]
            if not (isinstance(value, (str, Path)) and str(value).strip()):
                raise FedretrainError(f"{key}{where or ''}: must be a path, got {value!r}")
            node_config[key] = str(Path(value).resolve())
    return node_config


def _check_data(site: SiteConfig) -> None:
    """Refuse to join with a data file the site would refuse at every round (checked as
    ``fedretrain data validate`` checks it: the file, line and field, never a record's values)."""
    from fedretrain.data.notes import read_records
    from fedretrain.errors import DataValidationError

    for path in (site.train_path, site.heldout_path):
        if not path.exists():  # ingestion may write it later; a round refuses while it is missing
            continue
        try:
            read_records(path)
        except DataValidationError as err:
            raise FedretrainError(f"site join: {err}; fix the file, then join (nothing was started)") from None


def _disclosure(site: SiteConfig) -> str:
    """What this site lets leave, in one line, printed when it joins: a settings file can
    carry opt-ins (a simulated site's site.json shares drift scores) the operator should see."""
    evaluation = f"noised z={site.eval_noise:g}" if site.share_evaluation else "not answered"
    return (
        f"site {site.site_id}: epsilon ceiling {site.epsilon_ceiling:g} (delta {site.delta:g}); "
        f"drift and loss scores {'SHARED un-noised' if site.share_drift_scores else 'kept at the site'}; "
        f"status counts noised z={site.status_noise:g}, charged at most every {site.status_interval_s:g} s; "
        f"evaluation {evaluation}; "
        f"non-private rounds {'ALLOWED' if site.allow_non_private else 'refused'}"
    )


def _read_settings(path: Path) -> dict[str, Any]:
    """A site's settings file: JSON (a simulated site's ``site.json``, or the operator's own),
    or the ``node-config.toml`` that ``site join`` writes into the site's state directory."""
    import tomllib

    try:
        text = Path(path).read_text(encoding="utf-8")
        settings = tomllib.loads(text) if Path(path).suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as err:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise FedretrainError(f"{path}: cannot read the site's config: {err}") from None
    if not isinstance(settings, dict):
        raise FedretrainError(
            f"{path}: cannot read the site's config: expected an object, got {type(settings).__name__}"
        )
    return settings


def _site_ingest(args: argparse.Namespace) -> int:
    from client.ingest.pipeline import ingest_file

    _check_arguments(args)
    site = read_site_config(args.site_config)
    reports: list[IngestReport] = []
    for path in args.paths:
        reports.append(ingest_file(site, path))
        print(reports[-1].summary(), flush=True)
    if args.inbox is not None:
        try:
            reports += _poll_inbox(site, args.inbox or None, args.watch, args.max_polls)
        except KeyboardInterrupt:  # the way out of --watch; an interrupted ingest is recovered next time
            print("stopped watching the inbox", flush=True)
    if any(report.quarantined for report in reports):
        print(f"quarantined records (reasons included) are in {site.quarantine_path}")
    return 2 if any(report.error for report in reports) else 0


def _site_status(args: argparse.Namespace) -> int:
    from client.status import format_status, site_status
    from fedretrain.config import Job, compose_config

    site = read_site_config(args.site_config)
    cfg = compose_config(args.overrides)
    print(format_status(site.site_id, site_status(site, Job.from_config(cfg, run_id="status"), cfg.monitor)))
    return 0


def _poll_inbox(site: SiteConfig, inbox: str | None, watch: float | None, max_polls: int | None) -> list[IngestReport]:
    from client.ingest.pipeline import ingest_inbox

    reports: list[IngestReport] = []
    polls = 0
    while True:
        for report in ingest_inbox(site, inbox):
            print(report.summary(), file=sys.stderr if report.error else sys.stdout, flush=True)
            reports.append(report)
        polls += 1
        if watch is None or (max_polls is not None and polls >= max_polls):
            return reports
        time.sleep(watch)


def _check_arguments(args: argparse.Namespace) -> None:
    if not args.paths and args.inbox is None:
        raise FedretrainError("site ingest: name files to ingest, or --inbox")
    if args.watch is not None and (args.inbox is None or not args.watch > 0):
        raise FedretrainError("--watch: needs --inbox and a number of seconds > 0")
    if args.max_polls is not None and (args.watch is None or args.max_polls < 1):
        raise FedretrainError("--max-polls: needs --watch and a count >= 1")


def read_site_config(path: str | Path) -> SiteConfig:
    from fedretrain.config import site_config_from_node_config

    node_config = _read_settings(Path(path))
    try:
        # These commands never train, and only training reads allow-reproducible-noise: a
        # simulated site's site.json is read as it is.
        return site_config_from_node_config(node_config, simulation=True)
    except ValueError as err:
        raise FedretrainError(f"{path}: cannot read the site's config: {err}") from None

"""The ``fedretrain`` command. Each subcommand parses its arguments, calls one function, prints.

The command line is the process edge: it sits above every role package (simulation/,
server/, client/, the core), which never import it. It imports them lazily so that
``fedretrain data validate`` starts without loading torch or Flower. The commands of
each role are in ``cli/site.py``, ``cli/coordinator.py`` and ``cli/registry.py``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedretrain.errors import FedretrainError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except FedretrainError as err:
        print(f"fedretrain: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedretrain", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="also show Flower's and Ray's logs")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        help="run a federation of virtual sites on Flower's simulation engine",
        description="Hydra overrides, e.g.: simulation.num_sites=8 privacy.target_epsilon=4",
    )
    sim.add_argument("overrides", nargs="*", help="Hydra overrides (key=value, group=option)")
    sim.set_defaults(func=_simulate)

    data = sub.add_parser("data", help="site data tools").add_subparsers(dest="data_command", required=True)
    validate = data.add_parser("validate", help="check data files against the schema (exit 1 on a bad file)")
    validate.add_argument("paths", nargs="+", help="JSONL or CSV files")
    validate.set_defaults(func=_data_validate)
    synthesize = data.add_parser(
        "synthesize",
        help="write a synthetic federation's data: sites' notes and a validation set",
        description="Writes DIR/site-00 ... (train.jsonl, heldout.jsonl) and DIR/coordinator/validation.jsonl, "
        "the same non-IID notes a simulation generates, e.g. to try a deployment on one machine.",
    )
    synthesize.add_argument("--out", type=Path, required=True, help="directory to write into")
    synthesize.add_argument("overrides", nargs="*", help="Hydra overrides (simulation.num_sites=3, seed=0, ...)")
    synthesize.set_defaults(func=_data_synthesize)
    part = data.add_parser(
        "partition",
        help="split one data set into site folders (by a column, or Dirichlet skew) for simulation.sites_dir",
        description="Writes OUT/<site>/train.jsonl and heldout.jsonl, every record as it was. --by COLUMN: one "
        "site per value of the column. --sites N: Dirichlet skew with --alpha over --label COLUMN's classes "
        "(without --label: over the text-length quartiles). The input is only read.",
    )
    part.add_argument("path", type=Path, help="a JSONL or CSV file of records (text, and any other columns)")
    part.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    how = part.add_mutually_exclusive_group(required=True)
    how.add_argument("--by", metavar="COLUMN", help="one site per distinct value of this column")
    how.add_argument("--sites", type=int, metavar="N", help="N sites with Dirichlet skew")
    part.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (small: more skew)")
    part.add_argument("--label", metavar="COLUMN", help="the class column to skew by (default: text length)")
    part.add_argument("--heldout", type=float, default=0.2, help="fraction of each site's records held out")
    part.add_argument("--seed", type=int, default=0)
    part.set_defaults(func=_data_partition)

    site = sub.add_parser("site", help="tools for a site (hospital)").add_subparsers(dest="site_command", required=True)
    generate = site.add_parser(
        "generate",
        help="generate text with the site's installed version",
        description="Loads the base model plus the site's current adapter (verified "
        "again against the pinned coordinator key) and continues a prompt.",
    )
    where = generate.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--site-config",
        help="the site's node_config as JSON (simulation: <site>/site.json), or a joined site's node-config.toml",
    )
    where.add_argument("--store", help="the site's model store directory (<state-dir>/models)")
    generate.add_argument("--coordinator-key", help="with --store: the pinned coordinator public key (PEM)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=40)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=_site_generate)

    from cli.serve import add_serve_commands
    from cli.site import add_site_commands

    add_site_commands(site)
    add_serve_commands(site)
    from cli.review import add_review_commands

    add_review_commands(site)

    from cli.registry import add_keys_commands, add_registry_commands

    add_keys_commands(sub)
    add_registry_commands(sub)
    _add_coordinator_commands(sub)

    _add_privacy_commands(sub)

    from cli.dashboard import add_dashboard_command
    from cli.export import add_export_command

    add_dashboard_command(sub)
    add_export_command(sub)

    config = sub.add_parser("config", help="configuration tools").add_subparsers(dest="config_command", required=True)
    show = config.add_parser("show", help="print the composed, validated config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=_config_show)
    return parser


def _add_privacy_commands(subparsers: Any) -> None:
    privacy = subparsers.add_parser("privacy", help="privacy tools").add_subparsers(
        dest="privacy_command", required=True
    )
    audit = privacy.add_parser(
        "audit",
        help="empirical lower bound on a site's epsilon from one cycle (Steinke et al. 2023)",
        description="Plants random canaries in one simulated site's data, each with probability 1/2, runs "
        "one cycle through the site's own training and prints the epsilon lower bound beside the "
        "ledger's epsilon; exits 1 if the bound exceeds it. E.g.: fedretrain privacy audit "
        "--canaries 256 train.local_steps=240",
    )
    audit.add_argument("--canaries", type=int, default=64, help="canaries m (default 64)")
    audit.add_argument("--rounds", type=int, default=2, help="rounds in the cycle (default 2)")
    audit.add_argument("--no-dp", action="store_true", help="audit training without DP (shows the leak)")
    audit.add_argument("--confidence", type=float, default=0.95)
    audit.add_argument("--seed", type=int, help="the auditor's seed for canaries and coins (default: from the OS)")
    audit.add_argument("overrides", nargs="*", help="Hydra overrides for the job (train.local_steps=120, ...)")
    audit.set_defaults(func=_privacy_audit)


def _privacy_audit(args: argparse.Namespace) -> int:
    from simulation.audit import AuditSettings, run_audit

    try:
        settings = AuditSettings(
            canaries=args.canaries,
            rounds=args.rounds,
            private=not args.no_dp,
            confidence=args.confidence,
            overrides=tuple(args.overrides),
            auditor_seed=args.seed,
        )
    except ValueError as err:
        raise FedretrainError(f"privacy audit: {err}") from None
    result = run_audit(settings)
    b, ledger = result.bound, result.ledger_epsilon
    print(
        f"m={b.m} canaries, r={b.r} guesses, v={b.v} right: epsilon >= {b.epsilon:.3f} at "
        f"{b.confidence:.0%} confidence (delta={b.delta:g}); ledger epsilon: "
        f"{'none, DP off' if ledger is None else f'{ledger:.3f}'}"
    )
    if ledger is not None and b.epsilon > ledger:
        print("fedretrain: error: the audit refutes the ledger's epsilon", file=sys.stderr)
        return 1
    return 0


def _add_coordinator_commands(subparsers: Any) -> None:
    coordinator = subparsers.add_parser("coordinator", help="the coordinator: its SuperLink, runs and watch")
    commands = coordinator.add_subparsers(dest="coordinator_command", required=True)
    watch = commands.add_parser(
        "watch",
        help="poll the sites, check the triggers, run a cycle when one fires",
        description="With --dir: the standing watch on the deployment whose SuperLink that coordinator "
        "directory runs (until SIGTERM or trigger.max_polls polls; each poll and each cycle is a Flower "
        "run), e.g. fedretrain coordinator watch --dir coord experiment=smoke registry.root=registry "
        "registry.signing_key=keys/coordinator.key validation_path=data/coordinator/validation.jsonl. "
        "Without: the simulated federation in simulation.federation_dir, e.g. fedretrain coordinator "
        "watch experiment=smoke simulation.federation_dir=fed trigger.poll_interval_s=600",
    )
    watch.add_argument("--dir", type=Path, help="the coordinator directory of a running deployment")
    watch.add_argument("overrides", nargs="*", help="Hydra overrides (key=value, group=option)")
    watch.set_defaults(func=_coordinator_watch)
    retrain = commands.add_parser("retrain", help="ask the watch for a retraining cycle at its next poll")
    retrain.add_argument("--root", type=Path, required=True, help="the coordinator's registry directory")
    retrain.add_argument("--reason", default="operator request", help="why (kept in the watch's logs)")
    retrain.set_defaults(func=_coordinator_retrain)

    from cli.coordinator import add_deploy_commands

    add_deploy_commands(commands)


def _coordinator_watch(args: argparse.Namespace) -> int:
    import json

    if args.dir is not None:
        from server.deploy.coordinator import Coordinator
        from server.watch.service import watch_service

        watcher = watch_service(Coordinator(args.dir), list(args.overrides))
        print(f"fedretrain: the watch stopped after {watcher.state.polls} polls and {watcher.state.cycles} cycles")
        return 0

    from simulation.runner import watch

    run_dir = watch(args.overrides, verbose=args.verbose)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(
        f"fedretrain: {len(summary['polls'])} polls, {summary['cycles']} cycles, versions published: "
        f"{summary['published_versions'] or 'none'}; written to {run_dir}"
    )
    return 0


def _coordinator_retrain(args: argparse.Namespace) -> int:
    from server.watch.loop import request_retrain

    path = request_retrain(args.root, args.reason)
    print(f"retraining requested ({path.name}); the watch starts a cycle at its next poll")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import json

    from cli.dashboard import DEFAULT_PORT
    from cli.exits import OK, cycle_exit_code
    from simulation.runner import simulate

    run_dir = simulate(args.overrides, verbose=args.verbose)
    print(f"fedretrain: run written to {run_dir}")
    print(
        f"fedretrain: to see it in a browser, run: fedretrain dashboard --runs {shlex.quote(str(run_dir.parent))}"
        f" and open http://127.0.0.1:{DEFAULT_PORT}/cycles/{run_dir.name}"
    )
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    code = cycle_exit_code(summary)
    if code != OK:
        print(f"fedretrain: nothing published (exit status {code}, see the README's 'Exit codes')", file=sys.stderr)
    return code


def _site_generate(args: argparse.Namespace) -> int:
    from client.install.generate import generate

    if args.site_config:
        from cli.site import read_site_config

        site = read_site_config(args.site_config)
        store, key, device, variant = site.model_store_path, site.coordinator_key, site.device, site.model_variant
    else:
        store, key, device, variant = Path(args.store), args.coordinator_key, "auto", "full"
    result = generate(
        store,
        args.prompt,
        coordinator_key=Path(key) if key else None,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        device=device,
        variant=variant,
    )
    student = " (its student)" if variant == "student" else ""
    print(f"[version {result.version}{student}, {result.new_tokens} new tokens]")
    print(result.text)
    return 0


def _data_validate(args: argparse.Namespace) -> int:
    from fedretrain.data.notes import read_records
    from fedretrain.errors import DataValidationError

    failed = 0
    for path in args.paths:
        try:
            records = read_records(path)
        except DataValidationError as err:
            print(f"INVALID {err}", file=sys.stderr)
            failed += 1
        else:
            print(f"OK {path}: {len(records)} records")
    return 1 if failed else 0


def _data_partition(args: argparse.Namespace) -> int:
    from simulation.partition import partition

    counts = partition(
        args.path,
        args.out,
        by=args.by,
        sites=args.sites,
        alpha=args.alpha,
        label=args.label,
        heldout_fraction=args.heldout,
        seed=args.seed,
    )
    for site, (train, heldout) in counts.items():
        print(f"site {site}: {train} train, {heldout} held-out records in {args.out / site}")
    return 0


def _data_synthesize(args: argparse.Namespace) -> int:
    from fedretrain.config import compose_config
    from simulation.federation import build_federation

    fed = build_federation(compose_config(args.overrides), args.out)
    for site in fed.sites:
        print(f"site {site.site_id}: {site.data_dir}")
    print(f"validation set: {fed.validation_path}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from fedretrain.config import compose_raw, to_yaml
    from fedretrain.config.parse import build
    from fedretrain.config.schema import Config

    raw = compose_raw(args.overrides)
    build(Config, raw)  # validate: an error names the key
    print(to_yaml(raw), end="")
    return 0


def _setup_logging(verbose: bool) -> None:
    # fedretrain's own lines (progress per round, refusals) go to stderr with a timestamp.
    # Flower keeps its own console handler; only the root logger is left alone, so
    # nothing is printed twice.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    ours = logging.getLogger("fedretrain")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


if __name__ == "__main__":
    raise SystemExit(main())

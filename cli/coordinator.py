"""``fedretrain coordinator start|register|run|status``: the coordinator on Flower's deployment engine.

Each handler parses, calls ``server.deploy.coordinator``, prints. The modules are imported inside
the handlers so that the CLI starts fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path("coordinator")


def add_deploy_commands(commands: Any) -> None:
    """Add the deployment subcommands to ``fedretrain coordinator``."""
    start = commands.add_parser(
        "start",
        help="run the SuperLink (TLS, node authentication, database) until stopped",
        description="Runs Flower's SuperLink with the TLS certificate in --keys (ca.pem, superlink.pem, "
        "superlink.key), SuperNode authentication and a persistent database, then registers "
        "each --site public key. Stop it with Ctrl-C or SIGTERM.",
    )
    _dir(start)
    start.add_argument(
        "--address",
        default="127.0.0.1:9093",
        metavar="HOST:PORT",
        help="where the SuperLink listens (Fleet, Control and Runtime APIs; default 127.0.0.1:9093)",
    )
    start.add_argument(
        "--connect",
        metavar="HOST:PORT",
        help="the address this machine's CLI uses (default: --address; give one the certificate "
        "names when listening on 0.0.0.0)",
    )
    start.add_argument("--keys", type=Path, help="directory with ca.pem, superlink.pem and superlink.key")
    start.add_argument("--insecure", action="store_true", help="no TLS, no node authentication: a test bench only")
    start.add_argument(
        "--site",
        type=Path,
        action="append",
        default=[],
        metavar="SITE.pub",
        help="a site's public key to register (repeat for each site)",
    )
    start.set_defaults(func=_start)

    register = commands.add_parser("register", help="register a site's public key with the running SuperLink")
    _dir(register)
    register.add_argument("public_keys", type=Path, nargs="+", metavar="SITE.pub")
    register.set_defaults(func=_register)

    run = commands.add_parser(
        "run",
        help="submit a retraining cycle to the SuperLink (flwr run)",
        description="Composes and checks the config, then submits this project as a Flower app with `flwr run`. "
        "Paths in registry.root, registry.signing_key, validation_path and output_dir are taken "
        "relative to the current directory. --resume RUN continues a cycle from its last "
        "complete round.",
    )
    _dir(run)
    run.add_argument("--resume", type=Path, metavar="RUN", help="the run directory of a cycle to continue")
    run.add_argument(
        "--wait",
        action="store_true",
        help="wait for the run to finish; the exit status says how it ended (README: Exit codes)",
    )
    run.add_argument("--timeout", type=float, default=3600.0, help="with --wait: give up after this many seconds")
    run.add_argument("overrides", nargs="*", help="Hydra overrides (key=value, group=option)")
    run.set_defaults(func=_run)

    status = commands.add_parser("status", help="the registered sites (online or not) and the runs")
    _dir(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_status)


def _dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="the coordinator directory: Flower's database, settings, sites, runs",
    )


def _start(args: argparse.Namespace) -> int:
    from fedretrain.deploy.flower import supervise
    from fedretrain.errors import DeployError
    from server.deploy.coordinator import Coordinator, register_site, start_superlink

    if args.insecure == bool(args.keys):
        raise DeployError("give --keys (TLS and node authentication) or --insecure (a test bench only)")
    coord = Coordinator(args.dir)
    proc = start_superlink(coord, args.address, None if args.insecure else args.keys, connect=args.connect)
    try:
        for key in args.site:
            print(f"site {key.stem}: node {register_site(coord, key)}", flush=True)
    except BaseException:
        proc.terminate()
        raise
    print(f"SuperLink listening on {args.address}; coordinator directory {coord.root}", flush=True)
    return supervise(proc)


def _register(args: argparse.Namespace) -> int:
    from server.deploy.coordinator import Coordinator, register_site

    coord = Coordinator(args.dir)
    for key in args.public_keys:
        print(f"site {key.stem}: node {register_site(coord, key)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from server.deploy.coordinator import Coordinator, submit_run, wait_for_run

    coord = Coordinator(args.dir)
    run_id, run_dir = submit_run(coord, list(args.overrides), resume=args.resume)
    print(f"run {run_id} submitted; run directory {run_dir}", flush=True)
    if not args.wait:
        return 0
    final = wait_for_run(coord, run_id, args.timeout)
    summary = run_dir / "summary.json"
    outcome = json.loads(summary.read_text()) if summary.exists() else {}
    print(f"run {run_id}: {final}; " + _outcome(outcome))
    from cli.exits import FAILED, cycle_exit_code

    return cycle_exit_code(outcome) if final == "finished:completed" else FAILED


def _outcome(summary: dict[str, Any]) -> str:
    if not summary:
        return "no summary written (see `flwr log` and the coordinator's log)"
    if summary.get("aborted"):
        return f"aborted, nothing published: {summary['aborted']}"
    published = summary.get("published_version")
    rollout = summary.get("rollout") or {}
    if published:
        return f"published version {published}" + (" after its canaries" if rollout else "")
    if rollout:
        return f"version {rollout['version']}: {rollout['decision']} at its canaries, nothing published"
    return f"nothing published ({summary['gate']['decision']})"


def _status(args: argparse.Namespace) -> int:
    from server.deploy.coordinator import Coordinator, status

    report = status(Coordinator(args.dir))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"SuperLink {report['superlink']}")
    for site, info in report["sites"].items():
        print(f"  site {site:<16} node {info['node_id']:<22} {info['status']}")
    for run in report["runs"]:
        print(f"  run {run['run_id']:<22} {run['status']:<22} {run['elapsed']}")
    watch = report.get("watch")
    if watch:
        state = "running" if watch["running"] else "not running"
        doing = watch.get("phase", "?") + (f" (Flower run {watch['flower_run']})" if watch.get("flower_run") else "")
        print(
            f"watch: {state}, pid {watch.get('pid')}, {doing}; {watch.get('polls', 0)} polls, "
            f"{watch.get('cycles', 0)} cycles; records in {watch.get('registry')}/watch"
        )
    return 0

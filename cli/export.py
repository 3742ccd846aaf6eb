"""``fedretrain export``: parse, read the run directories, export each to MLflow and TensorBoard, print.

The exporters are imported inside the handler, so that the other commands start fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedretrain.errors import ConfigError, TrackingError


def add_export_command(subparsers: Any) -> None:
    """Add ``export`` to the top-level subparsers."""
    export = subparsers.add_parser(
        "export",
        help="copy runs to MLflow and TensorBoard (the run directories and the registry stay the source of truth)",
        description="Reads a run directory (--run) or every run in a folder (--runs), finished or running, and "
        "exports each round's metrics, the config, the gate's figures and decision, and the registry's versions "
        "with the champion as the alias 'champion' to MLflow, and the curves to TensorBoard. Exporting again adds "
        "only what is new. E.g.: fedretrain export --runs runs --mlflow-uri sqlite:///runs/mlflow.db "
        "--tensorboard runs/tensorboard",
    )
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--run", type=Path, metavar="RUN_DIR", help="a run directory (config.yaml, metrics.jsonl, summary.json)"
    )
    which.add_argument(
        "--runs",
        type=Path,
        metavar="DIR",
        help="a folder of run directories (a simulation's output_dir, a coordinator's runs/)",
    )
    export.add_argument(
        "--mlflow-uri", metavar="URI", help="sqlite:///PATH.db (no server needed), http(s)://HOST:PORT, ..."
    )
    export.add_argument(
        "--tensorboard", type=Path, metavar="DIR", help="a folder: one TensorBoard log directory per run below it"
    )
    export.add_argument(
        "--experiment", metavar="NAME", help="the MLflow experiment (default: the run's tracking.experiment)"
    )
    export.add_argument(
        "--model-name",
        metavar="NAME",
        help="the MLflow registered model of the registry (default: fedretrain-<key id>)",
    )
    export.add_argument(
        "--pubkey",
        type=Path,
        metavar="FILE",
        help="the coordinator's public key (keys/coordinator.pub): the champion alias then follows the chain it "
        "verifies; without it, the registry's own pinned key (not authenticated)",
    )
    export.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    _check(args)
    from fedretrain.registry.signing import load_public_key
    from server.tracking.export import Targets, export_run

    public_key = None if args.pubkey is None else load_public_key(args.pubkey)
    targets = Targets(args.mlflow_uri, args.tensorboard, args.experiment, args.model_name)
    runs, failed = _read_runs(args)
    unauthenticated = False
    for run in runs:
        exported = export_run(run, targets, public_key)
        unauthenticated |= not exported.authenticated
        print(exported.describe(targets))
    if unauthenticated:
        print(
            "fedretrain: the MLflow alias 'champion' follows the registry's own pinned key (NOT AUTHENTICATED); "
            "give --pubkey keys/coordinator.pub to follow only a chain the coordinator's key signed"
        )
    if failed:
        print(f"fedretrain: {failed} run(s) not exported (above)", file=sys.stderr)
    return 2 if failed else 0


def _check(args: argparse.Namespace) -> None:
    """Refuse bad flags before anything is read, naming the flag."""
    from fedretrain.config.schema import TRACKER_NAME, check_mlflow_uri

    if args.mlflow_uri is None and args.tensorboard is None:
        raise ConfigError("give --mlflow-uri URI, --tensorboard DIR or both: where to export to")
    if args.mlflow_uri is not None:
        check_mlflow_uri("--mlflow-uri", args.mlflow_uri)
    if args.model_name is not None and not TRACKER_NAME.fullmatch(args.model_name):
        raise ConfigError(f"--model-name {args.model_name!r}: letters, digits, '.', '_', '+' and '-' only")
    if args.experiment is not None and not args.experiment.strip():
        raise ConfigError("--experiment: must not be empty")
    for flag, path in (("--run", args.run), ("--runs", args.runs)):
        if path is not None and not path.is_dir():
            raise ConfigError(f"{flag} {path}: not a directory")


def _read_runs(args: argparse.Namespace) -> tuple[list[Any], int]:
    """The runs to export, and how many could not be read. Every run is read before anything is
    exported: with --runs, a damaged one is named and the others still go; with --run, it stops."""
    from server.tracking.runfiles import read_run

    runs, failed = [], 0
    for path in [args.run] if args.run is not None else _runs_in(args.runs):
        if args.run is None and not (path / "metrics.jsonl").is_file():
            print(f"fedretrain: {path.name}: no round scored yet, not exported")
            continue
        try:
            runs.append(read_run(path))
        except TrackingError as err:
            if args.run is not None:
                raise
            print(f"fedretrain: error: {err}", file=sys.stderr)
            failed += 1
    return runs, failed


def _runs_in(folder: Path) -> list[Path]:
    """The run directories below ``folder``, and the cycles a watch ran below its own, as the dashboard finds them."""
    from server.dashboard.catalogue import Catalogue

    found = sorted(run.path for run in Catalogue.open(folder, None).runs())
    if not found:
        raise ConfigError(f"--runs {folder}: no run directories in it (folders with config.yaml or metrics.jsonl)")
    return found

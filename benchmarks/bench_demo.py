"""The default demo, timed: start-up, where round time goes, and time to value.

Each run is a child process that calls ``simulation.runner.simulate`` (what
``fedretrain simulate`` calls) with two benchmark-only wrappers, installed at run
time and changing nothing the run computes:

- every ClientApp handler (train, evaluate, queries) appends its wall-clock start
  and end to a file: the client compute, which the replies do not report;
- the server's validation scoring (``server.cycle.run.evaluate_loss``) is timed likewise.

The round boundaries are the wall-clock times of the server's "round r/R" log lines
(written by the round's ``evaluate_fn``, like ``round_s`` in metrics.jsonl). Within a
round, client compute is the union of the handlers' intervals (two sites train at
once on two cores); the rest is server scoring plus framework (Flower, Ray, the
strategy, messages). Start-up is process start to the "round 0/" line.

Two runs: ``experiment=demo`` with the base model cache in place (warm), and the
same config for one round with an empty cache (cold: the embedded base model is
built first, as on a new machine).

Run from the repository root (not with ``-m``: opacus installs a ``benchmarks`` package)::

    python benchmarks/bench_demo.py [--json PATH]
"""

from __future__ import annotations

import time

T_IMPORT = time.time()  # before the heavy imports: the child's start-up clock

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo_figures import demo_rows  # noqa: E402


class _RoundClock(logging.Handler):
    """Keeps the wall time of every "round r/R" progress line of the server."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        head = record.getMessage().split("/", 1)[0]
        if head.startswith("round ") and head[6:].isdigit():
            self.rounds.setdefault(int(head[6:]), time.time())


def _timed_client_app(make_app, events: str):
    """``make_app`` with every registered handler timed into the file ``events``.

    Defined in ``__main__``, so Ray pickles it by value into the client actors.
    """

    def factory(*args, **kwargs):
        app = make_app(*args, **kwargs)
        for name, fn in list(app._registered_funcs.items()):  # pylint: disable=protected-access

            def timed(message, context, _fn=fn, _name=name):
                start = time.time()
                try:
                    return _fn(message, context)
                finally:
                    with open(events, "a", encoding="utf-8") as out:  # one short O_APPEND line
                        out.write(json.dumps({"what": _name, "start": start, "end": time.time()}) + "\n")

            app._registered_funcs[name] = timed  # pylint: disable=protected-access
        return app

    return factory


def child(overrides: list[str], t0: float, out: Path) -> None:
    """Run one simulation with the wrappers; write its clocks and run directory to ``out``."""
    import server.cycle.run
    import simulation.runner
    import simulation.session

    events = str(out.with_suffix(".events.jsonl"))
    clock = _RoundClock()
    ours = logging.getLogger("fedretrain")
    ours.addHandler(clock)
    ours.addHandler(logging.StreamHandler())
    ours.setLevel(logging.INFO)
    ours.propagate = False
    server_evals: list[tuple[float, float]] = []
    scoring = server.cycle.run.evaluate_loss

    def timed_scoring(*args, **kwargs):
        start = time.time()
        try:
            return scoring(*args, **kwargs)
        finally:
            server_evals.append((start, time.time()))

    server.cycle.run.evaluate_loss = timed_scoring
    simulation.session.make_client_app = _timed_client_app(simulation.session.make_client_app, events)
    run_dir = simulation.runner.simulate(overrides)
    client = [json.loads(line) for line in Path(events).read_text().splitlines()] if Path(events).exists() else []
    out.write_text(
        json.dumps(
            {
                "t0": t0,
                "end": time.time(),
                "run_dir": str(run_dir),
                "rounds": clock.rounds,
                "client": client,
                "server_evals": server_evals,
            }
        )
    )


def run_child(overrides: list[str], cache: str) -> dict:
    """One timed simulation in a fresh process, with ``FEDRETRAIN_CACHE=cache``."""
    with tempfile.TemporaryDirectory(prefix="frbench-") as tmp:
        out = Path(tmp) / "clock.json"
        command = [
            sys.executable,
            __file__,
            "--child",
            "--t0",
            repr(time.time()),
            "--json",
            str(out),
            "--",
            *overrides,
            f"output_dir={tmp}/runs",
        ]
        env = dict(os.environ, FEDRETRAIN_CACHE=cache, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
        if done.returncode != 0:
            raise SystemExit(f"simulate {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
        run_dir = Path(result["run_dir"])
        result["summary"] = json.loads((run_dir / "summary.json").read_text())
        result["metrics"] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return result


def measure(cache: str) -> list[dict[str, object]]:
    """Warm demo run, then a cold one-round run; the rows of the table."""
    warm = run_child(["experiment=demo"], cache)
    with tempfile.TemporaryDirectory(prefix="frcold-") as empty:
        cold = run_child(["experiment=demo", "rounds=1"], empty)
    return demo_rows(warm, cold)


def main(argv: list[str] | None = None) -> None:
    """Parent: run the demo twice and write rows. Child (``--child``): one timed simulation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write result rows here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.overrides, args.t0 or T_IMPORT, args.json)
        return
    cache = os.environ.get("FEDRETRAIN_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "fedretrain"))
    rows = demo_rows_printed(measure(cache))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def demo_rows_printed(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Print the rows; return them."""
    for row in rows:
        print(f"{row['name']:34s} {row['value']!s:>22}  vs {row['limit_or_peer']!s:>22}  ratio {row['ratio']}")
    return rows


if __name__ == "__main__":
    main()

"""``make bench``: every benchmark, one table, one JSON file; each figure a side-by-side ratio.

Runs the benchmark scripts of this folder one after the other (never two at once: they
time things), each in its own process, collects their rows, prints one table and
writes it as JSON (``benchmarks/results/latest.json`` by default)::

    {"date": ..., "machine": {...}, "quick": false, "wall_s": ..., "rows": [
        {"section": "1 DP overhead", "name": ..., "value": ..., "limit_or_peer": ...,
         "ratio": value / limit_or_peer, "unit": ..., "target": ..., "better": "lower",
         "verdict": "meets" | "misses" | null, "note": ...}, ...]}

Every ratio is measured in the same run against its peer (or a fixed limit), so it
holds on a noisy machine; absolute values are this machine's. ``--quick`` is a smoke
run (small sizes, few steps; the demo-based rows are listed with null values).

Run from the repository root (not with ``-m``: opacus installs a ``benchmarks`` package)::

    python benchmarks/bench_suite.py [--quick] [--out PATH]     # or: make bench [QUICK=1]

``--out`` (or ``$BENCH_OUT``) writes elsewhere, e.g. so a test never overwrites the
committed results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_attacks import row_names
from bench_learning import ROW_NAMES as LEARNING_ROW_NAMES
from bench_lora_variants import ROW_NAMES as LORA_ROW_NAMES
from suite_rows import DEMO_ROW_NAMES, DEPLOY_ROW_NAMES, finish_rows, machine, placeholder_rows

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "latest.json"

# (script, arguments in full mode, arguments in quick mode or None to skip it there).
# DP steps run on one thread, as each simulated site does (one CPU per Ray actor); two
# OpenMP threads on a shared 2-core machine wait for descheduled peers (measured: median
# step 2.3 s against a best of 0.22 s), which would drown the ratio in noise.
SECTIONS: list[tuple[str, list[str], list[str] | None]] = [
    ("bench_dp_overhead.py", ["--steps", "15", "--threads", "1"], ["--quick", "--steps", "3", "--threads", "1"]),
    ("bench_comm.py", [], ["--steps", "1"]),
    ("bench_aggregation.py", [], ["--quick", "--reps", "1"]),
    ("bench_sim_overhead.py", [], ["--quick"]),
    ("bench_demo.py", [], None),
    ("bench_accounting.py", [], []),
    # One-run privacy audit (Steinke et al. 2023): 256 canaries, DP on and off: 7-10 min on 2 shared cores.
    ("bench_audit.py", [], ["--quick"]),
    # A real deployment on 127.0.0.1 (SuperLink, three SuperNodes with their workers, the
    # standing watch): 4 shrunk cycles, the watch's cycle and the demo's cycle, about 13 min
    # on 2 cores (775 s measured); not in quick mode.
    ("bench_deploy.py", ["--pairs", "2"], None),
    # 32 simulations of a 10-site federation with and without attackers, 6 defences: about
    # 18 min on 2 cores; not in quick mode (tests/test_attack_e2e.py runs one such cell).
    ("bench_attacks.py", [], None),
    # FFA-LoRA and mixed ranks against LoRA at the same epsilon: three demo cycles a pair, ~6 min; not quick.
    ("bench_lora_variants.py", ["--pairs", "2"], None),
    # Selection, curriculum, replay and distillation on the drift scenario: 14 simulations, about
    # 25 min on 2 cores; not in quick mode (tests/test_scenario_e2e.py runs replay and a student).
    ("bench_learning.py", ["--seeds", "0,1"], None),
    # One secure-aggregation round against a plain one, 10 sites of 1M-value updates in one process.
    ("bench_secagg.py", [], ["--quick"]),
]


# The rows a section would have written, listed with null figures when it is skipped or fails.
PLACEHOLDERS = {
    "bench_demo.py": DEMO_ROW_NAMES,
    "bench_deploy.py": DEPLOY_ROW_NAMES,
    "bench_attacks.py": row_names(),
    "bench_lora_variants.py": LORA_ROW_NAMES,
    "bench_learning.py": LEARNING_ROW_NAMES,
}


def run_section(script: str, args: list[str], scratch: Path) -> list[dict] | None:
    """Run one benchmark script to a JSON file; its rows, or None if it failed.

    Its output goes to this console."""
    out = scratch / (Path(script).stem + ".json")
    env = dict(os.environ)
    # The base model is built once into the repository's cache, as the tests do.
    env.setdefault("FEDRETRAIN_CACHE", str(REPO / ".cache" / "fedretrain"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"\n=== {script} {' '.join(args)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)], cwd=REPO, env=env)
    print(f"=== {script}: {time.perf_counter() - started:.0f} s, exit status {done.returncode}", flush=True)
    if done.returncode != 0:
        return None
    return json.loads(out.read_text())


def run_all(quick: bool, only: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Every section's rows, in order, and the scripts that failed.

    A section that quick mode skips, or that failed, leaves placeholder rows, so that a
    long run still writes what the other sections measured.
    """
    rows: list[dict] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="frbench-") as tmp:
        for script, full_args, quick_args in SECTIONS:
            if only and script not in only:
                continue
            names = PLACEHOLDERS.get(script, (f"{Path(script).stem}_failed",))
            if quick and quick_args is None:
                rows += placeholder_rows(names, f"skipped in quick mode ({script} takes minutes)")
                continue
            got = run_section(script, quick_args if quick else full_args, Path(tmp))
            if got is None:
                failed.append(script)
                got = placeholder_rows(names, f"{script} failed; see its output")
            rows += got
    return rows, failed


def print_table(rows: list[dict]) -> None:
    """The table, one line per row."""
    print(f"\n{'section':<22}{'name':<36}{'value':>14}{'limit/peer':>14}{'ratio':>9}{'target':>9}  verdict")
    for row in rows:
        cells = [_fmt(row[k]) for k in ("value", "limit_or_peer")]
        target = "" if row["target"] is None else ("<=" if row["better"] == "lower" else ">=") + f"{row['target']:g}"
        print(
            f"{row['section']:<22}{row['name']:<36}{cells[0]:>14}{cells[1]:>14}{_fmt(row['ratio']):>9}"
            f"{target:>9}  {row['verdict'] or ''}"
        )


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:.4g}"


def write_atomically(path: Path, document: dict) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def merge_into(path: Path, rows: list[dict], scripts: list[str]) -> dict:
    """The document at ``path`` with ``rows`` replacing its rows of the same names.

    For re-measuring one section after a fix; the document says which and when.
    """
    document = json.loads(path.read_text())
    fresh = {row["name"]: row for row in rows}
    document["rows"] = finish_rows([fresh.pop(r["name"], r) for r in document["rows"]] + list(fresh.values()))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    document.setdefault("remeasured", {}).update({script: stamp for script in scripts})
    return document


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every section, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, no demo")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("BENCH_OUT") or DEFAULT_OUT),
        help=f"JSON output (default $BENCH_OUT or {DEFAULT_OUT.relative_to(REPO)})",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="SCRIPT",
        help="run only this section and merge its rows into the existing --out file",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    raw, failed = run_all(args.quick, args.only)
    rows = finish_rows(raw)
    wall = time.perf_counter() - started
    if args.only:
        print_table(rows)
        write_atomically(args.out, merge_into(args.out, rows, args.only))
        raise SystemExit(f"failed: {', '.join(failed)}" if failed else 0)
    print_table(rows)
    print(f"\n{len(rows)} rows in {wall:.0f} s; written to {args.out}")
    write_atomically(
        args.out,
        {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "quick": args.quick,
            "wall_s": round(wall, 1),
            "failed": failed,
            "rows": rows,
        },
    )
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

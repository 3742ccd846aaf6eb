"""What a deployed round costs, and how fast the standing watch turns new data into an installed version.

The same small cycle (three sites, 2 rounds) runs on a SuperLink with TLS and SuperNode
authentication and on an insecure one, alternately, ``--pairs`` times, all on
127.0.0.1 with the real commands (``fedretrain coordinator start``, ``site join``,
``coordinator run``). Rows, each a ratio measured in this run:

- ``deploy_round_s_over_site_compute_smoke``: the shrunk cycles' rounds against the sites'
  own compute in them (for each site, the time its worker took to answer the cycle's train
  and evaluate messages, its log's "answered in" lines; the slowest site counted). The rest
  is Flower's per-message ClientApp processes, polling and the coordinator's work.
- ``deploy_round_s_over_site_compute``: the same for the demo's own cycle (``make demo``'s
  config, 3 rounds), deployed secure, last (``--no-demo`` skips it).
- ``deploy_round_s_secure_vs_insecure``: the mean round with TLS and node authentication
  against the insecure one (alternating, so a noisy machine slows both alike).
- After the first secure cycle (which publishes a version every site installs), on the same
  federation: every site ingests ``examples/new-notes.jsonl`` (notes in a new template) and
  the standing watch (``coordinator watch --dir``, a poll every 5 s) starts.
  ``deploy_new_data_to_installed_s``: from the ingest to the watch's record of a cycle
  installed at every site, against that cycle's own wall time (the rest is detection: the
  watch's start and its first poll). ``deploy_status_poll_s``: the watch's status polls
  (a Flower run each, its log's "status poll ... in X s"), median, against the sites' own
  work for them (their workers' "query.status answered in"), median.

Every process is started in its own session here and stopped here.

    python benchmarks/bench_deploy.py [--pairs 2] [--no-demo] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FEDRETRAIN = [sys.executable, "-m", "cli.main"]
SITES = ("site-00", "site-01", "site-02")
CYCLE = [
    "experiment=smoke",
    "rounds=2",
    "strategy.min_sites=3",
    # The gate rests on the validation set and each site's check: three sites' noised sums
    # cannot confirm a shrunk cycle's gain, and the watch below needs a published version.
    "gate.require_federated_confidence=false",
    "train.local_steps=4",
    "train.batch_size=8",
    "model.max_length=64",
]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(root: Path, *args: str, timeout: float = 900, ok: tuple[int, ...] = (0,)) -> str:
    proc = subprocess.run(FEDRETRAIN + list(args), cwd=root, capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in ok:
        raise RuntimeError(f"fedretrain {' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _start(root: Path, name: str, *args: str) -> subprocess.Popen:
    log = open(root / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        FEDRETRAIN + list(args), cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def site_compute_s(log: str) -> float:
    """Seconds the site's worker spent answering train and evaluate messages (its log)."""
    found = re.findall(r"site worker: (?:train|evaluate) answered in ([0-9.]+) s", log)
    return sum(float(x) for x in found)


# The demo's own cycle (`make demo`'s config: 3 rounds, the full local steps and data),
# deployed: the goal for a round against its compute is stated on it.
DEMO_CYCLE = ["experiment=demo", "strategy.min_sites=3", "gate.require_federated_confidence=false"]


def one_cycle(
    root: Path, secure: bool, tag: str, watch: bool = False, cycle: list[str] = CYCLE, data: str = "data"
) -> tuple[list[float], float, dict | None]:
    """Start a federation (secure or not), run one cycle, with ``watch`` then the standing
    watch on new data, and stop it; the round times, the slowest site's compute in them,
    and the watch's figures."""
    coord, link = root / f"coord-{tag}", f"127.0.0.1:{_port()}"
    ident = ["--keys", "keys", *[f"--site=keys/{s}.pub" for s in SITES]] if secure else ["--insecure"]
    procs = [_start(root, f"coord-{tag}", "coordinator", "start", "--dir", str(coord), "--address", link, *ident)]
    try:
        deadline = time.monotonic() + 120
        while "SuperLink listening" not in (root / f"coord-{tag}.log").read_text(errors="replace"):
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"the SuperLink did not start; see {root}/coord-{tag}.log")
            time.sleep(0.5)
        for site in SITES:
            auth = ["--ca", "keys/ca.pem", "--key", f"keys/{site}.key"] if secure else ["--insecure", "--site-id", site]
            procs.append(
                _start(
                    root,
                    f"{site}-{tag}",
                    "site",
                    "join",
                    "--superlink",
                    link,
                    *auth,
                    "--data",
                    f"{data}/{site}",
                    "--epsilon-ceiling",
                    "1000",
                    "--share-drift-scores",
                    "--coordinator-key",
                    "keys/coordinator.pub",
                    "--state-dir",
                    f"state-{tag}/{site}",
                    "--port",
                    str(_port()),
                )
            )
        overrides = [
            *cycle,
            f"registry.root=reg-{tag}",
            "registry.signing_key=keys/coordinator.key",
            f"validation_path={data}/coordinator/validation.jsonl",
        ]
        # Timed whatever the gate decides: a refused candidate exits 4 (README: Exit codes).
        out = _cli(root, "coordinator", "run", "--dir", str(coord), "--wait", *overrides, ok=(0, 4))
        run_dir = Path(out.split("run directory ")[1].split()[0])
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        compute = max(site_compute_s((root / f"{site}-{tag}.log").read_text(errors="replace")) for site in SITES)
        figures = watch_new_data(root, coord, tag, overrides, procs) if watch else None
        return [row["round_s"] for row in rows if row["round"] > 0], compute, figures
    finally:
        _stop(procs)


def watch_new_data(root: Path, coord: Path, tag: str, overrides: list[str], procs: list) -> dict:
    """Every site ingests notes in a new template; the standing watch runs until it has
    recorded a cycle and polled once more. Seconds from the ingest to the recorded cycle,
    the cycle's own wall time, and the polls' and the sites' status times."""
    for site in SITES:
        _cli(root, "site", "ingest", str(REPO / "examples" / "new-notes.jsonl"), "--site-config",
             f"state-{tag}/{site}/node-config.toml")  # fmt: skip
    arrived = time.monotonic()
    name = f"watch-{tag}"
    procs.append(
        _start(root, name, "coordinator", "watch", "--dir", str(coord), *overrides, "trigger.poll_interval_s=5")
    )
    cycles = root / f"reg-{tag}" / "watch" / "cycles.jsonl"
    log = root / f"{name}.log"
    deadline = time.monotonic() + 1200
    installed_s: float | None = None
    while installed_s is None or log.read_text(errors="replace").count("status poll (") < 2:
        if time.monotonic() > deadline or procs[-1].poll() is not None:
            raise RuntimeError(f"the watch recorded no cycle and a poll after it; see {log}")
        if installed_s is None and cycles.exists():
            installed_s = time.monotonic() - arrived
        time.sleep(0.5)
    record = json.loads(cycles.read_text().splitlines()[0])
    summary = json.loads((Path(record["run_dir"]) / "summary.json").read_text())
    polls = [float(x) for x in re.findall(r"status poll \(Flower run \d+\): .* in ([0-9.]+) s", log.read_text())]
    status = [
        float(x)
        for site in SITES
        for x in re.findall(
            r"site worker: query\.status answered in ([0-9.]+) s", (root / f"{site}-{tag}.log").read_text()
        )
    ]
    return {
        "new_data_to_installed_s": installed_s,
        "cycle_wall_s": summary["wall_time_s"],
        "triggers": record["triggers"],
        "decision": record["decision"],
        "installed": record.get("installed"),
        "poll_s": polls,
        "site_status_s": status,
    }


def rows_of(
    times: dict[str, list[float]],
    compute: dict[str, list[float]],
    watch: dict,
    demo: tuple[list[float], float] | None,
) -> list[dict]:
    """The suite's rows (name, value, limit_or_peer, ratio, note) from this run's figures."""
    goal = []
    if demo is not None:
        demo_rounds, demo_compute = demo
        mean, per = sum(demo_rounds) / len(demo_rounds), demo_compute / len(demo_rounds)
        goal.append(
            {
                "name": "deploy_round_s_over_site_compute",
                "value": mean,
                "limit_or_peer": per,
                "ratio": mean / per,
                "note": f"the demo's cycle deployed ({len(demo_rounds)} rounds); peer: the slowest site's "
                "worker time per round",
            }
        )
    rounds = [t for v in times.values() for t in v]
    mean_round = sum(rounds) / len(rounds)
    # The slowest site's compute, per round: each cycle has the same number of rounds.
    per_round = sum(sum(v) for v in compute.values()) / len(rounds)
    secure, insecure = (sum(times[m]) / len(times[m]) for m in ("secure", "insecure"))
    poll, site = statistics.median(watch["poll_s"]), statistics.median(watch["site_status_s"])
    return goal + [
        {
            "name": "deploy_round_s_over_site_compute_smoke",
            "value": mean_round,
            "limit_or_peer": per_round,
            "ratio": mean_round / per_round,
            "note": f"{len(rounds)} rounds of the shrunk smoke cycle; peer: the slowest site's worker time per round",
        },
        {
            "name": "deploy_round_s_secure_vs_insecure",
            "value": secure,
            "limit_or_peer": insecure,
            "ratio": secure / insecure,
            "note": "mean round with TLS and node authentication vs insecure, alternating",
        },
        {
            "name": "deploy_new_data_to_installed_s",
            "value": watch["new_data_to_installed_s"],
            "limit_or_peer": watch["cycle_wall_s"],
            "ratio": watch["new_data_to_installed_s"] / watch["cycle_wall_s"],
            "note": f"ingest -> installed at {len(watch['installed'] or [])} sites (triggers "
            f"{','.join(watch['triggers'])}, {watch['decision']}); peer: the cycle's own wall time",
        },
        {
            "name": "deploy_status_poll_s",
            "value": poll,
            "limit_or_peer": site,
            "ratio": poll / site if site > 0 else None,
            "note": f"median of {len(watch['poll_s'])} watch polls (a Flower run each) vs the sites' median "
            "query.status work (the first poll scores the new records, the one after the cycle has none)",
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the suite's rows here")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo's cycle (about 8 min on 2 cores)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fr-deploy-bench-"))
    _cli(root, "data", "synthesize", "--out", "data", "experiment=smoke")
    _cli(root, "keys", "ca", "--out", "keys")
    _cli(root, "keys", "superlink", "--host", "127.0.0.1", "--ca-dir", "keys", "--out", "keys")
    _cli(root, "keys", "coordinator", "--out", "keys")
    for site in SITES:
        _cli(root, "keys", "site", site, "--out", "keys")
    times: dict[str, list[float]] = {"secure": [], "insecure": []}
    compute: dict[str, list[float]] = {"secure": [], "insecure": []}
    watch: dict | None = None
    for pair in range(args.pairs):
        order = ("secure", "insecure") if pair % 2 == 0 else ("insecure", "secure")  # alternate who goes first
        for mode in order:
            rounds, site_s, figures = one_cycle(root, mode == "secure", f"{mode}-{pair}", watch=watch is None)
            times[mode] += rounds
            compute[mode].append(site_s)
            watch = watch or figures
    assert watch is not None
    demo = None
    if not args.no_demo:
        _cli(root, "data", "synthesize", "--out", "data-demo", "experiment=demo")
        demo_rounds, demo_compute, _ = one_cycle(root, True, "demo", cycle=DEMO_CYCLE, data="data-demo")
        demo = (demo_rounds, demo_compute)
    rows = rows_of(times, compute, watch, demo)
    print(
        json.dumps(
            {"round_s": times, "site_compute_s": compute, "watch": watch, "demo": demo, "workdir": str(root)}, indent=2
        )
    )
    for row in rows:
        print(f"{row['name']:<36}{row['value']:>10.2f}{row['limit_or_peer']:>10.2f}{row['ratio']:>8.2f}  {row['note']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

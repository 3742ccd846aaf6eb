"""What a deployed round costs: TLS and node authentication, and everything beyond the sites' compute.

The same small cycle (three sites, 2 rounds) runs on a SuperLink with TLS and SuperNode
authentication and on an insecure one, alternately, ``--pairs`` times, all on
127.0.0.1 with the real commands (``fedretrain coordinator start``, ``site join``,
``coordinator run``). The first figure is the ratio of the mean round times (from each
run's metrics.jsonl), so a noisy machine slows both sides alike. The second is the
cycle's rounds against the sites' own compute in them: for each site, the time its worker
took to answer the cycle's train and evaluate messages (its log's "answered in" lines),
the slowest site counted; the rest is Flower's per-message ClientApp processes, polling
and the coordinator's work. Every process is started in its own session here and stopped
here.

    python benchmarks/bench_deploy.py [--pairs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDRETRAIN = [sys.executable, "-m", "cli.main"]
SITES = ("site-00", "site-01", "site-02")
CYCLE = [
    "experiment=smoke",
    "rounds=2",
    "strategy.min_sites=3",
    "gate.require_approval=true",
    "train.local_steps=4",
    "train.batch_size=8",
    "model.max_length=64",
]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(root: Path, *args: str, timeout: float = 900) -> str:
    proc = subprocess.run(FEDRETRAIN + list(args), cwd=root, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
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


def one_cycle(root: Path, secure: bool, tag: str) -> tuple[list[float], float]:
    """Start a federation (secure or not), run one cycle, stop it; the round times and the
    slowest site's compute in them."""
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
                    f"data/{site}",
                    "--epsilon-ceiling",
                    "1000",
                    "--state-dir",
                    f"state-{tag}/{site}",
                    "--port",
                    str(_port()),
                )
            )
        out = _cli(
            root,
            "coordinator",
            "run",
            "--dir",
            str(coord),
            "--wait",
            *CYCLE,
            f"registry.root=reg-{tag}",
            "registry.signing_key=keys/coordinator.key",
            "validation_path=data/coordinator/validation.jsonl",
        )
        run_dir = Path(out.split("run directory ")[1].split()[0])
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        compute = max(site_compute_s((root / f"{site}-{tag}.log").read_text(errors="replace")) for site in SITES)
        return [row["round_s"] for row in rows if row["round"] > 0], compute
    finally:
        _stop(procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--json", type=Path)
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
    for pair in range(args.pairs):
        order = ("secure", "insecure") if pair % 2 == 0 else ("insecure", "secure")  # alternate who goes first
        for mode in order:
            rounds, site_s = one_cycle(root, mode == "secure", f"{mode}-{pair}")
            times[mode] += rounds
            compute[mode].append(site_s)
    mean = {mode: sum(v) / len(v) for mode, v in times.items()}
    result = {
        "round_s": times,
        "mean_round_s": mean,
        "ratio_secure_over_insecure": mean["secure"] / mean["insecure"],
        "site_compute_s": compute,
        # All of the cycles' round time over all of the slowest sites' compute in them.
        "ratio_rounds_over_site_compute": sum(sum(v) for v in times.values()) / sum(sum(v) for v in compute.values()),
        "workdir": str(root),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

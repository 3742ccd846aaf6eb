"""The dashboard on the demo, in a real headless browser: how fast its pages load and how soon a
new round shows on an open page. Saves the README's screenshots.

The dashboard starts on an empty runs folder, at the poll interval users get (5 s), and
chromium (tests/browser.py) opens its Cycles page; then ``fedretrain simulate experiment=demo``
(what ``make demo`` runs) starts writing there. A thread here notes when each round's line
lands in metrics.jsonl; the page notes (a MutationObserver) when its round counter shows
that round. Update latency is the difference, on one clock. Then each page is loaded
``--loads`` times; load time is the Navigation Timing's loadEventEnd (request to page loaded).

Run from the repository root::

    python benchmarks/bench_dashboard.py [--experiment demo] [--poll-seconds 5] [--loads 5]
        [--screenshots docs] [--json PATH] [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser import chromium  # noqa: E402  (tests/browser.py: Debian's chromium, through selenium)
from processes import start_cli  # noqa: E402  (tests/processes.py: fedretrain in a process of its own)

PAGES = ("federation", "cycles", "cycle", "versions", "alerts", "resources")
OBSERVE = """
window.fedretrainSeen = [];
const note = () => {
  const shown = document.getElementById("round");
  const n = shown && Number(shown.textContent);
  const seen = window.fedretrainSeen;
  if (Number.isInteger(n) && (!seen.length || seen[seen.length - 1][0] !== n)) seen.push([n, Date.now() / 1000]);
};
new MutationObserver(note).observe(document.body, {childList: true, subtree: true, characterData: true});
note();
"""
LOAD_TIME = "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime"


def watch_rows(runs: Path, landed: dict[int, float], stop: threading.Event) -> None:
    """Note the time each round's line first appears in the (one) run's metrics.jsonl."""
    while not stop.is_set():
        for path in runs.glob("*/metrics.jsonl"):
            try:
                rounds = [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]
            except (OSError, ValueError):
                continue  # being replaced: the next look reads it whole
            now = time.time()
            for n in rounds:
                landed.setdefault(n, now)
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--screenshots", type=Path, default=REPO / "docs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    runs = work / "runs"
    runs.mkdir()
    dashboard = start_cli(["dashboard", "--runs", str(runs), "--port", "0", "--poll-seconds", str(args.poll_seconds)])
    line = dashboard.stdout.readline().strip()
    if not line.startswith("fedretrain dashboard: http"):
        raise SystemExit(f"the dashboard did not start: {line}")
    url = line.split()[2]
    landed: dict[int, float] = {}
    stop = threading.Event()
    try:
        with chromium() as browser:
            browser.get(url + "cycles")
            simulation = start_cli(
                ["simulate", f"experiment={args.experiment}", f"output_dir={runs}", *args.overrides],
                log=work / "sim.log",
            )
            watcher = threading.Thread(target=watch_rows, args=(runs, landed, stop), daemon=True)
            watcher.start()
            links = "return Array.from(document.querySelectorAll('main table a'), a => a.textContent)"
            while not browser.execute_script(links):
                if simulation.poll() is not None:
                    raise SystemExit(f"the simulation exited {simulation.returncode}: see {work / 'sim.log'}")
                time.sleep(0.05)
            (run_id,) = browser.execute_script(links)
            browser.get(url + f"cycles/{run_id}")
            browser.execute_script(OBSERVE)
            code = simulation.wait()
            if code not in (0, 4):  # 4: the gate refused (README "Exit codes"): the pages still show it
                raise SystemExit(f"the simulation exited {code}: see {work / 'sim.log'}")
            time.sleep(args.poll_seconds * 2 + 1)  # the last change reaches the page
            seen = {int(n): at for n, at in browser.execute_script("return window.fedretrainSeen")}
            stop.set()
            latency = {n: round(seen[n] - landed[n], 3) for n in sorted(seen) if n in landed and n > min(seen)}

            summary = json.loads((runs / run_id / "summary.json").read_text())
            registry = browser.execute_script("return document.querySelector('a[href^=\"/versions/\"]').href")
            addresses = {
                "federation": url + "federation",
                "cycles": url + "cycles",
                "cycle": url + f"cycles/{run_id}",
                "versions": registry,
                "alerts": url + "alerts",
                "resources": url + "resources",
            }
            loads: dict[str, list[float]] = {page: [] for page in PAGES}
            for _ in range(args.loads):
                for page in PAGES:
                    browser.get(addresses[page])
                    loads[page].append(browser.execute_script(LOAD_TIME))
            args.screenshots.mkdir(parents=True, exist_ok=True)
            for page in ("federation", "cycle", "versions"):
                browser.get(addresses[page])
                height = browser.execute_script("return document.documentElement.scrollHeight")
                browser.set_window_size(1360, min(max(height, 800), 2400))
                browser.save_screenshot(str(args.screenshots / f"dashboard-{page}.png"))
                browser.set_window_size(1360, 1000)
    finally:
        stop.set()
        dashboard.terminate()
        dashboard.wait(timeout=60)

    result = {
        "experiment": args.experiment,
        "poll_seconds": args.poll_seconds,
        "rounds": summary["rounds"],
        "gate": summary["gate"]["decision"],
        "update_latency_s": latency,
        "update_latency_median_s": statistics.median(latency.values()) if latency else None,
        "update_latency_max_s": max(latency.values()) if latency else None,
        "load_ms_median": {page: round(statistics.median(times), 1) for page, times in loads.items()},
        "load_ms_max": {page: round(max(times), 1) for page, times in loads.items()},
        "screenshots": [str(args.screenshots / f"dashboard-{p}.png") for p in ("federation", "cycle", "versions")],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

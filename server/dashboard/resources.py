"""Resources: the coordinator machine now, each run's rounds in time and bytes, and what looks wrong.

The machine's figures are psutil's, read on each request (the dashboard runs beside the
coordinator). The rounds are metrics.jsonl's. What a site shares of its own training is
what its train reply carries (steps, sampling rate, LoRA rank): a DP-SGD step's time and
memory grow with the batch that Poisson sampling drew from the site's records, so a site
keeps them (its step time and peak memory would say how many records it holds).

Anomalies flagged, each naming its run, round and site:

- a round far slower than the run's others (over :data:`SLOW` times their median);
- a site whose held-out loss got worse beyond its own noise (change above :data:`NOISE_SPREADS`
  of its noise's std): a model that diverges there;
- a site whose replies were refused in more than one round.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from typing import Any

import psutil

from server.dashboard.catalogue import Catalogue
from server.dashboard.cycles import cycle_view

SLOW = 3.0
NOISE_SPREADS = 2.0
RECENT_RUNS = 20


def resources_view(catalogue: Catalogue) -> dict[str, Any]:
    """The Resources page: the machine, the recent runs' rounds, the anomalies found in them."""
    runs, anomalies = [], []
    for run in catalogue.runs()[:RECENT_RUNS]:
        view = cycle_view(run)
        rounds = [
            {key: row.get(key) for key in ("round", "round_s", "bytes_down", "bytes_up", "sites_accepted")}
            for row in view["metrics"]
        ]
        trained = [r["round_s"] for r in rounds if r["round"] > 0 and _number(r["round_s"])]
        median = statistics.median(trained) if trained else None
        runs.append({"run_id": run.run_id, "name": view["name"], "median_round_s": median, "rounds": rounds})
        anomalies += _anomalies(run.run_id, view, rounds, median)
    return {"machine": machine(catalogue), "runs": runs, "anomalies": anomalies}


def machine(catalogue: Catalogue) -> dict[str, Any]:
    """CPU, memory and the free disk under each root, now."""
    memory = psutil.virtual_memory()
    roots = [*catalogue.runs_roots, *catalogue.registry_roots]
    roots += [] if catalogue.coordinator is None else [catalogue.coordinator]
    disks = []
    for root in dict.fromkeys(roots):
        try:
            usage = psutil.disk_usage(str(root))
        except OSError:
            continue
        disks.append({"path": str(root), "free_bytes": usage.free, "total_bytes": usage.total})
    return {
        "cpus": psutil.cpu_count(),
        "cpu_percent": psutil.cpu_percent(interval=None),  # since the previous request (primed at start)
        "load_average": list(os.getloadavg()),
        "memory_used_bytes": memory.total - memory.available,
        "memory_total_bytes": memory.total,
        "dashboard_rss_bytes": psutil.Process().memory_info().rss,
        "disks": disks,
    }


def _anomalies(
    run_id: str, view: dict[str, Any], rounds: list[dict[str, Any]], median: float | None
) -> list[dict[str, Any]]:
    found = []
    if median and len([r for r in rounds if r["round"] > 0]) >= 3:
        for r in rounds:
            seconds = r["round_s"]
            if r["round"] > 0 and _number(seconds) and seconds > SLOW * median:
                detail = (
                    f"round {r['round']} took {seconds:.1f} s, {seconds / median:.1f}x the run's median {median:.1f} s"
                )
                found.append({"run_id": run_id, "kind": "slow round", "round": r["round"], "detail": detail})
    for row in view["metrics"]:
        for site, e in sorted((row.get("evaluation") or {}).items()):
            change, std = (e or {}).get("change"), (e or {}).get("change_noise_std")
            if isinstance(change, int | float) and isinstance(std, int | float) and change > NOISE_SPREADS * std:
                detail = f"{site}: held-out loss up {change:.4f} (noise std {std:.4f}) after round {row['round']}"
                found.append({"run_id": run_id, "kind": "loss diverges", "round": row["round"], "detail": detail})
    refused = Counter(r.get("site_id") for r in view["refusals"] if isinstance(r, dict))
    for site, times in sorted(refused.items(), key=lambda item: str(item[0])):
        if times > 1:
            reasons = sorted({str(r.get("reason")) for r in view["refusals"] if r.get("site_id") == site})
            detail = f"{site}: refused in {times} rounds ({'; '.join(reasons)[:300]})"
            found.append({"run_id": run_id, "kind": "repeated refusals", "round": None, "detail": detail})
    return found


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

"""Table rows from the clocks of two timed demo runs (``bench_demo.py``); pure functions.

A run's clocks: ``t0`` (process start), ``end``, ``rounds`` ({"r": wall time of the
"round r/R" line}), ``client`` (handler intervals), ``server_evals`` (validation
scoring intervals), plus the run's ``summary`` (summary.json) and ``metrics``
(metrics.jsonl lines).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

ROUND_HANDLERS = ("train", "evaluate")  # what a round asks of a site ("train.default"); queries come after
OVERHEAD_TARGET = 0.10  # the issue: not client compute, under 10% of the round


def union_in(intervals: Iterable[Sequence[float]], start: float, end: float) -> float:
    """Seconds of [start, end] covered by at least one of ``intervals`` (each (a, b))."""
    clipped = sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end)
    covered, reach = 0.0, start
    for a, b in clipped:
        if b > reach:
            covered += b - max(a, reach)
            reach = b
    return covered


def round_breakdown(run: dict) -> list[tuple[float, float, float]]:
    """Per trained round: (round seconds, client-busy seconds, server scoring seconds)."""
    marks = {int(r): t for r, t in run["rounds"].items()}
    client = [(e["start"], e["end"]) for e in run["client"] if e["what"].split(".")[0] in ROUND_HANDLERS]
    out = []
    for r in range(1, max(marks) + 1):
        start, end = marks[r - 1], marks[r]
        out.append((end - start, union_in(client, start, end), union_in(run["server_evals"], start, end)))
    return out


def first_beating_round(metrics: list[dict]) -> int | None:
    """First trained round whose validation loss is below the baseline's; None if none."""
    for entry in metrics:
        val = entry["validation"]
        if entry["round"] > 0 and val["candidate_loss"] < val["baseline_loss"]:
            return int(entry["round"])
    return None


def _row(
    name: str, value: float | None, peer: float | None, unit: str, note: str, target: float | None = None
) -> dict[str, object]:
    ratio = value / peer if value is not None and peer else None
    return {
        "name": name,
        "value": value,
        "limit_or_peer": peer,
        "ratio": ratio,
        "unit": unit,
        "target": target,
        "note": note,
    }


def overhead_rows(run: dict) -> list[dict[str, object]]:
    """Round time that is not client compute, and that is neither client nor server compute.

    Over all rounds, and over rounds 2..R: round 1 also starts the Ray actors, which
    import torch, transformers, peft and opacus before the first handler runs.
    """
    parts = round_breakdown(run)
    rows = []
    for suffix, chosen, which in (
        ("", parts, f"{len(parts)} demo rounds"),
        ("_rounds2on", parts[1:], "rounds 2..R (actors already started)"),
    ):
        total = sum(p[0] for p in chosen)
        idle = sum(p[0] - p[1] for p in chosen)
        residual = sum(p[0] - p[1] - p[2] for p in chosen)
        rows += [
            _row(
                f"demo_not_client_compute_s{suffix}",
                idle if chosen else None,
                total,
                "s",
                f"{which}: round time outside the sites' train/evaluate handlers",
                OVERHEAD_TARGET,
            ),
            _row(
                f"demo_framework_residual_s{suffix}",
                residual if chosen else None,
                total,
                "s",
                f"{which}: the same less the server's validation scoring",
                OVERHEAD_TARGET,
            ),
        ]
    return rows


def value_rows(run: dict) -> list[dict[str, object]]:
    """Time, rounds and bytes to value in the demo."""
    summary, metrics = run["summary"], run["metrics"]
    comm = summary["communication"]
    full = float(comm["full_model_bytes"])
    busy = sum(p[1] for p in round_breakdown(run))
    published = summary.get("published_version")
    wall = run["end"] - run["t0"] if published is not None else None
    beat = first_beating_round(metrics)
    upto = [m for m in metrics if beat is not None and 0 < m["round"] <= beat]
    spent = float(sum(m["bytes_down"] + m["bytes_up"] for m in upto)) if beat else None
    full_spent = float(sum(2 * m["sites_sampled"] for m in upto)) * full if beat else None
    return [
        _row(
            "ttv_wall_s_to_published",
            wall,
            busy,
            "s",
            f"process start to version {published} published and delivered, vs the sites' compute in it",
        ),
        _row(
            "ttv_rounds_to_beat_baseline",
            float(beat) if beat else None,
            float(summary["rounds"]),
            "rounds",
            "first round whose validation loss beats the baseline, vs rounds run",
        ),
        _row(
            "ttv_bytes_to_beat_baseline",
            spent,
            full_spent,
            "bytes",
            "bytes down + up until then, vs shipping the full model instead",
        ),
        _row(
            "demo_bytes_per_client_round",
            float(comm["bytes_per_client_per_round"]),
            2 * full,
            "bytes",
            "measured in the demo (records incl. config and metrics), vs the full model down + up",
        ),
    ]


def demo_rows(warm: dict, cold: dict) -> list[dict[str, object]]:
    """Every row of the demo section; start-up rows first."""
    warm_start = warm["rounds"]["0"] - warm["t0"]
    cold_start = cold["rounds"]["0"] - cold["t0"]
    return [
        _row("startup_warm_s", warm_start, None, "s", "process start to the server's round-0 line, model cached"),
        _row("startup_cold_s", cold_start, warm_start, "s", "the same with an empty model cache, vs warm"),
        *overhead_rows(warm),
        *value_rows(warm),
    ]

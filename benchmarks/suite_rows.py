"""What the suite's table says about each row: section, unit, target, verdict; and the machine.

The benchmark scripts emit ``name, value, limit_or_peer, ratio`` (and sometimes more);
here every row gets the full set of keys, its ratio recomputed as value / limit_or_peer
(None where either is missing or not finite), and a verdict where it has a target.
"""

from __future__ import annotations

import math
import os
import platform
import re
from importlib.metadata import version
from pathlib import Path

KEYS = ("section", "name", "value", "limit_or_peer", "ratio", "unit", "target", "better", "verdict", "note")

# name pattern -> (section, unit, target, better, note); the first match wins.
ANNOTATIONS: list[tuple[str, tuple[str, str, float | None, str, str]]] = [
    (
        r"dp_step_ms_hooks_b64$",
        ("1 DP overhead", "ms", 1.15, "lower", "DP-SGD step (client's mode) vs non-private step, B=64, medians"),
    ),
    (r"dp_step_ms_", ("1 DP overhead", "ms", None, "lower", "DP-SGD step vs non-private step, medians")),
    (r"dp_step_min_ms_", ("1 DP overhead", "ms", None, "lower", "best steps (least contended)")),
    (r"dp_overhead_hooks_b64_vs_target", ("1 DP overhead", "x", 1.0, "lower", "hooks B=64 ratio vs the 1.15x target")),
    (
        r"dp_grad_sample_bytes_",
        ("1 DP overhead", "bytes", None, "lower", "per-sample gradients held vs B x LoRA params x 4 bytes"),
    ),
    (
        r"grad_sample_floor_bytes_",
        ("1 DP overhead", "bytes", None, "lower", "B x LoRA params x 4 bytes vs the frozen base model's bytes"),
    ),
    (r"peak_rss_mib", ("1 DP overhead", "MiB", None, "lower", "DP benchmark process, all variants")),
    (
        r"dp_tokens_per_s_",
        ("2 Client throughput", "tokens/s", None, "higher", "training tokens/s with DP vs without, default model"),
    ),
    (r"(comm_|demo_bytes_)", ("3 Communication", "bytes", None, "lower", "")),
    (
        r"agg_ours_vs_copy_gbps",
        ("4 Aggregation", "GB/s", 0.5, "higher", "K=100 x 4M params: ours vs a memory copy of the same bytes"),
    ),
    (r"agg_ours_vs_flower_gbps", ("4 Aggregation", "GB/s", None, "higher", "ours vs Flower's aggregate_arrayrecords")),
    (r"agg_(copy|flower)_gbps", ("4 Aggregation", "GB/s", None, "higher", "the peers' own speed")),
    (
        r"agg_peak_server_bytes",
        ("4 Aggregation", "bytes", None, "lower", "replies held + aggregation peak vs K x update bytes"),
    ),
    (r"agg_extra_bytes", ("4 Aggregation", "bytes", None, "lower", "aggregation's own peak vs one update")),
    (r"agg_max_abs_diff", ("4 Aggregation", "abs", 1.0, "lower", "ours vs Flower's result, tolerance 1e-5")),
    (r"(sim_round_|demo_not_client|demo_framework)", ("5 Framework overhead", "s", None, "lower", "")),
    (r"(startup_|sim_startup_)", ("6 Start-up", "s", None, "lower", "")),
    (r"ttv_", ("7 Time to value", "", None, "lower", "")),
    (r"eps_", ("8 Privacy accounting", "epsilon", None, "lower", "")),
    (
        r"deploy_round_s_over_site_compute_smoke",
        ("9 Deployment", "s", None, "lower", "a shrunk smoke round vs the sites' own compute in it"),
    ),
    (
        r"deploy_round_s_over_site_compute",
        ("9 Deployment", "s", 1.25, "lower", "the demo's deployed round vs the sites' own compute in it"),
    ),
    (r"deploy_round_s_secure", ("9 Deployment", "s", None, "lower", "TLS and node authentication vs insecure")),
    (r"deploy_new_data", ("9 Deployment", "s", None, "lower", "new records at the sites -> installed everywhere")),
    (r"deploy_status_poll", ("9 Deployment", "s", None, "lower", "a standing watch's status poll")),
    (r"secagg_round_s", ("12 Secure aggregation", "s", None, "lower", "a secure round's compute vs a plain one")),
    (r"secagg_round_bytes", ("12 Secure aggregation", "bytes", None, "lower", "a secure round's bytes vs a plain one")),
    (
        r"secagg_mean_error",
        ("12 Secure aggregation", "abs", 1.0, "lower", "secure mean vs plain mean, within one quantisation step"),
    ),
    (r"secagg_mask_s", ("12 Secure aggregation", "s", 1.0, "lower", "ChaCha20 masks vs Flower's generator")),
    (r"mixed_rank_candidate", ("11 DP-aware LoRA", "nats", None, "lower", "mixed ranks' validation loss vs LoRA's")),
    (
        r"mixed_rank_improvement_vs_rank2",
        ("11 DP-aware LoRA", "nats", None, "higher", "mixed ranks vs rank 2 everywhere"),
    ),
    (r"mixed_rank_improvement", ("11 DP-aware LoRA", "nats", None, "higher", "gain over the base model")),
    (r"mixed_rank_epsilon", ("11 DP-aware LoRA", "epsilon", None, "lower", "same target epsilon")),
    (
        r"learning_student_parameters",
        ("13 Learning more from less", "parameters", None, "lower", "the distilled student's size vs its teacher's"),
    ),
    (
        r"learning_",
        ("13 Learning more from less", "nats", None, "lower", "drift scenario, equal epsilon and steps: vs baseline"),
    ),
    (r"ffa_lora_candidate", ("11 DP-aware LoRA", "nats", None, "lower", "FFA-LoRA's validation loss vs LoRA's")),
    (r"ffa_lora_improvement", ("11 DP-aware LoRA", "nats", None, "higher", "gain over the base model")),
    (r"ffa_lora_epsilon", ("11 DP-aware LoRA", "epsilon", None, "lower", "same target epsilon")),
    (
        r"attack_backdoor_",
        ("10 Robustness", "nats", None, "higher", "backdoor phrase loss: candidate vs the clean run's candidate"),
    ),
    (r"attack_worse_", ("10 Robustness", "count", None, "lower", "worse candidates published (must be 0)")),
    (r"attack_", ("10 Robustness", "nats", None, "higher", "improvement under attack vs the defence's clean one")),
    (
        r"sigma_fit_s_",
        ("8 Privacy accounting", "s", 1.0, "lower", "a round's sigma fit: ours vs the same bisection on opacus"),
    ),
]

DEMO_ROW_NAMES = (
    "startup_warm_s",
    "startup_cold_s",
    "demo_not_client_compute_s",
    "demo_framework_residual_s",
    "demo_not_client_compute_s_rounds2on",
    "demo_framework_residual_s_rounds2on",
    "ttv_wall_s_to_published",
    "ttv_rounds_to_beat_baseline",
    "ttv_bytes_to_beat_baseline",
    "demo_bytes_per_client_round",
)


DEPLOY_ROW_NAMES = (
    "deploy_round_s_over_site_compute",
    "deploy_round_s_over_site_compute_smoke",
    "deploy_round_s_secure_vs_insecure",
    "deploy_new_data_to_installed_s",
    "deploy_status_poll_s",
)


def placeholder_rows(names: tuple[str, ...], note: str) -> list[dict]:
    """Rows with null figures for a section that did not run."""
    return [{"name": n, "value": None, "limit_or_peer": None, "ratio": None, "note": note} for n in names]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _annotate(row: dict) -> dict:
    section, unit, target, better, note = next(
        (a for pattern, a in ANNOTATIONS if re.match(pattern, row["name"])), ("9 Other", "", None, "lower", "")
    )
    value, peer = _number(row.get("value")), _number(row.get("limit_or_peer"))
    ratio = value / peer if value is not None and peer else None
    target = row.get("target", target)
    better = row.get("better", better)
    verdict = None
    if target is not None and ratio is not None:
        verdict = "meets" if (ratio <= target if better == "lower" else ratio >= target) else "misses"
    full = {
        "section": section,
        "name": row["name"],
        "value": value,
        "limit_or_peer": peer,
        "ratio": ratio,
        "unit": row.get("unit", unit),
        "target": target,
        "better": better,
        "verdict": verdict,
        "note": row.get("note") or note,
    }
    return {k: full[k] for k in KEYS}


def _link_startup(rows: list[dict]) -> None:
    """The project's warm start-up is compared with plain Flower's, measured in the same suite."""
    by_name = {r["name"]: r for r in rows}
    flower, warm = by_name.get("sim_startup_s_flower"), by_name.get("startup_warm_s")
    if flower and warm and warm.get("limit_or_peer") is None:
        warm["limit_or_peer"] = flower.get("value")
        warm["note"] = (warm.get("note") or "") + "; vs plain Flower's start-up (trivial clients)"


def finish_rows(rows: list[dict]) -> list[dict]:
    """Every row with every key of :data:`KEYS`, sorted by section (stable within one)."""
    _link_startup(rows)
    return sorted((_annotate(r) for r in rows), key=lambda r: r["section"])


def machine() -> dict[str, object]:
    """CPU model, cores, load, and the versions the figures depend on."""
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    versions = {name: version(name) for name in ("torch", "flwr", "opacus", "peft", "transformers", "numpy")}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m_at_end": os.getloadavg()[0],
        "python": platform.python_version(),
        **versions,
    }

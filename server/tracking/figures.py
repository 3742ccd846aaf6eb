"""What a run's files become in a tracker: scalars per round, the gate's figures, tags, parameters.

Plain functions of the rows and the summary as the cycle wrote them, shared by the MLflow
and TensorBoard exports so both show the same curves under the same names. A figure that
is missing, null (NaN or infinite when written) or not a number is left out.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from server.tracking.runfiles import RunFiles

# MLflow's limits: a parameter's value, a tag's value.
PARAM_CHARS, TAG_CHARS = 6000, 8000
# Tag keys of a run in MLflow (the gate's under "gate.").
RUN_TAG, RUN_ID_TAG = "fedretrain.run", "fedretrain.run_id"


def round_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """One metrics.jsonl row's curves: validation losses, sites, per-site ε and held-out change, bytes, seconds."""
    out: dict[str, float] = {}
    validation = row.get("validation") or {}
    for key in ("candidate_loss", "baseline_loss", "candidate_perplexity", "baseline_perplexity"):
        _put(out, f"validation/{key}", validation.get(key))
    _put(out, "sites/sampled", row.get("sites_sampled"))
    _put(out, "sites/accepted", row.get("sites_accepted"))
    _put(out, "sites/rejected", len(row.get("rejected") or []))
    epsilons = []
    for site, figures in sorted((row.get("sites") or {}).items()):
        _put(out, f"epsilon/{metric_name(site)}", figures.get("epsilon"))
        if _number(figures.get("epsilon")) is not None:
            epsilons.append(figures["epsilon"])
    if epsilons:
        out["epsilon/max"] = float(max(epsilons))
    # Noised at each site (client/round/site.py): the mean held-out loss change and its noise's std.
    for site, evaluation in sorted((row.get("evaluation") or {}).items()):
        _put(out, f"heldout_change/{metric_name(site)}", evaluation.get("change"))
        _put(out, f"heldout_change_noise_std/{metric_name(site)}", evaluation.get("change_noise_std"))
    _put(out, "bytes/down", row.get("bytes_down"))
    _put(out, "bytes/up", row.get("bytes_up"))
    _put(out, "time/round_s", row.get("round_s"))
    _put(out, "time/elapsed_s", row.get("elapsed_s"))
    return out


def gate_scalars(summary: Mapping[str, Any] | None) -> dict[str, float]:
    """The gate's figures (improvement, its interval, the margin, the sites' pooled interval), if it decided."""
    gate = (summary or {}).get("gate") or {}
    out: dict[str, float] = {}
    for key in ("improvement", "ci_low", "ci_high", "margin", "confidence", "worst_site_change"):
        _put(out, f"gate/{key}", gate.get(key))
    federated = gate.get("federated") or {}
    for key in ("improvement", "ci_low", "ci_high"):
        _put(out, f"gate/federated_{key}", federated.get(key))
    return out


def run_tags(run: RunFiles, run_id: str | None = None) -> dict[str, str]:
    """The run's tags: where it lives, how far it got, and the gate's decision and version once it ended."""
    summary = run.summary or {}
    tags = {
        RUN_TAG: run.name,
        "fedretrain.run_dir": str(run.path),
        "fedretrain.state": run.state,
        "fedretrain.rounds_done": str(run.last_round),
    }
    run_id = run_id or summary.get("run_id")
    if run_id:
        tags[RUN_ID_TAG] = str(run_id)
    if run.registry_root is not None:
        tags["fedretrain.registry"] = str(run.registry_root)
    for key in ("baseline_version", "published_version", "pending_version"):
        if summary.get(key) is not None:
            tags[f"fedretrain.{key}"] = str(summary[key])
    if summary.get("aborted"):
        tags["fedretrain.aborted"] = str(summary["aborted"])
    gate = summary.get("gate") or {}
    if gate.get("decision"):
        tags["gate.decision"] = str(gate["decision"])
        tags["gate.reasons"] = "; ".join(str(r) for r in gate.get("reasons") or []) or "-"
    return {key: value[:TAG_CHARS] for key, value in tags.items()}


def config_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """config.yaml flattened to ``{"privacy.target_epsilon": "4.0", ...}``; lists and null as JSON."""
    out: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(config_params(value, dotted))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[dotted] = text[:PARAM_CHARS]
    return out


def metric_name(text: str) -> str:
    """``text`` with what MLflow refuses in a metric name (anything but letters, digits, _ - . space : /) as ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", text)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _put(out: dict[str, float], key: str, value: Any) -> None:
    number = _number(value)
    if number is not None:
        out[key] = number

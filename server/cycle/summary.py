"""Plain-data views of a run: one metrics.jsonl entry per round and the final summary.json."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedretrain.arrays import NOT_PRIVATE_EPSILON
from fedretrain.config import Config
from fedretrain.modeling.lora_model import LoraModel
from fedretrain.training.evaluate import LossStats


def _epsilon(value: float | None) -> float | None:
    return None if value is None or value == NOT_PRIVATE_EPSILON else float(value)


def round_entry(
    server_round: int, candidate: LossStats, baseline: LossStats, round_log: Any, *, round_s: float, elapsed_s: float
) -> dict[str, Any]:
    """One line of metrics.jsonl. Round 0 is the starting point (before any training)."""
    entry: dict[str, Any] = {
        "round": server_round,
        "validation": {
            "candidate_loss": candidate.loss,
            "baseline_loss": baseline.loss,
            "candidate_perplexity": candidate.perplexity,
            "baseline_perplexity": baseline.perplexity,
        },
        "sites_sampled": 0,
        "sites_accepted": 0,
        "sites": {},
        "evaluation": {},
        "rejected": [],
        "bounded": {},
        "bytes_down": 0,
        "bytes_up": 0,
        "round_s": round(round_s, 3),
        "elapsed_s": round(elapsed_s, 3),
    }
    if round_log is None:
        return entry
    # A train reply carries nothing that depends on the site's records (client/round/site.py).
    sites = {
        site: {
            "epsilon": _epsilon(m["epsilon"]),
            "epsilon_ceiling": float(m["epsilon-ceiling"]),
            "delta": float(m["delta"]),
            "noise_multiplier": float(m["noise-multiplier"]),
            "sample_rate": float(m["sample-rate"]),
            "steps": int(m["steps"]),
            # The LoRA rank the site trained (mixed ranks, fedretrain/lora_ranks.py); None: not reported.
            "lora_rank": int(m["lora-rank"]) if "lora-rank" in m else None,
        }
        for site, m in round_log.accepted.items()
    }
    entry.update(
        sites_sampled=round_log.sampled,
        sites_accepted=len(sites),
        sites=sites,
        # Noised at the site: the mean held-out loss change per record and its noise's std.
        evaluation={
            site: {
                "change": e.change,
                "change_noise_std": e.change_std,
                "num_examples": e.examples,
                "epsilon": _epsilon(e.epsilon),
            }
            for site, e in round_log.evaluation.items()
        },
        rejected=[dataclasses.asdict(r) for r in round_log.rejected],
        # Updates scaled back to the round's norm bound (strategies/update_bound.py).
        bounded={
            site: {
                "node_id": int(b["node-id"]),
                "norm": float(b["norm"]),
                "limit": float(b["limit"]),
                "factor": float(b["factor"]),
            }
            for site, b in round_log.bounded.items()
        },
        bytes_down=int(round_log.bytes_down),
        bytes_up=int(round_log.bytes_up),
    )
    if round_log.secure:  # a secure-aggregation round: seconds and bytes per stage, dropouts
        entry["secure_aggregation"] = round_log.secure
    return entry


def refusals(round_logs: dict[int, Any]) -> list[dict[str, Any]]:
    """Every train reply left out, by round: from the strategy's round logs, so a round that
    lost its quorum (never scored, so not in metrics.jsonl) still names the sites that failed."""
    return [
        dict(dataclasses.asdict(r), round=server_round)
        for server_round, entry in sorted(round_logs.items())
        for r in entry.rejected
    ]


@dataclass(frozen=True)
class SiteOutcome:
    """What one site spent and scored over a cycle: its last word in the run's rounds."""

    epsilon: float | None
    epsilon_ceiling: float
    delta: float
    noise_multiplier: float
    rounds_participated: int
    heldout_change: float | None = None
    heldout_change_noise_std: float | None = None

    def manifest_figures(self) -> dict[str, Any]:
        """What a published version's manifest records of the site (under its pseudonym)."""
        return {
            "epsilon": self.epsilon,
            "epsilon_ceiling": self.epsilon_ceiling,
            "delta": self.delta,
            "rounds": self.rounds_participated,
        }


def site_outcomes(rounds: list[dict[str, Any]]) -> dict[str, SiteOutcome]:
    """Each site's outcome from the run's metrics.jsonl rows (a resumed run's too): later rounds
    overwrite earlier ones; the final evaluation's charge is part of the cycle's spend."""
    sites: dict[str, SiteOutcome] = {}
    for entry in rounds:
        for site, s in entry["sites"].items():
            prev = sites.get(site)
            sites[site] = SiteOutcome(
                epsilon=s["epsilon"],
                epsilon_ceiling=s["epsilon_ceiling"],
                delta=s["delta"],
                noise_multiplier=s["noise_multiplier"],
                rounds_participated=(prev.rounds_participated if prev else 0) + 1,
                heldout_change=prev.heldout_change if prev else None,
                heldout_change_noise_std=prev.heldout_change_noise_std if prev else None,
            )
        for site, e in entry["evaluation"].items():
            if site in sites:
                epsilon = e["epsilon"] if e.get("epsilon") is not None else sites[site].epsilon
                sites[site] = dataclasses.replace(
                    sites[site],
                    heldout_change=e["change"],
                    heldout_change_noise_std=e["change_noise_std"],
                    epsilon=epsilon,
                )
    return sites


def build_summary(
    cfg: Config,
    run_id: str,
    run_dir: Path,
    rounds: list[dict[str, Any]],
    round_logs: dict[int, Any],
    baseline: LossStats,
    candidate: LossStats,
    lm: LoraModel,
    sites: Mapping[str, SiteOutcome],
    *,
    wall_time_s: float,
) -> dict[str, Any]:
    """summary.json: the figures a coordinator or researcher reads first; ``sites`` is
    :func:`site_outcomes` of ``rounds``."""
    trained = [r for r in rounds if r["round"] > 0]
    down = [r["bytes_down"] for r in trained]
    up = [r["bytes_up"] for r in trained]
    sampled = sum(r["sites_sampled"] for r in trained) or 1
    return {
        "name": cfg.name,
        "run_id": run_id,
        "run_dir": str(run_dir),
        "rounds": cfg.rounds,
        "baseline_loss": baseline.loss,
        "candidate_loss": candidate.loss,
        "baseline_perplexity": baseline.perplexity,
        "candidate_perplexity": candidate.perplexity,
        "improved": candidate.loss < baseline.loss,
        "validation_examples": baseline.examples,
        "sites": {site: dataclasses.asdict(outcome) for site, outcome in sites.items()},
        "refusals": refusals(round_logs),
        "bounded": [
            dict(b, site_id=site, round=e["round"]) for e in trained for site, b in e.get("bounded", {}).items()
        ],
        "privacy": {
            "enabled": cfg.privacy.enabled,
            "target_epsilon": cfg.privacy.target_epsilon,
            "max_grad_norm": cfg.privacy.max_grad_norm,
        },
        "communication": {
            "adapter_bytes": lm.spec.nbytes,
            "full_model_bytes": lm.base_nbytes,
            "adapter_to_model_ratio": lm.spec.nbytes / lm.base_nbytes if lm.base_nbytes else 0.0,
            "bytes_down_per_round": sum(down) / len(down) if down else 0.0,
            "bytes_up_per_round": sum(up) / len(up) if up else 0.0,
            "bytes_per_client_per_round": (sum(down) + sum(up)) / sampled,
            "bytes_total": sum(down) + sum(up),
        },
        "wall_time_s": round(wall_time_s, 3),
    }

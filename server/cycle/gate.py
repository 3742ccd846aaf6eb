"""The publish gate: does the candidate beat the baseline clearly enough to ship?

Candidate and baseline are scored on the same data twice over: the coordinator's
validation set (per-record losses, so a paired bootstrap over records is possible)
and each site's held-out data. A site returns the count, sum and sum of squares of
its records' clipped loss changes, each with Gaussian noise whose standard deviation
it states (client/round/site.py); the intervals below widen by that noise. The policy
(``conf/gate/``) passes a candidate only when

1. ``margin``: validation loss falls by at least ``gate.margin`` nats;
2. ``confidence``: the paired-bootstrap interval of that fall, at
   ``gate.confidence``, lies above zero;
3. ``federated``: pooled over the sites' records, the normal-approximation
   interval of the fall lies above zero too (``gate.require_federated_confidence``);
4. ``sites``: no site's held-out loss rises by more than ``gate.site_tolerance``
   beyond what its noise explains (its change minus ``z`` noise standard deviations,
   ``z`` the normal quantile of ``gate.confidence``);
5. ``coverage``: at least ``gate.min_sites`` sites returned an evaluation;
6. ``robustness`` (``gate.robustness``): on perturbed copies of validation records, and on
   canaries a simulation planted, the candidate is no worse than the champion beyond
   ``gate.robustness.tolerance`` (server/cycle/robustness.py).

A candidate that passes becomes ``publish``, or ``pending_approval`` when the policy
asks for an operator (``fedretrain registry approve VERSION``). Everything here is
plain arithmetic on plain numbers: no Flower, no torch. The sites' figures arrive as the
strategy recorded them (``strategies.validation.SiteEvaluation``), typed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from fedretrain.config.schema import GateConfig
from fedretrain.training.evaluate import LossStats
from strategies.validation import SiteEvaluation

PUBLISH, REFUSE, PENDING = "publish", "refuse", "pending_approval"


@dataclass(frozen=True)
class GateResult:
    """The decision, the reasons in words with their numbers, and every figure."""

    decision: str
    reasons: tuple[str, ...]
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.decision != REFUSE

    def to_dict(self, site_name: Callable[[str], str] | None = None) -> dict[str, Any]:
        """JSON-ready; ``site_name`` renames the sites (the manifest names them by pseudonym)."""
        data = {"decision": self.decision, "reasons": list(self.reasons), **self.figures}
        if site_name is not None:
            data["sites"] = {site_name(s): v for s, v in data.get("sites", {}).items()}
            if data.get("worst_site"):
                data["worst_site"] = site_name(data["worst_site"])
        return data


def decide(
    policy: GateConfig,
    baseline: LossStats,
    candidate: LossStats,
    sites: Sequence[SiteEvaluation],
    *,
    seed: int,
    robustness: dict[str, Any] | None = None,
) -> GateResult:
    """Apply ``policy`` to the scores of ``baseline`` and ``candidate``.

    ``baseline`` and ``candidate`` must be scored on the same validation records in
    the same order. ``robustness``: the robustness suite's figures (server/cycle/robustness.py),
    whose ``failures`` refuse the candidate (6. ``robustness``); None when it did not run.
    """
    if baseline.examples != candidate.examples:
        raise ValueError(f"baseline scored {baseline.examples} records, candidate {candidate.examples}")
    improvement = baseline.loss - candidate.loss
    low, high = paired_bootstrap(baseline, candidate, policy.confidence, policy.bootstrap_samples, seed)
    federated = pooled_interval(sites, policy.confidence)
    changes = {s.site_id: s.change for s in sites}
    z = NormalDist().inv_cdf(0.5 + policy.confidence / 2)
    # A site counts as worse only beyond its noise: the lower end of its change's interval.
    worse_by = {s.site_id: s.change - z * s.change_std for s in sites}
    worst = max(changes, key=changes.__getitem__) if changes else None

    checks = {
        "margin": improvement >= policy.margin,
        "confidence": low > 0,  # False for NaN (fewer than two records)
        "federated": (not policy.require_federated_confidence) or (federated is not None and federated["ci_low"] > 0),
        "sites": all(low <= policy.site_tolerance for low in worse_by.values()),
        "coverage": len(sites) >= policy.min_sites,
    }
    reasons = _reasons(policy, checks, improvement, (low, high), federated, worse_by, len(sites))
    if robustness is not None:
        checks["robustness"] = not robustness["failures"]
        reasons += robustness["failures"]
    if not all(checks.values()):
        decision = REFUSE
    else:
        decision = PENDING if policy.require_approval else PUBLISH
        reasons.append(
            f"validation loss {baseline.loss:.4f} -> {candidate.loss:.4f} "
            f"(improvement {improvement:.4f}, {policy.confidence:.0%} interval [{low:.4f}, {high:.4f}])"
        )
        if policy.require_approval:
            reasons.append("the policy requires an operator's approval: fedretrain registry approve VERSION")
    figures = {
        "metric": "validation_loss",
        "baseline": baseline.loss,
        "candidate": candidate.loss,
        "improvement": improvement,
        "margin": policy.margin,
        "confidence": policy.confidence,
        "ci_low": low,
        "ci_high": high,
        "bootstrap_samples": policy.bootstrap_samples,
        "validation_examples": baseline.examples,
        "federated": federated,
        "sites": {
            s.site_id: {"change": s.change, "change_noise_std": s.change_std, "examples": s.examples} for s in sites
        },
        "worst_site": worst,
        "worst_site_change": changes[worst] if worst else None,
        "site_tolerance": policy.site_tolerance,
        "checks": checks,
    }
    if robustness is not None:
        figures["robustness"] = robustness
    return GateResult(decision=decision, reasons=tuple(reasons), figures=figures)


def paired_bootstrap(
    baseline: LossStats, candidate: LossStats, confidence: float, samples: int, seed: int
) -> tuple[float, float]:
    """Percentile interval of the token-weighted loss improvement, resampling records.

    Each resample draws records with replacement and recomputes
    ``sum(w * (b - c)) / sum(w)`` with ``w`` each record's counted tokens: the same
    statistic as ``baseline.loss - candidate.loss``, whose spread it measures.
    """
    b = np.asarray(baseline.example_losses, dtype=np.float64)
    c = np.asarray(candidate.example_losses, dtype=np.float64)
    w = np.asarray(baseline.example_tokens or [1] * len(b), dtype=np.float64)
    if len(b) < 2:  # one record resamples to itself: no interval, so no confidence
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    gain = w * (b - c)
    # [rows, n] indices per chunk, at most ~4M of them (32 MB) whatever the validation size.
    rows = max(1, 4_000_000 // len(b))
    stats = np.empty(samples)
    for start in range(0, samples, rows):
        idx = rng.integers(0, len(b), size=(min(rows, samples - start), len(b)))
        stats[start : start + len(idx)] = gain[idx].sum(axis=1) / np.maximum(w[idx].sum(axis=1), 1e-12)
    alpha = 1 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def pooled_interval(sites: Sequence[SiteEvaluation], confidence: float) -> dict[str, Any] | None:
    """Normal-approximation interval of the mean per-record improvement over all sites' records.

    Built from the sites' noised sums alone: ``n = sum n_k``, ``mean = sum S_k / n`` and
    ``var = (sum Q_k - n * mean^2) / (n - 1)`` with ``S_k``, ``Q_k`` each site's sum and
    sum of squares of (candidate - baseline). The half-width covers both the records'
    spread and the sites' noise: ``z * sqrt(var / n + sum std_k^2 / n^2)``.
    Improvement is ``-mean``. None with fewer than two records (noised count).
    """
    n = math.fsum(s.examples for s in sites)
    if n < 2:
        return None
    mean = math.fsum(s.diff_sum for s in sites) / n
    var = max(math.fsum(s.diff_sumsq for s in sites) - n * mean * mean, 0.0) / (n - 1)
    noise = math.fsum(s.sum_std**2 for s in sites) / (n * n)
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(var / n + noise)
    return {"examples": n, "improvement": -mean, "ci_low": -mean - half, "ci_high": -mean + half}


def _reasons(
    policy: GateConfig,
    checks: dict[str, bool],
    improvement: float,
    interval: tuple[float, float],
    federated: dict[str, Any] | None,
    changes: dict[str, float],
    evaluated: int,
) -> list[str]:
    reasons = []
    if not checks["margin"]:
        reasons.append(f"validation loss improved by {improvement:.4f}, less than the margin {policy.margin:.4f}")
    if not checks["confidence"]:
        reasons.append(
            f"the {policy.confidence:.0%} bootstrap interval of the improvement "
            f"[{interval[0]:.4f}, {interval[1]:.4f}] does not lie above 0"
        )
    if not checks["federated"]:
        if federated is None:
            reasons.append("no federated evaluation to confirm the improvement at the sites")
        else:
            reasons.append(
                f"at the sites, the {policy.confidence:.0%} interval of the improvement "
                f"[{federated['ci_low']:.4f}, {federated['ci_high']:.4f}] does not lie above 0"
            )
    for site, change in sorted(changes.items()):
        if change > policy.site_tolerance:
            reasons.append(
                f"site {site}: held-out loss rises by at least {change:.4f} (beyond its noise), "
                f"more than the tolerance {policy.site_tolerance:.4f}"
            )
    if not checks["coverage"]:
        reasons.append(f"{evaluated} site(s) evaluated the candidate; the policy needs {policy.min_sites}")
    return reasons

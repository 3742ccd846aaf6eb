"""The staged rollout: a version that passed the gate goes first to canary sites, then to all or back.

With ``publish.canary`` set, a cycle's passing candidate is published *pending* (the champion
does not move) and:

1. the canaries (``publish.canary``: site ids, or a share of the cycle's sites drawn with the
   seed) get it in a ``query.trial`` message; each verifies it and runs it beside its installed
   version on its live traffic, in shadow or as an A/B split (client/install/trial.py,
   client/serve/app.py);
2. every ``check_s`` the coordinator asks the canaries that have not reported (``query.canary``)
   until each has, or ``timeout_s`` passed. A report is a Gaussian release: noised sums of the
   per-answer loss change (trial - installed) on the texts users corrected, and in A/B the
   good and rated counts of each version (client/serve/canary.py);
3. per canary, the interval of the change (the records' spread and the noise, as the gate's
   pooled interval) says: **worse** when it lies above ``tolerance`` (or, A/B, the candidate's
   share of good ratings is below the installed one's by more than ``rating_tolerance`` beyond
   its interval), **not worse** when it lies at or below ``tolerance`` (and the ratings do not
   say worse), else **inconclusive**;
4. any canary worse: **rollback**: the registry signs a withdrawal of the version and the
   canaries get it (``query.withdraw``); the version can never become champion. Every canary
   not worse: **promote**: the registry approves the version (the champion moves, signed) and
   it is delivered to every site. Otherwise (inconclusive, silent past the deadline, refused):
   **hold**: the version stays pending and on trial, for the operator (``registry approve``).
   ``action=hold`` holds whatever the figures say, with the verdict they gave.

Each decision is appended to the registry's ``decisions.jsonl`` with every canary's figures.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedretrain.config import Job, PublishConfig
from fedretrain.errors import ReplyRejected
from fedretrain.registry.bundle import VersionBundle
from server.cycle.gate import pooled_interval
from server.cycle.publish import RegistryHandle, deliver
from server.sites.broadcast import broadcast
from strategies.validation import EVALUATE_METRICS, SiteEvaluation, checked_evaluation, scalar_metrics

log = logging.getLogger("fedretrain.server")

TRIAL_MESSAGE, WITHDRAW_MESSAGE, CANARY_MESSAGE = "query.trial", "query.withdraw", "query.canary"
PROMOTE, HOLD, ROLLBACK = "promote", "hold", "rollback"
WORSE, NOT_WORSE, INCONCLUSIVE, SILENT, REFUSED = "worse", "not worse", "inconclusive", "silent", "refused"


def choose_canaries(policy: PublishConfig, sites: Mapping[str, int], seed: int, version: int) -> list[str]:
    """The canary sites among ``sites`` (site id -> node): those named, or a share drawn with the
    seed and the version (at least one, and one site left out where there are two or more)."""
    if isinstance(policy.canary, tuple):
        return sorted(policy.canary)
    assert isinstance(policy.canary, float)
    names = sorted(sites)
    count = max(1, min(len(names) - 1, math.ceil(policy.canary * len(names)))) if len(names) > 1 else len(names)
    return sorted(random.Random(f"canary-{seed}-{version}").sample(names, count))


@dataclass(frozen=True)
class CanaryReport:
    """One canary's noised figures, and what they say."""

    site_id: str
    verdict: str
    figures: dict[str, Any]


def judge(site_id: str, metrics: Mapping[str, Any], policy: PublishConfig) -> CanaryReport:
    """What one canary's report says (see the module docstring)."""
    figures: dict[str, Any] = {}
    worse, fine = [], []  # per measure: beyond the tolerance / within it, each with its interval
    # The gate's interval of the sites' noised sums (records' spread plus the noise), of one site.
    pooled = pooled_interval([SiteEvaluation.from_metrics(site_id, 0, dict(metrics))], policy.confidence)
    if pooled is not None:  # improvement = -change
        low, high = -pooled["ci_high"], -pooled["ci_low"]
        figures["corrections"] = {
            "examples": pooled["examples"],
            "change": -pooled["improvement"],
            "ci_low": low,
            "ci_high": high,
        }
        worse.append(low > policy.tolerance)
        fine.append(high <= policy.tolerance)
    ratings = _ratings(metrics, NormalDist().inv_cdf(0.5 + policy.confidence / 2))
    if ratings is not None:
        figures["ratings"] = ratings
        worse.append(ratings["ci_high"] < -policy.rating_tolerance)
        fine.append(ratings["ci_low"] >= -policy.rating_tolerance)
    verdict = WORSE if any(worse) else NOT_WORSE if fine and all(fine) else INCONCLUSIVE
    return CanaryReport(site_id, verdict, figures)


AB_COUNTS = tuple(f"ab-{arm}-{k}" for arm in ("trial", "installed") for k in ("good", "rated"))


def canary_reply(site_id: str, node_id: int, content: RecordDict, version: int) -> dict[str, Any] | None:
    """A canary's checked report on ``version``, or None while it is not ready.

    The sums are an evaluation reply's, checked as one (:func:`strategies.validation.checked_evaluation`);
    A/B counts come whole, each with a noise std > 0. Anything else raises ReplyRejected, a
    ValueError, which :func:`server.sites.broadcast.broadcast` turns into a refusal."""
    record = content.metric_records["metrics"]
    if record.get("trial-version") != version:
        raise ReplyRejected(f"it reports on version {record.get('trial-version')!r}, not {version}")
    if record.get("ready") != 1:
        return None
    ab = AB_COUNTS + tuple(f"{key}-std" for key in AB_COUNTS) if any(k in record for k in AB_COUNTS) else ()
    metrics = scalar_metrics(record, EVALUATE_METRICS + ab)
    checked_evaluation(site_id, node_id, metrics)
    for key in ab[len(AB_COUNTS) :]:
        if not metrics[key] > 0:
            raise ReplyRejected(f"{key} must be > 0, got {metrics[key]!r}")
    return dict(metrics)


def _ratings(metrics: Mapping[str, Any], z: float) -> dict[str, Any] | None:
    """The candidate's share of good ratings minus the installed version's, with its interval."""
    keys = ("ab-trial-good", "ab-trial-rated", "ab-installed-good", "ab-installed-rated")
    if not all(k in metrics for k in keys):
        return None
    rates, variance = [], 0.0
    for arm in ("trial", "installed"):
        good, rated = float(metrics[f"ab-{arm}-good"]), float(metrics[f"ab-{arm}-rated"])
        if rated < 1:
            return None
        p = min(max(good / rated, 0.0), 1.0)
        noise = (
            float(metrics[f"ab-{arm}-good-std"]) ** 2 + (p * float(metrics[f"ab-{arm}-rated-std"])) ** 2
        ) / rated**2
        rates.append(p)
        variance += p * (1 - p) / rated + noise
    change = rates[0] - rates[1]
    half = z * math.sqrt(variance)
    return {
        "trial_good_rate": rates[0],
        "installed_good_rate": rates[1],
        "change": change,
        "ci_low": change - half,
        "ci_high": change + half,
    }


def decide(reports: list[CanaryReport], policy: PublishConfig) -> tuple[str, str, list[str]]:
    """The rollout's decision, the decision the figures alone call for, and the reasons."""
    reasons = [_reason(r, policy) for r in reports]
    if any(r.verdict == WORSE for r in reports):
        called = ROLLBACK
    elif reports and all(r.verdict == NOT_WORSE for r in reports):
        called = PROMOTE
    else:
        called = HOLD
    decision = called if policy.action == "auto" else HOLD
    if decision != called:
        reasons.append(f"publish.action=hold: the figures call for {called}; the operator decides")
    return decision, called, reasons


def _reason(report: CanaryReport, policy: PublishConfig) -> str:
    if report.verdict in (SILENT, REFUSED):
        return f"canary {report.site_id}: {report.figures.get('reason', report.verdict)}"
    parts = []
    c = report.figures.get("corrections")
    if c is not None:
        parts.append(
            f"loss on {c['examples']:.0f} corrected answers changes by {c['change']:+.4f} nats "
            f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] (tolerance {policy.tolerance:g})"
        )
    r = report.figures.get("ratings")
    if r is not None:
        parts.append(
            f"good ratings {r['trial_good_rate']:.0%} vs {r['installed_good_rate']:.0%} "
            f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] (tolerance {policy.rating_tolerance:g})"
        )
    return f"canary {report.site_id}: {report.verdict}: " + "; ".join(parts or ["no figures"])


def run_rollout(
    grid: Grid,
    handle: RegistryHandle,
    policy: PublishConfig,
    job: Job,
    version: int,
    site_nodes: Mapping[str, int],
    *,
    seed: int,
    publish_timeout_s: float,
    approver: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Stage ``version`` (published pending) at the canaries, wait for their reports, act; the record."""
    registry = handle.registry
    bundle = registry.bundle(version)
    canaries = choose_canaries(policy, site_nodes, seed, version)
    started = clock()
    record: dict[str, Any] = {"run_id": job.run_id, "version": version, "canaries": canaries, "mode": policy.mode}
    trial_sent = _send_trial(
        grid, bundle, policy, job, {s: site_nodes[s] for s in canaries if s in site_nodes}, publish_timeout_s
    )
    reports: dict[str, CanaryReport] = {}
    for site in canaries:
        if site not in site_nodes:
            reports[site] = CanaryReport(site, SILENT, {"reason": "not connected in this cycle's last round"})
        elif site not in trial_sent.answered:
            refusal = next((r["reason"] for r in trial_sent.refused if r["site_id"] == site), "no reply")
            reports[site] = CanaryReport(site, REFUSED, {"reason": f"did not take the trial: {refusal}"})
    waiting = {s: site_nodes[s] for s in canaries if s not in reports}
    polls = 0
    while waiting:
        polls += 1
        asked = broadcast(
            grid,
            RecordDict({"config": ConfigRecord(job.to_flat())}),
            CANARY_MESSAGE,
            min(publish_timeout_s, policy.check_s * 4),
            lambda site, node, reply: canary_reply(site, node, reply, version),
            what=f"canary reports on version {version}",
            node_ids=waiting.values(),
        )
        for site, (node, metrics) in asked.answered.items():
            if metrics is not None and waiting.get(site) == node:
                reports[site] = judge(site, metrics, policy)
                reports[site].figures["epsilon"] = metrics.get("epsilon")
                del waiting[site]
        for refusal in asked.refused:  # an error reply (its budget, say) or a malformed report: final
            refusing = next((s for s, n in waiting.items() if n == refusal["node_id"]), None)
            if refusing is not None:
                what = "refused its report" if refusal.get("code") is not None else "a malformed report"
                reports[refusing] = CanaryReport(refusing, REFUSED, {"reason": f"{what}: {refusal['reason']}"})
                del waiting[refusing]
        remaining = policy.timeout_s - (clock() - started)
        if waiting and remaining <= 0:
            for site in waiting:
                reports[site] = CanaryReport(
                    site, SILENT, {"reason": f"no report within publish.timeout_s={policy.timeout_s:g} s"}
                )
            break
        if waiting:
            sleep(min(policy.check_s, remaining))
    ordered = [reports[s] for s in canaries]
    decision, called, reasons = decide(ordered, policy)
    for line in reasons:
        log.info("rollout of version %d: %s", version, line)
    record.update(
        {
            "decision": decision,
            "called_for": called,
            "reasons": reasons,
            "reports": {r.site_id: {"verdict": r.verdict, **r.figures} for r in ordered},
            "polls": polls,
            "seconds": round(clock() - started, 3),
        }
    )
    if decision == PROMOTE:
        registry.approve(version, signing_key=handle.signing_key, approver=approver)
        # No student yet: the cycle distils it once the version is out (server/cycle/run.py).
        record["publication"] = deliver(grid, registry.bundle(version), None, job, publish_timeout_s)
    elif decision == ROLLBACK:
        withdrawal = registry.withdraw(version, signing_key=handle.signing_key, reason="; ".join(reasons))
        sent = broadcast(
            grid,
            RecordDict(
                {"withdrawal": ConfigRecord(dict(withdrawal.to_mapping())), "config": ConfigRecord(job.to_flat())}
            ),
            WITHDRAW_MESSAGE,
            publish_timeout_s,
            lambda _s, _n, reply: dict(reply["metrics"]),
            what=f"withdrawal of version {version}",
            node_ids=[site_nodes[s] for s in canaries if s in site_nodes],
        )
        record["withdrawn_at"] = sorted(sent.answered)
        record["withdrawal_refused"] = sent.refused
        record["withdrawal_no_reply"] = sent.no_reply
    registry.record_decision({"kind": "rollout", **record})
    log.info("rollout of version %d: %s (canaries %s)", version, decision, ", ".join(canaries))
    return record


def _send_trial(
    grid: Grid, bundle: VersionBundle, policy: PublishConfig, job: Job, nodes: Mapping[str, int], timeout_s: float
):  # noqa: ANN202 - a Broadcast
    settings: dict[str, Any] = {"mode": policy.mode, "ab-share": policy.ab_share, "min-feedback": policy.min_feedback}
    if policy.report_after_s is not None:
        settings["report-after-s"] = policy.report_after_s
    content = RecordDict(
        {
            "version": ConfigRecord(dict(bundle.to_mapping())),
            "rollout": ConfigRecord(settings),
            "config": ConfigRecord(job.to_flat()),
        }
    )
    return broadcast(
        grid,
        content,
        TRIAL_MESSAGE,
        timeout_s,
        lambda _s, _n, reply: dict(reply["metrics"]),
        what=f"trial of version {bundle.version}",
        node_ids=nodes.values(),
    )

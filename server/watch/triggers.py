"""The coordinator's retraining triggers: should a cycle start after this poll?

Every poll, each site answers a status query with scalars only (new records,
drift scores, losses of the published model, its privacy budget). The policy
(``conf/trigger/``) raises an alert for each trigger whose condition holds:

1. ``initial``: nothing is published and no cycle has ever started;
2. ``new_records``: the sites hold at least ``trigger.new_records`` new records;
3. ``drift``: at least ``trigger.drift_min_sites`` sites report a drift score at
   or above ``trigger.drift_js`` / ``trigger.drift_hidden``;
4. ``performance``: on new data the published model's loss exceeds its loss on
   reference data by more than ``trigger.performance_margin`` (record-weighted mean);
5. ``schedule``: ``trigger.schedule_s`` seconds have passed since the last cycle;
6. ``operator``: an operator asked for a cycle (one alert per request).

Alerts start one cycle, with the sites that can pay for it, unless a cycle is
running, the rate limit (``trigger.min_interval_s``; an operator bypasses it)
holds, or fewer than ``min_sites`` sites can pay. Plain arithmetic, no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from numbers import Real
from typing import Any

from fedretrain.config.schema import TriggerConfig
from fedretrain.errors import ReplyRejected

_COUNTS = ("new-records", "reference-records", "train-records", "model-version")
_FLAGS = ("has-reference", "can-afford")
_BUDGET = ("epsilon-spent", "epsilon-ceiling", "delta", "epsilon-projected")
_OPTIONAL = ("drift-js", "drift-hidden", "loss-new", "loss-reference")


@dataclass(frozen=True)
class SiteStatus:
    """One site's answer to the status query. Attribute ``x_y`` holds metric key ``x-y``.

    The optional scores (``drift_js``, ``drift_hidden``, ``loss_new``,
    ``loss_reference``) are None when the site has too little new data.
    """

    site_id: str
    node_id: int
    new_records: int
    reference_records: int
    has_reference: bool
    train_records: int
    model_version: int  # 0: the base model
    epsilon_spent: float
    epsilon_ceiling: float
    delta: float
    epsilon_projected: float  # epsilon after one more cycle
    can_afford: bool
    drift_js: float | None = None
    drift_hidden: float | None = None
    loss_new: float | None = None
    loss_reference: float | None = None

    @classmethod
    def from_metrics(cls, site_id: str, node_id: int, metrics: Mapping[str, Any]) -> SiteStatus:
        """Check and convert a site's status metrics (a MetricRecord's items).

        Raises
        ------
        ReplyRejected
            (a ``ValueError``) naming the key: a required key is missing, a value
            is not a finite number, a count is negative or fractional, a 0/1 flag
            is neither, or an epsilon/delta is negative.
        """
        values: dict[str, Any] = {}
        for key in _COUNTS + _FLAGS + _BUDGET:
            if key not in metrics:
                raise ReplyRejected(f"site {site_id}: status key '{key}' is missing")
            values[key] = _number(site_id, key, metrics[key])
        for key in _COUNTS:
            if values[key] < 0 or not float(values[key]).is_integer():
                raise ReplyRejected(
                    f"site {site_id}: status key '{key}' must be a whole number >= 0, got {values[key]!r}"
                )
            values[key] = int(values[key])
        for key in _FLAGS:
            if values[key] not in (0, 1):
                raise ReplyRejected(f"site {site_id}: status key '{key}' must be 0 or 1, got {values[key]!r}")
            values[key] = bool(values[key])
        for key in _BUDGET:
            if values[key] < 0:
                raise ReplyRejected(f"site {site_id}: status key '{key}' must be >= 0, got {values[key]!r}")
            values[key] = float(values[key])
        for key in _OPTIONAL:
            values[key] = None if metrics.get(key) is None else float(_number(site_id, key, metrics[key]))
        return cls(site_id=site_id, node_id=node_id, **{k.replace("-", "_"): v for k, v in values.items()})


def _number(site_id: str, key: str, value: Any) -> Real:
    if not isinstance(value, Real) or not math.isfinite(value):
        raise ReplyRejected(f"site {site_id}: status key '{key}' must be a finite number, got {value!r}")
    return value


@dataclass(frozen=True)
class Alert:
    """One trigger that fired: its name, a sentence with the figures, and the figures."""

    trigger: str
    message: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TriggerDecision:
    """Whether a cycle starts, why, and which sites take part.

    ``held`` says why no cycle starts although alerts fired; None otherwise.
    ``excluded`` maps each site that cannot pay for a cycle to its epsilon figures.
    """

    start: bool
    alerts: tuple[Alert, ...]
    eligible: tuple[str, ...]
    excluded: dict[str, str]
    held: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "alerts": [asdict(a) for a in self.alerts],
            "eligible": list(self.eligible),
            "excluded": dict(self.excluded),
            "held": self.held,
        }


@dataclass(frozen=True)
class Poll:
    """What the triggers see: the responding sites' statuses and the coordinator's clock and state."""

    statuses: Sequence[SiteStatus]
    now: float
    last_cycle_at: float | None
    champion_version: int | None
    operator_requests: Sequence[str] = ()


def _initial(cfg: TriggerConfig, poll: Poll) -> list[Alert]:
    if poll.champion_version is not None or poll.last_cycle_at is not None:
        return []
    return [Alert("initial", "no model is published yet and no cycle has ever started", {})]


def _new_records(cfg: TriggerConfig, poll: Poll) -> list[Alert]:
    if cfg.new_records is None:
        return []
    total = sum(s.new_records for s in poll.statuses)
    if total < cfg.new_records:
        return []
    return [
        Alert(
            "new_records",
            f"{total} new records at {len(poll.statuses)} site(s), threshold {cfg.new_records}",
            {"total": total, "threshold": cfg.new_records, "sites": {s.site_id: s.new_records for s in poll.statuses}},
        )
    ]


def _drift(cfg: TriggerConfig, poll: Poll) -> list[Alert]:
    limits = {"drift_js": cfg.drift_js, "drift_hidden": cfg.drift_hidden}
    limits = {name: limit for name, limit in limits.items() if limit is not None}
    if not limits:
        return []
    drifted: dict[str, dict[str, float]] = {}
    for s in poll.statuses:
        over = {
            name: getattr(s, name)
            for name, limit in limits.items()
            if getattr(s, name) is not None and getattr(s, name) >= limit
        }
        if over:
            drifted[s.site_id] = over
    if len(drifted) < cfg.drift_min_sites:
        return []
    described = "; ".join(
        f"{site}: "
        + ", ".join(
            f"{name.removeprefix('drift_')} {score:.4f} >= {limits[name]:.4f}" for name, score in scores.items()
        )
        for site, scores in drifted.items()
    )
    return [
        Alert(
            "drift",
            f"drift at {len(drifted)} site(s), {cfg.drift_min_sites} needed ({described})",
            {"sites": drifted, "count": len(drifted), "min_sites": cfg.drift_min_sites, "thresholds": limits},
        )
    ]


def _performance(cfg: TriggerConfig, poll: Poll) -> list[Alert]:
    if cfg.performance_margin is None:
        return []
    scored = [s for s in poll.statuses if s.loss_new is not None and s.loss_reference is not None]
    if not scored:
        return []
    weights = [float(s.new_records) for s in scored]
    if sum(weights) == 0:  # no site counted new records: weigh the sites equally
        weights = [1.0] * len(scored)
    gaps = {s.site_id: s.loss_new - s.loss_reference for s in scored}  # type: ignore[operator]
    gap = math.fsum(w * g for w, g in zip(weights, gaps.values(), strict=True)) / math.fsum(weights)
    if gap <= cfg.performance_margin:
        return []
    return [
        Alert(
            "performance",
            f"loss on new data {gap:.4f} nats above loss on reference data "
            f"(mean over {len(scored)} site(s)), margin {cfg.performance_margin:.4f}",
            {"gap": gap, "margin": cfg.performance_margin, "sites": gaps},
        )
    ]


def _schedule(cfg: TriggerConfig, poll: Poll) -> list[Alert]:
    if cfg.schedule_s is None:
        return []
    if poll.last_cycle_at is None:
        return [
            Alert(
                "schedule",
                f"no cycle has run yet and one is due every {cfg.schedule_s:g} s",
                {"elapsed_s": None, "schedule_s": cfg.schedule_s},
            )
        ]
    elapsed = poll.now - poll.last_cycle_at
    if elapsed < cfg.schedule_s:
        return []
    return [
        Alert(
            "schedule",
            f"{elapsed:g} s since the last cycle, one is due every {cfg.schedule_s:g} s",
            {"elapsed_s": elapsed, "schedule_s": cfg.schedule_s},
        )
    ]


def _operator(cfg: TriggerConfig, poll: Poll) -> list[Alert]:
    return [
        Alert("operator", f"an operator asked for a cycle: {reason}", {"reason": reason})
        for reason in poll.operator_requests
    ]


TRIGGERS: dict[str, Callable[[TriggerConfig, Poll], list[Alert]]] = {
    "initial": _initial,
    "new_records": _new_records,
    "drift": _drift,
    "performance": _performance,
    "schedule": _schedule,
    "operator": _operator,
}


def evaluate_triggers(
    cfg: TriggerConfig,
    statuses: Sequence[SiteStatus],
    *,
    now: float,
    last_cycle_at: float | None,
    champion_version: int | None,
    operator_requests: Sequence[str] = (),
    cycle_running: bool = False,
    min_sites: int = 1,
) -> TriggerDecision:
    """Run every trigger in ``TRIGGERS`` on one poll and decide whether a cycle starts.

    ``statuses`` are the sites that answered (refused replies left out); ``now`` and
    ``last_cycle_at`` are seconds on the same clock. All alerts that fire together
    start a single cycle.

    Raises
    ------
    ValueError
        Two statuses carry the same site id, or ``min_sites`` is below 1.
    """
    ids = [s.site_id for s in statuses]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"sites {twice} answered more than once in one poll")
    if min_sites < 1:
        raise ValueError(f"min_sites: must be >= 1, got {min_sites}")
    poll = Poll(statuses, now, last_cycle_at, champion_version, tuple(operator_requests))
    alerts = tuple(alert for trigger in TRIGGERS.values() for alert in trigger(cfg, poll))
    eligible = tuple(s.site_id for s in statuses if s.can_afford)
    excluded = {
        s.site_id: f"epsilon {s.epsilon_spent:.2f} spent, {s.epsilon_projected:.2f} after another cycle, "
        f"ceiling {s.epsilon_ceiling:.2f}"
        for s in statuses
        if not s.can_afford
    }
    held = _held(cfg, poll, alerts, len(eligible), cycle_running, min_sites) if alerts else None
    return TriggerDecision(
        start=bool(alerts) and held is None, alerts=alerts, eligible=eligible, excluded=excluded, held=held
    )


def _held(
    cfg: TriggerConfig, poll: Poll, alerts: tuple[Alert, ...], eligible: int, cycle_running: bool, min_sites: int
) -> str | None:
    if cycle_running:
        return "a cycle is already running"
    operator = any(a.trigger == "operator" for a in alerts)
    if poll.last_cycle_at is not None and not operator:
        elapsed = poll.now - poll.last_cycle_at
        if elapsed < cfg.min_interval_s:
            return f"rate limit: {elapsed:g} s since the last cycle, minimum {cfg.min_interval_s:g} s"
    if eligible < min_sites:
        return f"only {eligible} sites can pay for another cycle; min_sites is {min_sites}"
    return None


def format_decision(decision: TriggerDecision) -> str:
    """Log lines for operators: the outcome, then one line per alert and per excluded site."""
    names = ", ".join(dict.fromkeys(a.trigger for a in decision.alerts))
    if decision.start:
        head = f"retraining cycle starts ({names}) with {len(decision.eligible)} site(s)"
    elif decision.alerts:
        head = f"retraining held ({names}): {decision.held}"
    else:
        head = f"no trigger fired; {len(decision.eligible)} site(s) could take part"
    lines = [head]
    lines += [f"  {a.trigger}: {a.message}" for a in decision.alerts]
    lines += [f"  site {site} excluded: {reason}" for site, reason in decision.excluded.items()]
    return "\n".join(lines)

"""Simulated time with drift: ``fedretrain simulate scenario=drift``.

Step 0: nothing is published, so the watch's first poll starts a cycle, which publishes
version 1. At every later step each site ingests its new records through the real
ingestion path (``client.ingest.pipeline``); from ``scenario.drift_step`` on, the drifted sites'
records use new terminology and another mix of specialties. Then the coordinator's watch
polls the sites (real ``query.status`` messages, scalars back), checks its triggers and
runs a cycle when one fires, exactly as ``fedretrain coordinator watch`` does.

After every step the researcher's view is scored at the coordinator: the loss of the
published version on that step's fresh records (a probe drawn from the federation's
distribution at that step, which no site trains on), beside the loss of version 1 on
the same records: the federation that never retrains. ``drift.png`` plots both.

The coordinator's validation set follows the federation too: every step it holds fresh
records of that step (another random stream than the probe), as a coordinator that
keeps a current, consented validation sample would. A gate scored on last year's data
would refuse the very version that fixes the drift.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from client.ingest.pipeline import ingest_records
from fedretrain.atomic import atomic_write_json
from fedretrain.config import Config
from fedretrain.data.encoding import encode_texts
from fedretrain.modeling.lora_model import LoraModel, load_adapter_arrays, load_lora_model
from fedretrain.registry.signing import load_private_key
from fedretrain.registry.store import Registry
from fedretrain.training.evaluate import evaluate_loss
from server.cycle.publish import RegistryHandle, champion_adapter
from server.cycle.report import finite_or_null
from server.watch.loop import Watcher, WatchEvent
from simulation.drift import ARRIVALS_EPOCH, fresh_probe, step_arrivals
from simulation.federation import Federation, general_traffic, write_jsonl

log = logging.getLogger("fedretrain.simulation")


def run_drift_scenario(grid: Grid, cfg: Config, run_dir: Path, config_yaml: str, fed: Federation) -> dict[str, Any]:
    """Run ``cfg.scenario`` on ``grid``; write ``scenario.json``, ``drift.png`` and ``summary.json``."""
    sc = cfg.scenario
    started = time.perf_counter()
    drifted = sc.drifted_sites if sc.drifted_sites is not None else len(fed.sites)
    watcher = Watcher(grid, cfg, run_dir / "cycles", config_yaml, expected_sites=len(fed.sites))
    lm = load_lora_model(cfg.model, cfg.lora, seed=cfg.seed, device=cfg.model.device)
    handle = RegistryHandle(
        Registry(Path(cfg.registry.root)), load_private_key(Path(cfg.registry.signing_key)), cfg.registry.expiry_days
    )
    never_retrained: dict[str, Any] | None = None  # version 1's adapter: the federation that never retrains
    # Forgetting: every step's published version is scored on one probe of the pre-drift distribution too.
    pre_drift = _write_fresh(
        cfg, fed, run_dir / "probe" / "pre-drift.jsonl", max(sc.drift_step - 1, 0), 0, "pre-drift", sc.probe_records
    )
    pre_drift_losses: dict[int, float | None] = {}
    steps: list[dict[str, Any]] = []
    for step in range(sc.steps + 1):
        step_started = time.perf_counter() - started
        arrived = _arrivals(cfg, fed, step, drifted) if step > 0 else 0
        if cfg.simulation.traffic.general_from_step == step:
            _users_ask_general(cfg, fed)
        validation = run_dir / "validation" / f"step-{step:02d}.jsonl"
        _write_fresh(cfg, fed, validation, step, drifted, "validation", cfg.data.validation_records)
        event = watcher.poll_once(step * sc.step_s, validation_path=str(validation))
        champion = champion_adapter(handle)
        if champion is not None and never_retrained is None:
            never_retrained = {"version": champion.version, "arrays": champion.arrays}
        probe = _write_fresh(
            cfg, fed, run_dir / "probe" / f"step-{step:02d}.jsonl", step, drifted, "probe", sc.probe_records
        )
        record = _step_record(
            step,
            step >= sc.drift_step,
            arrived,
            event,
            champion.version if champion else None,
            time.perf_counter() - started,
        )
        record["started_s"] = round(step_started, 3)
        record["loss_published"] = _probe_loss(cfg, lm, probe, champion.arrays if champion else None)
        record["loss_never_retrained"] = _probe_loss(
            cfg, lm, probe, never_retrained["arrays"] if never_retrained else None
        )
        if champion is not None and champion.version not in pre_drift_losses:  # once a version
            pre_drift_losses[champion.version] = _probe_loss(cfg, lm, pre_drift, champion.arrays)
        record["loss_pre_drift"] = pre_drift_losses.get(champion.version) if champion else None
        _log_step(record)
        steps.append(record)
    result = _result(cfg, steps, drifted, time.perf_counter() - started)
    atomic_write_json(run_dir / "scenario.json", finite_or_null(result))
    atomic_write_json(run_dir / "summary.json", finite_or_null(result))
    plot_drift(result, run_dir / "drift.png")
    print(format_scenario(result), flush=True)
    return result


def _arrivals(cfg: Config, fed: Federation, step: int, drifted: int) -> int:
    # Each hospital's new notes go through the same ingestion as `fedretrain site ingest`.
    now = ARRIVALS_EPOCH + timedelta(seconds=step * cfg.scenario.step_s)  # step k starts k * step_s later
    total = 0
    for index, site in enumerate(fed.sites):
        records = step_arrivals(
            index,
            step,
            cfg.scenario.arrivals_per_step,
            cfg.seed,
            drifted=index < drifted and step >= cfg.scenario.drift_step,
            mix=fed.mixes[site.site_id],
            step_s=cfg.scenario.step_s,
        )
        total += ingest_records(site, records, source=f"step-{step}", now=now).accepted
    return total


def _write_fresh(
    cfg: Config, fed: Federation, path: Path, step: int, drifted: int, stream: str, count: int
) -> list[str]:
    """Write ``count`` fresh records of ``step`` to ``path`` (kept in the run directory); return their texts."""
    records = fresh_probe(
        step,
        count,
        cfg.seed,
        len(fed.sites),
        drifted,
        cfg.scenario.drift_step,
        fed.mixes,
        stream=stream,
        step_s=cfg.scenario.step_s,
    )
    write_jsonl(path, records)
    return [r["text"] for r in records]


def _probe_loss(cfg: Config, lm: LoraModel, probe: list[str], arrays: dict[str, Any] | None) -> float | None:
    if arrays is None:
        return None
    load_adapter_arrays(lm, arrays)
    dataset = encode_texts(lm.tokenizer, probe, cfg.model.max_length)
    return round(evaluate_loss(lm.model, dataset, batch_size=cfg.train.eval_batch_size).loss, 6)


def _step_record(
    step: int, drifted: bool, arrived: int, event: WatchEvent, version: int | None, wall_s: float
) -> dict[str, Any]:
    cycle = event.cycle
    statuses = {
        s.site_id: {
            "new_records": s.new_records,
            "drift_js": s.drift_js,
            "drift_hidden": s.drift_hidden,
            "loss_new": s.loss_new,
            "loss_reference": s.loss_reference,
            "epsilon_spent": s.epsilon_spent,
            "can_afford": s.can_afford,
        }
        for s in event.poll.statuses
    }
    return {
        "step": step,
        "drifted": drifted,
        "records_arrived": arrived,
        "sites": statuses,
        "alerts": [{"trigger": a.trigger, "message": a.message} for a in event.decision.alerts],
        "held": event.decision.held,
        "excluded": event.decision.excluded,
        "cycle_started": event.decision.start,
        "cycle_failure": event.failure,
        "gate": None if cycle is None else cycle["gate"]["decision"],
        "rollout": None if cycle is None or not cycle.get("rollout") else _rollout_figures(cycle["rollout"]),
        "published_in_step": None if cycle is None else cycle["published_version"],
        "installed_at": None
        if cycle is None or not cycle.get("publication")
        else sorted(cycle["publication"]["installed"]),
        "epsilon_after": None if cycle is None else {s: v["epsilon"] for s, v in cycle["sites"].items()},
        "published_version": version,
        "wall_s": round(wall_s, 3),
    }


def _users_ask_general(cfg: Config, fed: Federation) -> None:
    """From this step the sites' simulated users ask general questions: their replay files change."""
    traffic = cfg.simulation.traffic
    for index, site in enumerate(fed.sites):
        if site.replay_traffic:
            requests = general_traffic(index, traffic, cfg.seed)
            write_jsonl(Path(site.replay_traffic), requests)
    log.info("the sites' users now ask general, non-clinical questions (%d requests a site)", traffic.requests)


def _rollout_figures(rollout: dict[str, Any]) -> dict[str, Any]:
    """A staged rollout's decision and each canary's verdict and loss change on corrected answers."""
    return {
        "version": rollout["version"],
        "decision": rollout["decision"],
        "canaries": {
            site: {
                "verdict": report["verdict"],
                **{k: report["corrections"][k] for k in ("examples", "change", "ci_low", "ci_high")},
            }
            if "corrections" in report
            else {"verdict": report["verdict"]}
            for site, report in rollout["reports"].items()
        },
        "withdrawn_at": rollout.get("withdrawn_at"),
    }


def _result(cfg: Config, steps: list[dict[str, Any]], drifted: int, wall_s: float) -> dict[str, Any]:
    sc = cfg.scenario
    # Recovery: the first version published after the drift that the sites installed.
    recovered = next(
        (s for s in steps if s["step"] >= sc.drift_step and s["published_in_step"] is not None and s["installed_at"]),
        None,
    )
    after = [s for s in steps if recovered is not None and s["step"] >= recovered["step"]]
    drift_cycle = next(
        (
            s["step"]
            for s in steps
            if s["step"] >= sc.drift_step and s["cycle_started"] and any(a["trigger"] == "drift" for a in s["alerts"])
        ),
        None,
    )

    def mean(key: str) -> float | None:
        values = [s[key] for s in after if s[key] is not None]
        return sum(values) / len(values) if values else None

    # Forgetting: the pre-drift probe's loss under the recovering version minus under the version
    # published before the drift (positive: the retrained version forgot some of what it knew).
    before = steps[sc.drift_step - 1]["loss_pre_drift"] if 0 < sc.drift_step <= len(steps) else None
    forgetting = (
        None
        if recovered is None or before is None or recovered["loss_pre_drift"] is None
        else round(recovered["loss_pre_drift"] - before, 6)
    )

    return {
        "scenario": "drift",
        "name": cfg.name,
        "steps": sc.steps,
        "drift_step": sc.drift_step,
        "drifted_sites": drifted,
        "arrivals_per_step": sc.arrivals_per_step,
        "step_s": sc.step_s,
        "cycles": sum(1 for s in steps if s["cycle_started"]),
        "versions_published": [s["published_in_step"] for s in steps if s["published_in_step"] is not None],
        "drift_cycle_step": drift_cycle,
        "recovered_step": None if recovered is None else recovered["step"],
        "steps_to_recovery": None if recovered is None else recovered["step"] - sc.drift_step,
        # From the start of the drift step (its records arriving) to the end of the poll whose cycle installed it.
        "wall_s_drift_to_installed": None
        if recovered is None
        else round(recovered["wall_s"] - steps[sc.drift_step]["started_s"], 3),
        "mean_loss_after_recovery": {
            "published": mean("loss_published"),
            "never_retrained": mean("loss_never_retrained"),
        },
        "forgetting": forgetting,
        "wall_time_s": round(wall_s, 3),
        "timeline": steps,
    }


def _log_step(record: dict[str, Any]) -> None:
    alerts = ", ".join(a["trigger"] for a in record["alerts"]) or "none"
    log.info(
        "step %d%s: %d new records, alerts: %s%s; published version %s, fresh-data loss %s (never retrained: %s)",
        record["step"],
        " (drifted)" if record["drifted"] else "",
        record["records_arrived"],
        alerts,
        f", cycle -> {record['gate']}" if record["cycle_started"] else "",
        record["published_version"],
        _num(record["loss_published"]),
        _num(record["loss_never_retrained"]),
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_scenario(result: dict[str, Any]) -> str:
    """The end-of-run report of a drift scenario."""
    lines = [
        f"drift scenario: {result['steps']} steps, drift at step {result['drift_step']} "
        f"({result['drifted_sites']} sites), {result['cycles']} cycles, versions published "
        f"{result['versions_published'] or 'none'}"
    ]
    lines.append(
        f"  {'step':>4}  {'arrived':>7}  {'alerts':<28}  {'cycle':<8}  {'version':>7}  "
        f"{'loss (published)':>16}  {'loss (never retrained)':>22}"
    )
    for s in result["timeline"]:
        alerts = ",".join(a["trigger"] for a in s["alerts"]) or "-"
        lines.append(
            f"  {s['step']:>4}{'*' if s['drifted'] else ' '} {s['records_arrived']:>7}  {alerts:<28}  "
            f"{(s['gate'] or '-'):<8}  {str(s['published_version']):>7}  "
            f"{_num(s['loss_published']):>16}  {_num(s['loss_never_retrained']):>22}"
        )
    for s in result["timeline"]:
        rollout = s.get("rollout")
        if rollout:
            figures = "; ".join(
                f"{site} {c['verdict']}"
                + (
                    f", change {c['change']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] nats"
                    if "change" in c
                    else ""
                )
                for site, c in rollout["canaries"].items()
            )
            staged = f"version {rollout['version']} staged at canaries: {rollout['decision']}"
            lines.append(f"  step {s['step']}: {staged} ({figures})")
    after = result["mean_loss_after_recovery"]
    if result["recovered_step"] is None:
        lines.append("  no version was published after the drift")
    else:
        lines.append(
            f"  drift at step {result['drift_step']} -> new version installed at step "
            f"{result['recovered_step']} ({result['steps_to_recovery']} steps, "
            f"{result['wall_s_drift_to_installed']:.1f} s wall time)"
        )
        lines.append(
            f"  fresh-data loss from then on: {_num(after['published'])} with retraining, "
            f"{_num(after['never_retrained'])} without"
        )
        if result.get("forgetting") is not None:
            lines.append(
                f"  forgetting: loss on pre-drift records {result['forgetting']:+.4f} nats after the drift's "
                "cycle (train.replay mixes the previous window back in)"
            )
    lines.append("  (* drifted step)")
    return "\n".join(lines)


def plot_drift(result: dict[str, Any], path: Path) -> Path:
    """drift.png: the published model's loss on each step's fresh data, with and without retraining."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from server.cycle.report import save_figure

    timeline = result["timeline"]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for key, style, label in (
        ("loss_published", "o-", "with retraining (published version)"),
        ("loss_never_retrained", "s--", "without retraining (version 1 forever)"),
    ):
        pts = [(s["step"], s[key]) for s in timeline if s[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.axvline(result["drift_step"] - 0.5, color="grey", linestyle=":", label="drift")
    for s in timeline:
        if s["published_in_step"] is not None:
            ax.annotate(
                f"v{s['published_in_step']}",
                (s["step"], s["loss_published"] or 0),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
            )
    ax.set(title="Loss on each step's fresh data", xlabel="time step", ylabel="mean token cross-entropy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)

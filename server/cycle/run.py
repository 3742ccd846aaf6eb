"""One retraining cycle at the coordinator: rounds of FedAvg over LoRA adapters, evaluation
of the candidate against the baseline, the publish gate, and the run directory.

The baseline is the model sites use now: the registry's champion version, or the bare
base model until something is published. A cycle starts training from it. The
candidate is the aggregated adapter after each round; after the last round the gate
decides whether it becomes a new signed version, delivered to every site.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from torch.utils.data import TensorDataset

from fedretrain.arrays import from_array_record, to_array_record
from fedretrain.atomic import file_lock
from fedretrain.config import Config, Job
from fedretrain.data.encoding import encode_texts
from fedretrain.data.notes import read_records
from fedretrain.errors import ConfigError, CycleBusy, QuorumLost
from fedretrain.modeling.loading import resolve_model_path
from fedretrain.modeling.lora_model import LoraModel, adapter_arrays, load_adapter_arrays, load_lora_model
from fedretrain.registry.base_model import base_model_identity
from fedretrain.registry.student import StudentBundle
from fedretrain.training.evaluate import LossStats, evaluate_loss
from server.cycle.checkpoint import Checkpoint
from server.cycle.distill import distill_version
from server.cycle.gate import PENDING, PUBLISH, GateResult, decide
from server.cycle.publish import (
    Champion,
    RegistryHandle,
    RunFigures,
    champion_adapter,
    deliver,
    open_registry,
    publish_candidate,
    send_student,
    student_for,
)
from server.cycle.report import RunRecorder, finite_or_null, format_summary
from server.cycle.resume import CheckpointWriter, check_registry_pointer, resume_point
from server.cycle.robustness import compare as robustness_compare
from server.cycle.robustness import planted_and_unplanted
from server.cycle.rollout import HOLD, PROMOTE, run_rollout
from server.cycle.rounds import RoundPolicy, run_rounds
from server.cycle.summary import SiteOutcome, build_summary, round_entry, site_outcomes
from server.sites.grid import SiteSubset, bound_site
from server.tracking.live import LiveExport
from strategies import CheckedStrategy, build_strategy
from strategies.central_dp import central_dp_wrapper, central_epsilon, effective_noise_multiplier

log = logging.getLogger("fedretrain.server")


@dataclass
class _Progress:
    started: float
    last: float


def run_retraining(
    grid: Grid,
    cfg: Config,
    run_dir: Path,
    *,
    config_yaml: str,
    validation_path: str | None = None,
    run_id: str | None = None,
    train_nodes: Collection[int] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run one cycle on ``grid``: ``cfg.rounds`` rounds, the gate, and publication when it passes.

    ``train_nodes`` limits training and evaluation to those nodes (the watcher leaves out
    sites that cannot pay for another cycle); a published version still goes to every site.
    After every round a checkpoint is written below ``run_dir``; ``resume=True`` goes on
    from the last complete one (same run id, rounds, strategy and random state). A round
    that loses its quorum ends the cycle with nothing published. Only one cycle runs on a
    registry at a time. Returns the run's summary (also written to ``summary.json``).
    """
    registry = open_registry(cfg)
    with file_lock(cycle_lock_path(registry.registry.root), wait=False) as locked:
        if not locked:
            raise CycleBusy(f"{registry.registry.root}: another retraining cycle is running on this registry")
        cycle = _start(cfg, Path(run_dir), registry, config_yaml, validation_path, run_id, resume)
        crashed = True
        try:
            summary = _run_cycle(grid, cycle, train_nodes)
            crashed = False
            return summary
        finally:
            if cycle.export is not None:  # the trackers get the end too; the cycle never waits long for them
                cycle.export.close(crashed=crashed)


def cycle_lock_path(registry_root: Path) -> Path:
    """The lock a cycle holds on its registry (``<root>/watch/cycle.lock``)."""
    return Path(registry_root) / "watch" / "cycle"


@dataclass
class Cycle:
    """What every step of one cycle reads, set up once by :func:`_start`.

    ``lm`` holds the champion's adapter (or a fresh one) after the start, then each
    round's candidate as it is scored; ``champion`` is None until something is published.
    ``export`` copies the run directory to MLflow and TensorBoard as it is written (None: off).
    """

    cfg: Config
    run_dir: Path
    registry: RegistryHandle
    run_id: str
    job: Job
    lm: LoraModel
    validation: TensorDataset
    recorder: RunRecorder
    champion: Champion | None
    checkpoint: Checkpoint | None
    started: float
    export: LiveExport | None = None
    validation_texts: tuple[str, ...] = ()  # the validation records' texts (the robustness suite perturbs them)

    @property
    def champion_version(self) -> int | None:
        return self.champion.version if self.champion is not None else None


def _run_cycle(grid: Grid, cycle: Cycle, train_nodes: Collection[int] | None) -> dict[str, Any]:
    """The steps of a cycle, in order: score the baseline, catch sites up to it, train, gate, publish."""
    baseline = _score_baseline(cycle)
    sync = _catch_up(grid, cycle)
    strategy = _build_strategy(grid, cycle)
    writer = CheckpointWriter(
        cycle.run_dir, strategy, cycle.job, cycle.cfg.rounds, cycle.registry.registry.root, cycle.champion_version
    )
    train_grid = grid if train_nodes is None else SiteSubset(grid, train_nodes)
    try:
        candidate = _train(train_grid, cycle, strategy, baseline, writer)
    except QuorumLost as err:
        return _aborted(cycle, strategy, baseline, err, sync)

    # evaluate_fn ran last on the final global adapter, so lm holds it now.
    adapter_dir = cycle.run_dir / "candidate_adapter"
    cycle.lm.model.save_pretrained(str(adapter_dir))
    sites = site_outcomes(cycle.recorder.rounds)
    summary = _summary(cycle, strategy, baseline, candidate, sites, sync)
    summary["resumed_after_round"] = cycle.checkpoint.server_round if cycle.checkpoint is not None else None
    result = _gate(cycle, strategy, baseline, candidate)
    summary.update(_publish(grid, cycle, result, adapter_dir, sites, summary["central_dp"], _site_nodes(strategy)))
    summary["wall_time_s"] = round(time.perf_counter() - cycle.started, 3)
    cycle.recorder.write_summary(summary)
    cycle.recorder.plot()
    print(format_summary(summary), flush=True)
    return summary


def _start(
    cfg: Config,
    run_dir: Path,
    registry: RegistryHandle,
    config_yaml: str,
    validation_path: str | None,
    run_id: str | None,
    resume: bool,
) -> Cycle:
    """The cycle's run id (a resumed one keeps its own), model, validation set and champion."""
    started = time.perf_counter()
    checkpoint = resume_point(run_dir) if resume else None
    run_id = checkpoint.state["run_id"] if checkpoint else (run_id or uuid.uuid4().hex[:12])
    validation_path = validation_path or cfg.validation_path
    if not validation_path:
        raise ConfigError("validation_path: the coordinator needs a validation set to compare candidate and baseline")
    # Each write of metrics.jsonl and summary.json is exported (tracking.*) once the cycle is set up.
    recorder = RunRecorder(run_dir, config_yaml, keep_rounds=checkpoint.server_round if checkpoint else None)
    export = LiveExport.from_config(cfg.tracking, run_dir, registry.signing_key.public_key(), run_id)
    lm = load_lora_model(cfg.model, cfg.lora, seed=cfg.seed, device=cfg.model.device)
    validation_texts = tuple(r.text for r in read_records(validation_path))
    validation = encode_texts(lm.tokenizer, list(validation_texts), cfg.model.max_length)
    # The baseline is the version sites use now; a cycle also starts training from it.
    champion = champion_adapter(registry)
    if checkpoint is not None:
        check_registry_pointer(checkpoint, registry.registry.root, champion.version if champion else None)
    if champion is not None:
        load_adapter_arrays(lm, champion.arrays)
    if export is not None:
        recorder.on_write = export.notify
    return Cycle(
        cfg=cfg,
        run_dir=run_dir,
        registry=registry,
        run_id=run_id,
        job=Job.from_config(cfg, run_id),
        lm=lm,
        validation=validation,
        recorder=recorder,
        champion=champion,
        checkpoint=checkpoint,
        started=started,
        export=export,
        validation_texts=validation_texts,
    )


def _score_baseline(cycle: Cycle) -> LossStats:
    """The validation loss of the version sites use now (the bare base model before any)."""
    baseline = evaluate_loss(
        cycle.lm.model,
        cycle.validation,
        batch_size=cycle.cfg.train.eval_batch_size,
        use_adapter=cycle.champion is not None,
    )
    log.info(
        "run %s: baseline %s, validation loss %.4f (perplexity %.2f) on %d records",
        cycle.run_id,
        f"version {cycle.champion.version}" if cycle.champion else "the base model",
        baseline.loss,
        baseline.perplexity,
        baseline.examples,
    )
    return baseline


def _catch_up(grid: Grid, cycle: Cycle) -> dict[str, Any] | None:
    """Sites that missed the champion (new, offline, or before a rollback or approval) get it first.

    It waits for the sites no longer than a round would: a site that is away is caught up later.
    """
    if cycle.champion is None:
        return None
    cfg = cycle.cfg
    return deliver(
        grid,
        cycle.champion.bundle,
        cycle.champion.rollback,
        cycle.job,
        min(cfg.registry.publish_timeout_s, cfg.strategy.round_timeout_s),
        min_nodes=cfg.strategy.min_sites,
        student=student_for(cycle.registry, cycle.champion.version),
    )


def _build_strategy(grid: Grid, cycle: Cycle) -> CheckedStrategy:
    cfg, champion = cycle.cfg, cycle.champion
    return build_strategy(
        cfg.strategy.name,
        options=dict(cfg.strategy.options),
        # A round aggregates at least a quorum of replies: noise for that many is enough.
        wrap=central_dp_wrapper(cfg.strategy.central_dp, cfg.strategy.quorum),
        frozen=[key for key in cycle.lm.spec.keys if "lora_A" in key] if cfg.lora.freeze_a else (),
        spec=cycle.lm.spec,
        max_abs_value=cfg.strategy.max_abs_value,
        max_update_norm_ratio=cfg.strategy.max_update_norm_ratio,
        site_of=functools.partial(bound_site, grid),
        baseline=to_array_record(champion.arrays) if champion is not None else None,
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        # Rounds sample from the sites connected at their start (server/cycle/rounds.py waits
        # for them up to the deadline), so sampling itself never waits: quorum suffices.
        min_train_nodes=cfg.strategy.quorum,
        min_evaluate_nodes=cfg.strategy.quorum,
        min_available_nodes=cfg.strategy.quorum,
    )


def _base_sha256(cfg: Config) -> str:
    """The identity of the coordinator's base model (what every version is bound to)."""
    model_dir = resolve_model_path(cfg.model.name_or_path)
    return base_model_identity(cfg.model.name_or_path, model_dir, cfg.model.init_missing_seed)["sha256"]


def _train(
    grid: Grid, cycle: Cycle, strategy: CheckedStrategy, baseline: LossStats, writer: CheckpointWriter
) -> LossStats:
    """The round loop (server/cycle/rounds.py); after each round the candidate is scored on the
    validation set and a checkpoint is written. A resumed cycle starts after its checkpoint."""
    cfg, lm, checkpoint = cycle.cfg, cycle.lm, cycle.checkpoint
    progress = _Progress(started=cycle.started, last=cycle.started)
    final: dict[str, LossStats] = {}

    def score(arrays: ArrayRecord) -> LossStats:
        load_adapter_arrays(lm, from_array_record(arrays))
        return evaluate_loss(lm.model, cycle.validation, batch_size=cfg.train.eval_batch_size, use_adapter=True)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        # Round 0's adapter is the baseline's: the champion's, or a fresh LoRA adapter whose
        # B matrices are zero (peft's default init), which adds exactly nothing to the base
        # model. Scoring it again cost a whole pass over the validation set per cycle.
        candidate = baseline if server_round == 0 else score(arrays)
        final["candidate"] = candidate
        now = time.perf_counter()
        entry = round_entry(
            server_round,
            candidate,
            baseline,
            strategy.round_log.get(server_round),
            round_s=now - progress.last,
            elapsed_s=now - cycle.started,
        )
        progress.last = now
        cycle.recorder.record_round(entry)
        _log_progress(entry, cfg.rounds)
        return MetricRecord({"candidate-loss": candidate.loss, "baseline-loss": baseline.loss})

    arrays = to_array_record(adapter_arrays(lm.model))
    if checkpoint is not None:
        arrays = writer.restore(checkpoint)
        if checkpoint.server_round >= cfg.rounds:
            # Every round ran before the crash: the checkpoint's adapter is the candidate
            # (otherwise the next round's evaluate_fn scores the candidate anyway).
            final["candidate"] = score(arrays)
    flat = ConfigRecord(writer.job.to_flat())
    policy = RoundPolicy(
        deadline_s=cfg.strategy.round_timeout_s, quorum=cfg.strategy.quorum, wait_for=cfg.strategy.min_sites
    )
    run_rounds(
        grid,
        strategy,
        arrays,
        first_round=checkpoint.server_round + 1 if checkpoint else 1,
        num_rounds=cfg.rounds,
        policy=policy,
        train_config=flat,
        evaluate_config=flat,
        evaluate_fn=evaluate_fn,
        on_round_end=writer.write,
        ready_config=flat,  # no site trains unless a quorum can: data, budget and base model checked first
        base_sha256=_base_sha256(cfg),
        secure=cfg.strategy.secure_aggregation if cfg.strategy.secure_aggregation.enabled else None,
    )
    return final["candidate"]


def _aborted(
    cycle: Cycle, strategy: CheckedStrategy, baseline: LossStats, err: QuorumLost, sync: dict[str, Any] | None
) -> dict[str, Any]:
    """The summary of a cycle whose round lost its quorum: no gate, nothing published."""
    log.warning("cycle %s aborted, nothing published: %s", cycle.run_id, err)
    rounds = cycle.recorder.rounds
    last = rounds[-1]["validation"]["candidate_loss"] if rounds else baseline.loss
    candidate = LossStats(loss=last, tokens=0, examples=0, example_losses=())
    summary = _summary(cycle, strategy, baseline, candidate, site_outcomes(rounds), sync)
    summary.update(
        {
            "aborted": str(err),
            "gate": None,
            "published_version": None,
            "pending_version": None,
            "publication": None,
        }
    )
    cycle.recorder.write_summary(summary)
    return summary


def _summary(
    cycle: Cycle,
    strategy: CheckedStrategy,
    baseline: LossStats,
    candidate: LossStats,
    sites: dict[str, SiteOutcome],
    sync: dict[str, Any] | None,
) -> dict[str, Any]:
    """summary.json's figures so far, and the version the cycle started from."""
    summary = build_summary(
        cycle.cfg,
        cycle.run_id,
        cycle.run_dir,
        cycle.recorder.rounds,
        strategy.round_log,
        baseline,
        candidate,
        cycle.lm,
        sites,
        wall_time_s=round(time.perf_counter() - cycle.started, 3),
    )
    summary["baseline_version"] = cycle.champion_version
    summary["sync"] = sync
    summary["central_dp"] = _central_dp(cycle.cfg)
    return summary


def _central_dp(cfg: Config) -> dict[str, Any] | None:
    """The coordinator's own DP for this cycle (strategies/central_dp.py), None when off."""
    dp, quorum = cfg.strategy.central_dp, cfg.strategy.quorum
    epsilon = central_epsilon(dp, cfg.rounds, quorum)
    if epsilon is None:
        return None
    return {
        "epsilon": epsilon,  # this cycle's; across cycles the releases compose further
        "delta": dp.delta,
        "clipping": dp.clipping,
        "noise_multiplier": dp.noise_multiplier,
        "noise_multiplier_effective": effective_noise_multiplier(dp, quorum),
        "clipping_norm": dp.clipping_norm,
        "quorum": quorum,
        "rounds": cfg.rounds,
    }


def _gate(cycle: Cycle, strategy: CheckedStrategy, baseline: LossStats, candidate: LossStats) -> GateResult:
    """The gate's decision on the final candidate: the validation set and the sites' evaluations
    of the last round, as the strategy accepted them."""
    last = strategy.round_log.get(cycle.cfg.rounds)
    sites = sorted(last.evaluation.values(), key=lambda e: e.site_id) if last else []
    robustness = _robustness(cycle)
    return decide(cycle.cfg.gate, baseline, candidate, sites, seed=cycle.cfg.seed, robustness=robustness)


def _robustness(cycle: Cycle) -> dict[str, Any] | None:
    """The robustness suite (server/cycle/robustness.py): the champion (the bare base model before
    any) and the candidate, which ``lm`` holds, on perturbed validation records and the
    simulation's canaries. ``lm`` holds the candidate again afterwards."""
    cfg, lm = cycle.cfg, cycle.lm
    policy = cfg.gate.robustness
    if not policy.enabled:
        return None
    texts = cycle.validation_texts
    step = max(1, len(texts) // policy.records)
    records = texts[::step][: policy.records]
    candidate_arrays = adapter_arrays(lm.model)

    def scorer(arrays: dict[str, np.ndarray] | None) -> Callable[[Sequence[str]], float]:
        def score(batch: Sequence[str]) -> float:
            if arrays is not None:
                load_adapter_arrays(lm, arrays)
            encoded = encode_texts(lm.tokenizer, list(batch), cfg.model.max_length)
            return evaluate_loss(
                lm.model, encoded, batch_size=cfg.train.eval_batch_size, use_adapter=arrays is not None
            ).loss

        return score

    planted, unplanted = planted_and_unplanted(cfg.seed, cfg.simulation.canaries)
    started = time.perf_counter()
    try:
        figures = robustness_compare(
            scorer(cycle.champion.arrays if cycle.champion is not None else None),
            scorer(candidate_arrays),
            records,
            seed=cfg.seed,
            tolerance=policy.tolerance,
            planted=planted,
            unplanted=unplanted,
        )
    finally:
        load_adapter_arrays(lm, candidate_arrays)
    figures["seconds"] = round(time.perf_counter() - started, 3)
    worst = max(figures["perturbations"].items(), key=lambda kv: kv[1]["change"])
    log.info(
        "run %s: robustness on %d records: worst %s %+.4f nats%s (%.1f s)",
        cycle.run_id,
        len(records),
        worst[0],
        worst[1]["change"],
        f", canary exposure {figures['memorisation']['change']:+.4f}" if "memorisation" in figures else "",
        figures["seconds"],
    )
    return figures


def _site_nodes(strategy: CheckedStrategy) -> dict[str, int]:
    """Site id -> node of the sites whose replies the last round accepted (the canaries' pool)."""
    if not strategy.round_log:
        return {}
    last = strategy.round_log[max(strategy.round_log)]
    nodes = {site: int(metrics["node-id"]) for site, metrics in last.accepted.items() if "node-id" in metrics}
    nodes.update({site: e.node_id for site, e in last.evaluation.items() if e.node_id})
    return nodes


def _publish(
    grid: Grid,
    cycle: Cycle,
    result: GateResult,
    adapter_dir: Path,
    sites: dict[str, SiteOutcome],
    central_dp: dict[str, Any] | None,
    site_nodes: dict[str, int],
) -> dict[str, Any]:
    """Record the decision; when it passed, publish the candidate (with the cycle's ``central_dp``
    figures, as the summary has them) and deliver it to every site, or with ``publish.canary``
    first to the canaries (server/cycle/rollout.py), then to every site or back."""
    cfg, registry = cycle.cfg, cycle.registry.registry
    # Before any version is champion no site serves one: there is no live traffic to stage it on.
    staged = cfg.publish.staged and result.decision == PUBLISH and cycle.champion is not None
    if cfg.publish.staged and result.decision == PUBLISH and not staged:
        log.info("staged rollout: no version is champion yet, so none serves traffic at the canaries; to every site")
    version, student = None, None
    if result.passed:
        run = RunFigures(
            run_id=cycle.run_id,
            name=cfg.name,
            rounds=cfg.rounds,
            seed=cfg.seed,
            baseline_version=cycle.champion_version,
            central_dp=central_dp,
        )
        version = publish_candidate(
            cycle.registry, cfg, adapter_dir, result, run, sites, cycle.lm.target_modules, pending=staged
        )
    registry.record_decision(
        finite_or_null(
            {
                "run_id": cycle.run_id,
                "name": cfg.name,
                "version": version,
                "baseline_version": cycle.champion_version,
                **result.to_dict(),
            }
        )
    )
    log.info("gate: %s%s. %s", result.decision, f" (version {version})" if version else "", " ".join(result.reasons))
    published = version if result.decision == PUBLISH else None
    delivery, rollout = None, None
    if published is not None and staged:
        rollout = run_rollout(
            grid,
            cycle.registry,
            cfg.publish,
            cycle.job,
            published,
            site_nodes,
            seed=cfg.seed,
            publish_timeout_s=cfg.registry.publish_timeout_s,
            approver=f"staged rollout of run {cycle.run_id}",
        )
        delivery = rollout.get("publication")
        if rollout["decision"] != PROMOTE:
            published = None
    elif published is not None:
        # No student yet: it is distilled below, once the version is out.
        delivery = deliver(grid, registry.bundle(published), None, cycle.job, cfg.registry.publish_timeout_s)
    if version is not None and cfg.distill.enabled:
        # After the version is recorded and delivered: distillation never holds up or breaks a publication.
        student, stored = _distil(cycle, version)
        if delivery and delivery.get("students", {}).get("waiting") and stored is not None:
            delivery["students"] = send_student(
                grid,
                version,
                stored,
                {site: int(delivery["installed"][site]["node_id"]) for site in delivery["students"]["waiting"]},
                cycle.job,
                cfg.registry.publish_timeout_s,
            )
    pending = version if result.decision == PENDING or (rollout is not None and rollout["decision"] == HOLD) else None
    return {
        "gate": result.to_dict(),
        "published_version": published,
        "pending_version": pending,
        "registry": str(registry.root),
        "publication": delivery,
        "rollout": rollout,
        "student": student,
    }


def _distil(cycle: Cycle, version: int) -> tuple[dict[str, Any], StudentBundle | None]:
    """The figures of ``version``'s student (server/cycle/distill.py) and the student as stored, or
    why there is none."""
    try:
        return distill_version(cycle.registry, cycle.cfg, cycle.lm, version, cycle.validation_texts)
    except Exception as err:  # noqa: BLE001 - the version is out already; whatever failed, say so and go on
        log.error("version %d: distillation failed, no student: %s: %s", version, type(err).__name__, err)
        reason = f"distillation failed: {type(err).__name__}: {err}"
        return {"version": version, "decision": "refused", "reasons": [reason]}, None


def _log_progress(entry: dict[str, Any], rounds: int) -> None:
    val = entry["validation"]
    if entry["round"] == 0:
        log.info("round 0/%d: starting point, validation loss %.4f", rounds, val["candidate_loss"])
        return
    eps = [s["epsilon"] for s in entry["sites"].values() if s.get("epsilon") is not None]
    log.info(
        "round %d/%d: %d/%d sites accepted, validation loss %.4f (baseline %.4f), "
        "max epsilon %s, %d B down / %d B up, %.1f s",
        entry["round"],
        rounds,
        entry["sites_accepted"],
        entry["sites_sampled"],
        val["candidate_loss"],
        val["baseline_loss"],
        f"{max(eps):.3f}" if eps else "-",
        entry["bytes_down"],
        entry["bytes_up"],
        entry["round_s"],
    )

"""One retraining cycle at the coordinator: rounds of FedAvg over LoRA adapters, evaluation
of the candidate against the baseline, and the run directory.

The baseline is the model sites use now: the bare base model until something is
published. The candidate is the aggregated adapter after each round.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from fedretrain.config import Config, Job
from fedretrain.data.encoding import encode_texts
from fedretrain.data.schema import read_records
from fedretrain.errors import ConfigError
from fedretrain.modeling.lora_model import adapter_arrays, load_adapter_arrays, load_lora_model
from fedretrain.records import from_array_record, to_array_record
from fedretrain.training.evaluate import LossStats, evaluate_loss
from server.report import RunRecorder, format_summary
from server.summary import build_summary, round_entry
from strategies import build_strategy

log = logging.getLogger("fedretrain.server")


@dataclass
class _Progress:
    started: float
    last: float


def run_retraining(grid: Grid, cfg: Config, run_dir: Path, *, config_yaml: str,
                   validation_path: str | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds on ``grid``; write and return the run's summary."""
    started = time.perf_counter()
    run_id = run_id or uuid.uuid4().hex[:12]
    validation_path = validation_path or cfg.validation_path
    if not validation_path:
        raise ConfigError("validation_path: the coordinator needs a validation set to compare candidate and baseline")
    recorder = RunRecorder(run_dir, config_yaml)
    lm = load_lora_model(cfg.model, cfg.lora, seed=cfg.seed, device=cfg.model.device)
    validation = encode_texts(lm.tokenizer, [r.text for r in read_records(validation_path)], cfg.model.max_length)
    baseline = evaluate_loss(lm.model, validation, batch_size=cfg.train.eval_batch_size, use_adapter=False)
    log.info("run %s: baseline validation loss %.4f (perplexity %.2f) on %d records",
             run_id, baseline.loss, baseline.perplexity, baseline.examples)

    strategy = build_strategy(
        cfg.strategy.name, spec=lm.spec, max_examples_per_site=cfg.strategy.max_examples_per_site,
        max_abs_value=cfg.strategy.max_abs_value,
        fraction_train=cfg.strategy.fraction_train, fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_train_nodes=cfg.strategy.min_sites, min_evaluate_nodes=cfg.strategy.min_sites,
        min_available_nodes=cfg.strategy.min_sites,
    )
    progress = _Progress(started=started, last=started)
    final: dict[str, LossStats] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_adapter_arrays(lm, from_array_record(arrays))
        candidate = evaluate_loss(lm.model, validation, batch_size=cfg.train.eval_batch_size, use_adapter=True)
        final["candidate"] = candidate
        now = time.perf_counter()
        entry = round_entry(server_round, candidate, baseline, strategy.round_log.get(server_round),
                            round_s=now - progress.last, elapsed_s=now - started)
        progress.last = now
        recorder.record_round(entry)
        _log_progress(entry, cfg.rounds)
        return MetricRecord({"candidate-loss": candidate.loss, "baseline-loss": baseline.loss})

    job = ConfigRecord(Job.from_config(cfg, run_id).to_flat())
    strategy.start(grid=grid, initial_arrays=to_array_record(adapter_arrays(lm.model)), num_rounds=cfg.rounds,
                   train_config=job, evaluate_config=job, evaluate_fn=evaluate_fn)

    # evaluate_fn ran last on the final global adapter, so lm holds it now.
    lm.model.save_pretrained(str(Path(run_dir) / "candidate_adapter"))
    summary = build_summary(cfg, run_id, Path(run_dir), recorder.rounds, strategy.round_log, baseline,
                            final["candidate"], lm, wall_time_s=time.perf_counter() - started)
    recorder.write_summary(summary)
    recorder.plot()
    print(format_summary(summary), flush=True)
    return summary


def _log_progress(entry: dict[str, Any], rounds: int) -> None:
    val = entry["validation"]
    if entry["round"] == 0:
        log.info("round 0/%d: starting point, validation loss %.4f", rounds, val["candidate_loss"])
        return
    eps = [s["epsilon"] for s in entry["sites"].values() if s.get("epsilon") is not None]
    log.info(
        "round %d/%d: %d/%d sites accepted, train loss %s, validation loss %.4f (baseline %.4f), "
        "max epsilon %s, %d B down / %d B up, %.1f s",
        entry["round"], rounds, entry["sites_accepted"], entry["sites_sampled"],
        "-" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}",
        val["candidate_loss"], val["baseline_loss"], f"{max(eps):.3f}" if eps else "-",
        entry["bytes_down"], entry["bytes_up"], entry["round_s"],
    )


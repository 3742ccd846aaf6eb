"""What a site does in a round, as plain Python: no Flower types in or out.

``train_round`` validates the site's newest data, checks its lifetime privacy budget,
fine-tunes the LoRA adapter with DP-SGD and records the spend in the site's ledger.
``evaluate_round`` scores the candidate adapter and the baseline on held-out data.
Only adapter tensors and a few scalars leave this module.
"""

from __future__ import annotations

import functools
import logging
import zlib
from dataclasses import dataclass

import numpy as np

from client.ingest import recover_store
from client.reference import save_reference
from client.replies import ReplyKey, load_reply, save_reply
from fedretrain.config import Job, SiteConfig
from fedretrain.data.encoding import encode_texts
from fedretrain.data.schema import optional_texts, read_records
from fedretrain.errors import PrivacyBudgetExceeded
from fedretrain.modeling.lora_model import LoraModel, adapter_arrays, load_adapter_arrays, load_lora_model
from fedretrain.privacy.accounting import noise_multiplier_for_target
from fedretrain.privacy.ledger import PrivacyLedger, ledger_lock
from fedretrain.records import NOT_PRIVATE_EPSILON
from fedretrain.training.dp import DPParams, TrainParams, poisson_sample_rate, train_lora
from fedretrain.training.evaluate import evaluate_loss

log = logging.getLogger("fedretrain.client")


@dataclass(frozen=True)
class TrainOutcome:
    adapter: dict[str, np.ndarray]
    metrics: dict[str, float | int]


@dataclass(frozen=True)
class EvaluateOutcome:
    metrics: dict[str, float | int]


def train_round(site: SiteConfig, job: Job, global_adapter: dict[str, np.ndarray], server_round: int,
                global_hash: str | None = None) -> TrainOutcome:
    """One round of local DP training. Raises a ``FedretrainError`` instead of sending anything bad.

    ``global_hash`` names the global adapter (the coordinator's digest). A request for
    the same run, round and adapter as the last one trained (a resumed coordinator
    asking again) gets the same update back without training or spending again.
    """
    key = ReplyKey(job.run_id, server_round, global_hash) if global_hash else None
    # 1. Data first: a bad file must stop the round before any compute or spend. An ingest
    # interrupted by a crash is completed (or undone) before the store is read.
    recover_store(site)
    texts = [r.text for r in read_records(site.train_path)]
    heldout = len(optional_texts(site.heldout_path))  # counted now: records ingested during training are new
    # The store is append-only, so the newest records are the last ones.
    start = 0 if job.train.window is None else max(0, len(texts) - job.train.window)
    window = (start, len(texts))
    texts = texts[start:]
    if not job.privacy.enabled and not site.allow_non_private:
        # Without DP a round has no finite epsilon: only the site itself may allow that.
        raise PrivacyBudgetExceeded(
            f"site {site.site_id!r} refuses non-private training (job privacy.enabled=false has no "
            "finite epsilon); a site opts in with allow-non-private=true in its own node_config")
    # One round at a time per site: budget check, training, record and save run under one
    # lock, so two rounds at once (two runs on one site) cannot both pass the check or lose
    # each other's ledger entry.
    with ledger_lock(site.ledger_path):
        # Checked under the lock: a request repeated while the first is still training
        # waits for it, then finds its reply instead of training (and spending) again.
        kept = load_reply(site.state_path, key) if key is not None else None
        if kept is not None:
            log.info("site %s round %d of run %s: already trained; sending the same update again (no new spend)",
                     site.site_id, server_round, job.run_id)
            return TrainOutcome(adapter=kept[0], metrics=kept[1])
        outcome = _train_and_record(site, job, global_adapter, server_round, texts)
        if key is not None:  # after the ledger recorded the spend (client/replies.py)
            save_reply(site.state_path, key, outcome.adapter, outcome.metrics)
    # What this cycle trained on is the reference its drift is measured against (client/monitor.py).
    save_reference(site, job.run_id, *window, heldout)
    return outcome


def _train_and_record(site: SiteConfig, job: Job, global_adapter: dict[str, np.ndarray], server_round: int,
                      texts: list[str]) -> TrainOutcome:
    ledger = PrivacyLedger.load(site.ledger_path, site_id=site.site_id, accountant=site.accountant, delta=site.delta)
    lm = site_model(job, site.device)
    load_adapter_arrays(lm, global_adapter)
    dataset = encode_texts(lm.tokenizer, texts, job.model.max_length)

    # 2. Privacy: derive sigma for the planned run, then refuse if this round would cross the ceiling.
    # Opacus samples at 1/ceil(N/B), not B/N: budget check, sigma and ledger use that rate.
    sample_rate = poisson_sample_rate(len(texts), job.train.batch_size)
    sigma = noise_multiplier(job, site, sample_rate)
    if job.privacy.enabled:
        projected = ledger.check_can_spend(sigma, sample_rate, job.train.local_steps, site.epsilon_ceiling)
        log.info("site %s round %d: sigma=%.3f, epsilon %.3f -> %.3f of %.3f",
                 site.site_id, server_round, sigma, ledger.epsilon(), projected, site.epsilon_ceiling)

    # 3. Train, then record the spend before anything is sent.
    params = TrainParams(local_steps=job.train.local_steps, batch_size=job.train.batch_size,
                         lr=job.train.lr, optimizer=job.train.optimizer)
    dp = DPParams(enabled=job.privacy.enabled, noise_multiplier=sigma, max_grad_norm=job.privacy.max_grad_norm,
                  grad_sample_mode=job.privacy.grad_sample_mode)
    result = train_lora(lm.model, dataset, params, dp, seed=_round_seed(job.seed, site.site_id, server_round))
    if job.privacy.enabled:
        ledger.record(job.run_id, server_round, sigma, result.sample_rate, result.steps)
        ledger.save(site.ledger_path)
    epsilon = ledger.epsilon() if job.privacy.enabled else NOT_PRIVATE_EPSILON
    metrics: dict[str, float | int] = {
        # FedAvg weights each site by its training set size; what this round actually
        # processed (Poisson batches over several passes) is reported beside it.
        "num-examples": len(texts),
        "data-size": len(texts),
        "examples-processed": int(result.num_examples),
        "train-loss": float(result.mean_loss),
        "epsilon": float(epsilon),
        "epsilon-ceiling": float(site.epsilon_ceiling),
        "delta": float(site.delta),
        "noise-multiplier": float(sigma),
        "steps": int(result.steps),
    }
    return TrainOutcome(adapter=adapter_arrays(lm.model), metrics=metrics)


def evaluate_round(site: SiteConfig, job: Job, candidate: dict[str, np.ndarray],
                   baseline: dict[str, np.ndarray] | None = None) -> EvaluateOutcome:
    """Score the candidate adapter and the baseline on the same held-out records.

    The baseline is the adapter published now, or the bare base model when ``baseline``
    is None (nothing published yet).
    """
    texts = [r.text for r in read_records(site.heldout_path)]
    lm = site_model(job, site.device)
    dataset = encode_texts(lm.tokenizer, texts, job.model.max_length)
    if baseline is None:
        base = evaluate_loss(lm.model, dataset, batch_size=job.train.eval_batch_size, use_adapter=False)
    else:
        load_adapter_arrays(lm, baseline)
        base = evaluate_loss(lm.model, dataset, batch_size=job.train.eval_batch_size)
    load_adapter_arrays(lm, candidate)
    cand = evaluate_loss(lm.model, dataset, batch_size=job.train.eval_batch_size, use_adapter=True)
    # Paired per-record differences as sums only (no per-record values leave the site).
    diffs = np.asarray(cand.example_losses) - np.asarray(base.example_losses)
    metrics: dict[str, float | int] = {
        "num-examples": cand.examples,
        "candidate-loss": cand.loss,
        "baseline-loss": base.loss,
        "candidate-tokens": cand.tokens,
        "diff-sum": float(diffs.sum()),
        "diff-sumsq": float((diffs ** 2).sum()),
    }
    return EvaluateOutcome(metrics=metrics)


def noise_multiplier(job: Job, site: SiteConfig, sample_rate: float) -> float:
    """Sigma for this job at this site: fixed by the job, or derived from its target epsilon."""
    if not job.privacy.enabled:
        return 0.0
    if job.privacy.noise_multiplier is not None:
        return job.privacy.noise_multiplier
    # Sigma is derived so that the run's planned rounds spend target_epsilon at this site;
    # the site's own ceiling (not the coordinator's target) is what finally bounds it.
    planned_steps = job.train.local_steps * job.rounds
    return noise_multiplier_for_target(job.privacy.target_epsilon, site.delta, sample_rate, planned_steps,
                                       site.accountant)


def _round_seed(seed: int, site_id: str, server_round: int) -> int:
    # Stable across processes (unlike hash()), different per site and round.
    return zlib.crc32(f"{seed}:{site_id}:{server_round}".encode())


def site_model(job: Job, device: str) -> LoraModel:
    """The job's base model with LoRA attached, built once per process and reused."""
    return _cached_model(job.model, job.lora, job.seed, device)


@functools.lru_cache(maxsize=1)
def _cached_model(model_cfg, lora, seed: int, device: str) -> LoraModel:
    # One adapted model per process, reused across rounds: every round overwrites all
    # adapter tensors with the global ones, so nothing of an earlier round leaks in.
    return load_lora_model(model_cfg, lora, seed=seed, device=device)

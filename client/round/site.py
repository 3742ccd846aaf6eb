"""What a site does in a round, as plain Python: no Flower types in or out.

``train_round`` validates the site's newest data, checks its lifetime privacy budget,
fine-tunes the LoRA adapter with DP-SGD (noise and sampling seeded from the OS, never
by the coordinator) and records the spend in the site's ledger.
``evaluate_round`` scores the round's candidate against the installed version on
held-out data and sends noised sums, charged to the ledger. Only adapter tensors and
scalars that are noised and charged, or that do not depend on the records, leave.
"""

from __future__ import annotations

import functools
import logging
import secrets
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.ingest.pipeline import recover_store
from client.ingest.reference import load_reference, save_reference
from client.install.model_store import ModelStore
from client.review import accepted_only
from client.round.disclosures import Disclosures, adapter_digest
from client.round.replies import ReplyKey, load_reply, save_reply
from client.round.selection import paced, replay_window, replayed, select, selection_key
from fedretrain.arrays import NOT_PRIVATE_EPSILON
from fedretrain.config import Job, SiteConfig
from fedretrain.data.encoding import encode_texts
from fedretrain.data.notes import optional_texts, read_records
from fedretrain.errors import ConfigError, EvaluationRefused, PrivacyBudgetExceeded
from fedretrain.lora_ranks import expand, truncate
from fedretrain.modeling.lora_model import LoraModel, adapter_arrays, load_adapter_arrays, load_lora_model
from fedretrain.privacy.accounting import HistoryEntry, epsilon_for_history, noise_multiplier_for_target, sigma_to_fit
from fedretrain.privacy.ledger import PrivacyLedger, ledger_lock
from fedretrain.privacy.release import RELEASE_SAMPLE_RATE, RELEASE_STEPS, gaussian_release
from fedretrain.training.dp import DPParams, TrainParams, train_lora
from fedretrain.training.evaluate import evaluate_loss

log = logging.getLogger("fedretrain.client")


@dataclass(frozen=True)
class TrainOutcome:
    adapter: dict[str, np.ndarray]
    metrics: dict[str, float | int]


@dataclass(frozen=True)
class EvaluateOutcome:
    metrics: dict[str, float | int]


def train_round(
    site: SiteConfig,
    job: Job,
    global_adapter: dict[str, np.ndarray],
    server_round: int,
    global_hash: str | None = None,
    proximal_mu: float = 0.0,
) -> TrainOutcome:
    """One round of local DP training. Raises a ``FedretrainError`` instead of sending anything bad.

    ``global_hash`` names the global adapter (the coordinator's digest). A request for
    the same run, round and adapter as the last one trained (a resumed coordinator
    asking again) gets the same update back without training or spending again.
    ``proximal_mu`` > 0: FedProx's proximal term in the local objective (its gradient
    joins the private gradient after the noise: no privacy cost).
    """
    key = ReplyKey(job.run_id, server_round, global_hash) if global_hash else None
    # 1. Data first: a bad file must stop the round before any compute or spend. An ingest
    # interrupted by a crash is completed (or undone) before the store is read.
    recover_store(site)
    stored = read_records(site.train_path)
    heldout = len(optional_texts(site.heldout_path))  # counted now: records ingested during training are new
    # The store is append-only, so the newest records are the last ones.
    start = 0 if job.train.window is None else max(0, len(stored) - job.train.window)
    window = (start, len(stored))
    records = stored[start:]
    if job.train.require_review:  # only what the site's reviewers accepted (client/review.py)
        reviewed = accepted_only(site, records)
        if not reviewed:
            raise ConfigError(
                f"train.require_review: none of site {site.site_id}'s {len(records)} training records in the window "
                "is accepted yet (fedretrain site review list|accept|correct)"
            )
        records = reviewed
    texts = [r.text for r in records]
    if job.train.replay:  # a share of the previous cycle's window, against forgetting
        last = load_reference(site)
        previous = replay_window(
            site.state_path, job.run_id, None if last is None else (last.run_id, last.train_start, last.train_end)
        )
        if previous is not None:
            old = stored[previous[0] : previous[1]]
            if job.train.require_review:
                old = accepted_only(site, old)
            texts = texts + replayed([r.text for r in old], texts, job, selection_key(site.state_path))
    _check_private(site, job)
    # One round at a time per site: budget check, training, record and save run under one
    # lock, so two rounds at once (two runs on one site) cannot both pass the check or lose
    # each other's ledger entry.
    with ledger_lock(site.ledger_path):
        # Checked under the lock: a request repeated while the first is still training
        # waits for it, then finds its reply instead of training (and spending) again.
        kept = load_reply(site.state_path, key) if key is not None else None
        if kept is not None:
            log.info(
                "site %s round %d of run %s: already trained; sending the same update again (no new spend)",
                site.site_id,
                server_round,
                job.run_id,
            )
            return TrainOutcome(adapter=kept[0], metrics=kept[1])
        outcome = _train_and_record(site, job, global_adapter, server_round, texts, proximal_mu)
        if key is not None:  # after the ledger recorded the spend (client/round/replies.py)
            save_reply(site.state_path, key, outcome.adapter, outcome.metrics)
    # What this cycle trained on is the reference its drift is measured against (client/status.py).
    save_reference(site, job.run_id, *window, heldout)
    return outcome


def check_ready(site: SiteConfig, job: Job, server_round: int) -> dict[str, Any]:
    """Whether this site can train the job from ``server_round`` on: its data and its budget.

    Nothing is trained, spent or recorded. The coordinator asks every site before a cycle's
    first round, so a cycle that too few sites can join stops before any site spends: one
    site's bad file would otherwise cost the others the epsilon of a round that is then
    thrown away. Raises what :func:`train_round` would raise for the same cause.
    """
    recover_store(site)
    read_records(site.train_path)
    optional_texts(site.heldout_path)
    _check_private(site, job)
    if site.require_secure_aggregation and not job.secure_aggregation:
        raise ConfigError(
            f"site {site.site_id!r} sends its updates only under secure aggregation "
            "(require-secure-aggregation=true); this job does not use it"
        )
    _training_seed(site, job, server_round)
    if job.privacy.enabled:
        ledger = PrivacyLedger.load(
            site.ledger_path, site_id=site.site_id, accountant=site.accountant, delta=site.delta
        )
        if not ledger.trained(job.run_id):
            check_cycle_fits(site, job, ledger, noise_multiplier(job, site, ledger), server_round)
    return {"ready": 1}


def base_identity(job: Job) -> str:
    """The identity (sha256) of the base model this site would train and score: its own files."""
    from fedretrain.modeling.loading import resolve_model_path
    from fedretrain.registry.base_model import base_model_identity

    model_dir = resolve_model_path(job.model.name_or_path)
    return base_model_identity(job.model.name_or_path, model_dir, job.model.init_missing_seed)["sha256"]


def _check_private(site: SiteConfig, job: Job) -> None:
    if not job.privacy.enabled and not site.allow_non_private:
        # Without DP a round has no finite epsilon: only the site itself may allow that.
        raise PrivacyBudgetExceeded(
            f"site {site.site_id!r} refuses non-private training (job privacy.enabled=false has no "
            "finite epsilon); a site opts in with allow-non-private=true in its own node_config"
        )


def _train_and_record(
    site: SiteConfig,
    job: Job,
    global_adapter: dict[str, np.ndarray],
    server_round: int,
    texts: list[str],
    proximal_mu: float = 0.0,
) -> TrainOutcome:
    ledger = PrivacyLedger.load(site.ledger_path, site_id=site.site_id, accountant=site.accountant, delta=site.delta)
    rank = training_rank(site, job)
    if job.train.selection != "all":
        chosen = select(texts, job, selection_key(site.state_path), lambda t: _installed_losses(site, job, t))
        log.info(
            "site %s round %d: train.selection=%s keeps %d of %d records",
            site.site_id,
            server_round,
            job.train.selection,
            len(chosen),
            len(texts),
        )
        texts = [texts[i] for i in chosen]
    if job.train.curriculum_start is not None:
        pool = paced(texts, job, server_round, lambda t: _base_losses(site, job, t))
        log.info(
            "site %s round %d: curriculum pool %d of %d records", site.site_id, server_round, len(pool), len(texts)
        )
        texts = [texts[i] for i in pool]
    lm = site_model(job, site.device, rank=rank)
    load_adapter_arrays(lm, global_adapter if rank == job.lora.r else truncate(global_adapter, rank))
    dataset = encode_texts(lm.tokenizer, texts, job.model.max_length)
    seed = _training_seed(site, job, server_round)  # before any spend: a refused job costs nothing

    # 2. Privacy. The sampling rate is the job's, not derived from N, so sigma and epsilon
    # (both in the reply) say nothing about how many records the site holds.
    sample_rate = job.privacy.sample_rate
    sigma = noise_multiplier(job, site, ledger)
    if job.privacy.enabled:
        if not ledger.trained(job.run_id):
            check_cycle_fits(site, job, ledger, sigma, server_round)
        projected = ledger.check_can_spend(sigma, sample_rate, job.train.local_steps, site.epsilon_ceiling)
        log.info(
            "site %s round %d: sigma=%.3f, epsilon %.3f -> %.3f of %.3f",
            site.site_id,
            server_round,
            sigma,
            ledger.epsilon(),
            projected,
            site.epsilon_ceiling,
        )

    # 3. Train, then record the spend before anything is sent.
    params = TrainParams(
        local_steps=job.train.local_steps,
        batch_size=job.train.batch_size,
        lr=job.train.lr,
        optimizer=job.train.optimizer,
        proximal_mu=proximal_mu,
    )
    dp = DPParams(
        enabled=job.privacy.enabled,
        noise_multiplier=sigma,
        max_grad_norm=job.privacy.max_grad_norm,
        grad_sample_mode=job.privacy.grad_sample_mode,
        sample_rate=sample_rate,
    )
    result = train_lora(lm.model, dataset, params, dp, seed=seed)
    if job.privacy.enabled:
        ledger.record(job.run_id, server_round, sigma, result.sample_rate, result.steps)
        ledger.save(site.ledger_path)
    disclosures = Disclosures.load(site.state_path)
    disclosures.mark_trained(job.run_id, server_round)
    disclosures.save()
    epsilon = ledger.epsilon() if job.privacy.enabled else NOT_PRIVATE_EPSILON
    # Only values that do not depend on the site's records: no record count, no training
    # loss (one record moves a mean loss), and epsilon and sigma follow from the job's
    # rate and the site's own settings and history of releases.
    metrics: dict[str, float | int] = {
        "epsilon": float(epsilon),
        "epsilon-ceiling": float(site.epsilon_ceiling),
        "delta": float(site.delta),
        "noise-multiplier": float(sigma),
        "sample-rate": float(sample_rate),
        "steps": int(result.steps),
        # The components this site trained; the coordinator checks the rest came back unchanged.
        "lora-rank": int(rank),
    }
    adapter = adapter_arrays(lm.model)
    if rank < job.lora.r:  # the untrained components go back as they came
        adapter = expand(adapter, global_adapter)
    return TrainOutcome(adapter=adapter, metrics=metrics)


def record_losses(job: Job, device: str, texts: Sequence[str], arrays: dict[str, np.ndarray] | None) -> np.ndarray:
    """Each record's loss under ``arrays`` on the job's base model (None: the bare base model)."""
    lm = site_model(job, device)
    dataset = encode_texts(lm.tokenizer, list(texts), job.model.max_length)
    if arrays is not None:
        load_adapter_arrays(lm, arrays)
    scored = evaluate_loss(lm.model, dataset, batch_size=job.train.eval_batch_size, use_adapter=arrays is not None)
    return np.asarray(scored.example_losses)


def _base_losses(site: SiteConfig, job: Job, texts: Sequence[str]) -> list[float]:
    """Each record's loss under the bare base model (the curriculum's measure of difficulty)."""
    return list(record_losses(job, site.device, texts, None))


def _installed_losses(site: SiteConfig, job: Job, texts: Sequence[str]) -> list[float]:
    """Each record's loss under the site's installed version (the bare base model before any)."""
    return list(record_losses(job, site.device, texts, ModelStore(site.model_store_path).current_adapter()))


def training_rank(site: SiteConfig, job: Job) -> int:
    """The LoRA rank this site trains: its own ``lora-rank`` if lower than the job's, else the job's."""
    return job.lora.r if site.lora_rank is None else min(site.lora_rank, job.lora.r)


def _training_seed(site: SiteConfig, job: Job, server_round: int) -> int:
    """The seed of the round's Poisson sampling, DP noise and dropout: drawn from the OS.

    A seed derived from anything the coordinator sends would let it replay the noise and
    strip it off (membership inference at will). Only a simulated site that allows it
    (``allow-reproducible-noise``) takes the job's seed, for a researcher's replay.
    """
    if not job.privacy.reproducible_noise:
        return secrets.randbits(63)
    if not site.allow_reproducible_noise:
        raise ConfigError(
            f"site {site.site_id!r} refuses privacy.reproducible_noise=true: the coordinator's seed "
            "would determine its DP noise (only a simulated site may allow it)"
        )
    # Stable across processes (unlike hash()), different per site and round.
    return zlib.crc32(f"{job.seed}:{site.site_id}:{server_round}".encode())


def evaluate_round(
    site: SiteConfig,
    job: Job,
    candidate: dict[str, np.ndarray],
    baseline: dict[str, np.ndarray] | None = None,
    *,
    server_round: int,
) -> EvaluateOutcome:
    """Score the candidate against the installed version on held-out data; noised, charged sums only.

    The site answers only for the last round of ``job.run_id``, and only if it trained
    in it: the first candidate asked about is bound to the round; a different one later
    is refused, the same one gets the same answer again (no new spend). ``baseline`` must
    be the version installed at the site (None: none installed, the bare base model).

    The reply holds ``num-examples``, ``diff-sum`` and ``diff-sumsq`` (the count, sum and
    sum of squares of each held-out record's loss change, clipped to ``eval-clip``),
    each with Gaussian noise (``*-std`` keys give its standard deviation), charged to
    the ledger as one release of noise multiplier ``eval-noise``, and ``epsilon``, the
    site's lifetime total with this release.

    Raises
    ------
    EvaluationRefused
        As above, or when the site's ``share-evaluation`` is false.
    PrivacyBudgetExceeded
        When the release would take the site past its ceiling.
    """
    if not site.share_evaluation:
        raise EvaluationRefused(f"site {site.site_id!r} answers no evaluation (share-evaluation=false)")
    digest = adapter_digest(candidate)
    with ledger_lock(site.ledger_path):
        disclosures = Disclosures.load(site.state_path)
        kept = disclosures.evaluation(job.run_id, server_round)
        if kept is not None:
            if kept["candidate"] != digest:
                raise EvaluationRefused(
                    f"round {server_round} of run {job.run_id}: the site already scored the round's candidate "
                    f"{kept['candidate'][:12]}; it scores no other adapter ({digest[:12]}) for that round"
                )
            return EvaluateOutcome(metrics=dict(kept["metrics"]))
        if server_round != job.rounds:
            raise EvaluationRefused(
                f"round {server_round} is not the last round ({job.rounds}) of run {job.run_id}: "
                "the site scores only the cycle's final candidate"
            )
        if not disclosures.has_trained(job.run_id, server_round):
            raise EvaluationRefused(
                f"the site did not train in round {server_round} of run {job.run_id}: it scores "
                "only the aggregate of a round it trained in"
            )
        _check_baseline(site, baseline)
        ledger = PrivacyLedger.load(
            site.ledger_path, site_id=site.site_id, accountant=site.accountant, delta=site.delta
        )
        ledger.check_can_spend(site.eval_noise, RELEASE_SAMPLE_RATE, RELEASE_STEPS, site.epsilon_ceiling)
        metrics = _noised_evaluation(site, job, candidate, baseline)
        ledger.record(job.run_id, server_round, site.eval_noise, RELEASE_SAMPLE_RATE, RELEASE_STEPS, kind="evaluate")
        ledger.save(site.ledger_path)  # the spend is on record before the figures can leave
        metrics["epsilon"] = ledger.epsilon()  # the site's total with this release: no data in it
        disclosures.bind(job.run_id, server_round, digest, metrics)
        disclosures.save()
    return EvaluateOutcome(metrics=metrics)


def _check_baseline(site: SiteConfig, baseline: dict[str, np.ndarray] | None) -> None:
    installed = ModelStore(site.model_store_path).current_adapter()
    same = (baseline is None and installed is None) or (
        baseline is not None
        and installed is not None
        and baseline.keys() == installed.keys()
        and all(np.array_equal(baseline[k], installed[k]) for k in baseline)
    )
    if not same:
        raise EvaluationRefused(
            "the baseline sent is not the version installed at this site "
            f"({'none' if installed is None else 'another adapter'} is installed)"
        )


def _noised_evaluation(
    site: SiteConfig, job: Job, candidate: dict[str, np.ndarray], baseline: dict[str, np.ndarray] | None
) -> dict[str, float | int]:
    texts = [r.text for r in read_records(site.heldout_path)]
    return noised_loss_change(site, job, texts, baseline, candidate)


def noised_loss_change(
    site: SiteConfig,
    job: Job,
    texts: Sequence[str],
    baseline: dict[str, np.ndarray] | None,
    candidate: dict[str, np.ndarray],
    counts: dict[str, float] | None = None,
) -> dict[str, float | int]:
    """The noised count, sum and sum of squares of each record's loss change (candidate - baseline,
    clipped to ``eval-clip``), with ``counts`` (each moved by at most 1 by one record) in the same
    Gaussian release of noise multiplier ``eval-noise``; every figure's std beside it.
    The caller charges the release to the ledger."""
    # Each record's loss change, clipped: one record moves the count by 1, the sum by at most
    # D and the sum of squares by at most D^2 (the sensitivities of the release).
    clip = site.eval_clip
    diffs = np.zeros(0)
    if texts:
        before = record_losses(job, site.device, texts, baseline)
        diffs = np.clip(record_losses(job, site.device, texts, candidate) - before, -clip, clip)
    statistics = {
        "num-examples": float(len(diffs)),
        "diff-sum": float(diffs.sum()),
        "diff-sumsq": float((diffs**2).sum()),
    }
    sensitivities = {"num-examples": 1.0, "diff-sum": clip, "diff-sumsq": clip * clip}
    for key, value in (counts or {}).items():
        statistics[key], sensitivities[key] = float(value), 1.0
    release = gaussian_release(statistics, sensitivities, site.eval_noise)
    metrics: dict[str, float | int] = dict(release.values)
    metrics.update({f"{key}-std": std for key, std in release.stds.items()})
    metrics["eval-clip"] = float(clip)
    return metrics


def noise_multiplier(job: Job, site: SiteConfig, ledger: PrivacyLedger) -> float:
    """Sigma for this job at this site: fixed by the job, or derived from its target epsilon.

    With the site's ``fit-sigma-to-ceiling``, sigma is at least large enough for the whole
    planned cycle (and its final evaluation) to fit what the site had left before this run.
    Nothing here depends on the site's records: the rate is the job's.
    """
    if not job.privacy.enabled:
        return 0.0
    q, steps = job.privacy.sample_rate, job.train.local_steps
    if job.privacy.noise_multiplier is not None:
        sigma = job.privacy.noise_multiplier
    else:
        # Sigma is derived so that the run's planned rounds spend target_epsilon at this site;
        # the site's own ceiling (not the coordinator's target) is what finally bounds it.
        sigma = noise_multiplier_for_target(
            job.privacy.target_epsilon, site.delta, q, steps * job.rounds, site.accountant
        )
    if site.fit_sigma_to_ceiling:
        before = tuple(h for h, e in zip(ledger.history, ledger.entries, strict=True) if e.run_id != job.run_id)
        sigma = max(
            sigma,
            sigma_to_fit(
                before + _planned_releases(site),
                q,
                steps * job.rounds,
                site.epsilon_ceiling,
                site.delta,
                site.accountant,
            ),
        )
    return sigma


def _planned_releases(site: SiteConfig) -> tuple[HistoryEntry, ...]:
    # A cycle ends with one evaluation (a Gaussian release), if the site answers them.
    if not site.share_evaluation:
        return ()
    return ((site.eval_noise, RELEASE_SAMPLE_RATE, RELEASE_STEPS),)


def check_cycle_fits(site: SiteConfig, job: Job, ledger: PrivacyLedger, sigma: float, server_round: int) -> None:
    """Refuse, before any spend, a cycle whose remaining rounds would cross the ceiling.

    Checked at the site's first round of a run: a cycle stopped half-way by the ceiling
    would have spent budget on rounds whose update is then never used.
    """
    rounds = max(1, job.rounds - server_round + 1)
    planned = [
        *ledger.history,
        (sigma, job.privacy.sample_rate, job.train.local_steps * rounds),
        *_planned_releases(site),
    ]
    projected = epsilon_for_history(planned, site.delta, site.accountant)
    if projected > site.epsilon_ceiling:
        raise PrivacyBudgetExceeded(
            f"site {site.site_id!r} has spent epsilon {ledger.epsilon():.4f}; the {rounds} remaining round(s) of run "
            f"{job.run_id} (sigma={sigma:g}, q={job.privacy.sample_rate:g}, {job.train.local_steps} steps each, and "
            f"the final evaluation) would bring it to {projected:.4f}, above the lifetime ceiling "
            f"{site.epsilon_ceiling:.4f}; the cycle is refused before any of it is spent"
            + ("" if site.fit_sigma_to_ceiling else " (fit-sigma-to-ceiling=true would raise sigma to fit)")
        )


def site_model(job: Job, device: str, rank: int | None = None) -> LoraModel:
    """The job's base model with LoRA attached, built once per process and reused.

    ``rank`` below the job's: the site's own lower-rank LoRA (fedretrain/lora_ranks.py)."""
    return _cached_model(job.model, job.lora, job.seed, device, None if rank == job.lora.r else rank)


@functools.lru_cache(maxsize=1)
def _cached_model(model_cfg, lora, seed: int, device: str, rank: int | None) -> LoraModel:
    # One adapted model per process, reused across rounds: every round overwrites all
    # adapter tensors with the global ones, so nothing of an earlier round leaks in. A site
    # of a lower rank builds its own for training and the job's for scoring full candidates
    # (one base model in memory at a time).
    return load_lora_model(model_cfg, lora, seed=seed, device=device, rank=rank)

"""A site's status: what arrived since it last trained, how different it looks, what it can still spend.

The coordinator polls every site (``query.status``) and decides from the replies
whether to start a retraining cycle (server/watch/triggers.py). Everything in a reply is
a count or a score computed here, on the site's premises: no record, token or
identifier leaves. Keys of the reply:

    new-records          records after the reference window              } Gaussian noise,
    reference-records    size of the reference window (trained-on         } one release charged
                         records + held-out records then)                 } to the ledger per
    train-records        size of the training window the site would use   } reply; count-std
    count-std            standard deviation of each count's noise
    has-reference        1 when the site has trained before, else 0
    drift-js             token Jensen-Shannon divergence, bits        } only where the site
    drift-hidden         base model's mean hidden-state shift         } set share-drift-scores
    loss-new             published model's loss on the new records    } (un-noised: its operator's
    loss-reference       ... and on the reference held-out records    } choice), with a reference
                                                                      } and min_new_records new ones
    model-version        installed version (0: the bare base model)
    epsilon-spent, epsilon-ceiling, delta, epsilon-projected, can-afford

The drift and loss scores are means over a few hundred sampled records; one record
moves them by far more than any useful noise would hide, so a site shares them only
by its operator's explicit choice (``share-drift-scores``), and their presence then
reveals that at least ``min_new_records`` records are new. Everything else is noised
and charged, or does not depend on the records (the privacy totals follow from the
ledger and the job's fixed sampling rate).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from client.ingest.pipeline import recover_store
from client.ingest.reference import Reference, load_reference
from client.install.model_store import ModelStore
from client.round.site import noise_multiplier, site_model
from fedretrain.atomic import atomic_write_json
from fedretrain.config import Job, MonitorConfig, SiteConfig
from fedretrain.data.encoding import encode_texts
from fedretrain.data.notes import optional_texts, read_records
from fedretrain.modeling.lora_model import LoraModel, load_adapter_arrays
from fedretrain.monitoring.drift import hidden_state_shift, mean_hidden_states, token_js_divergence
from fedretrain.privacy.accounting import epsilon_for_history
from fedretrain.privacy.ledger import PrivacyLedger, ledger_lock
from fedretrain.privacy.release import RELEASE_SAMPLE_RATE, RELEASE_STEPS, gaussian_release
from fedretrain.training.evaluate import evaluate_loss

log = logging.getLogger("fedretrain.client")

SCORE_KEYS = ("drift-js", "drift-hidden", "loss-new", "loss-reference")


def site_status(
    site: SiteConfig, job: Job, monitor: MonitorConfig, *, charge: bool = False, seed: int = 0
) -> dict[str, float | int]:
    """What the site knows about its data now; with ``charge``, what the coordinator may learn of it.

    Parameters
    ----------
    site, job, monitor
        The site's own settings, the job a retraining cycle would run, what to measure.
    charge : bool
        False: the site's operator asks (``fedretrain site status``): exact figures, nothing
        leaves, nothing is spent. True: a reply to the coordinator. The three counts then
        carry Gaussian noise of multiplier ``status-noise`` (each count moves by at most 1
        when one record is added or removed), the release is charged to the ledger before
        the reply is built (refused with PrivacyBudgetExceeded past the ceiling), and drift
        and loss scores are included only when the site's ``share-drift-scores`` is true.
    seed : int
        Seeds which records are sampled for the scores (the noise never uses it).

    Returns
    -------
    dict[str, float | int]
        The keys listed in the module docstring; every value a finite int or float.

    Raises
    ------
    DataValidationError
        If the data files are invalid. A reference that points past their end (a
        replaced or truncated store) is dropped: the site answers as if it had none.
    PrivacyBudgetExceeded
        With ``charge``, when one more release would cross the site's ceiling.
    """
    recover_store(site)  # an ingest interrupted by a crash is completed (or undone) first
    # Sizes before the records are read: an ingest appending meanwhile makes the next poll's
    # sizes differ, so kept scores are never taken for more records than they saw.
    sizes = _store_sizes(site)
    train = [r.text for r in read_records(site.train_path)]
    heldout = optional_texts(site.heldout_path)
    ref = _usable_reference(site, len(train), len(heldout))
    rng = np.random.default_rng(seed)
    status: dict[str, float | int] = {"has-reference": int(ref is not None)}
    new_texts = [] if ref is None else train[ref.train_end :] + heldout[ref.heldout_end :]
    window = job.train.window
    counts = {
        "new-records": len(new_texts),
        "reference-records": 0 if ref is None else ref.train_end - ref.train_start + ref.heldout_end,
        "train-records": min(window, len(train)) if window else len(train),
    }
    if charge:
        status.update(_charged_counts(site, job, counts))
    else:
        status.update(counts)
    reference = [] if ref is None else train[ref.train_start : ref.train_end] + heldout[: ref.heldout_end]
    # The loss comparison needs held-out records of the reference (never trained on): the
    # training window would make the reference loss look low and the gap look like drift.
    scores_wanted = not charge or site.share_drift_scores
    if (
        scores_wanted
        and ref is not None
        and len(new_texts) >= monitor.min_new_records
        and len(reference) >= 2
        and ref.heldout_end
    ):
        key = _scores_key(site, job, monitor, ref, sizes, len(train), len(heldout), seed)
        scores = _kept_scores(site, key)
        if scores is None:
            scores = _scores(site, job, monitor, reference, heldout[: ref.heldout_end], new_texts, rng)
            try:
                atomic_write_json(site.state_path / SCORES_FILE, {"key": key, "scores": scores})
            except OSError as err:  # a cache: the reply (maybe already charged) goes out without it
                log.warning(
                    "site %s: could not keep the status scores (%s); they are computed again", site.site_id, err
                )
        status.update(scores)
    status["model-version"] = _installed_version(site)
    status.update(_privacy(site, job))
    return status


def _charged_counts(site: SiteConfig, job: Job, counts: dict[str, int]) -> dict[str, float | int]:
    """The counts with Gaussian noise (fedretrain/privacy/release.py), charged before they leave.

    Within ``status-interval-s`` of the last charged reply the same noised counts go out
    again: re-sending a release is post-processing and costs nothing, and whether the site
    re-sends depends on the clock only, never on its data.
    """
    with ledger_lock(site.ledger_path):
        cached = _recent_counts(site)
        if cached is not None:
            return cached
        ledger = PrivacyLedger.load(
            site.ledger_path, site_id=site.site_id, accountant=site.accountant, delta=site.delta
        )
        ledger.check_can_spend(site.status_noise, RELEASE_SAMPLE_RATE, RELEASE_STEPS, site.epsilon_ceiling)
        release = gaussian_release(
            {k: float(v) for k, v in counts.items()}, dict.fromkeys(counts, 1.0), site.status_noise
        )
        ledger.record(job.run_id, 0, site.status_noise, RELEASE_SAMPLE_RATE, RELEASE_STEPS, kind="status")
        ledger.save(site.ledger_path)
        # Rounding and clipping at 0 are post-processing: they cost nothing more.
        noised: dict[str, float | int] = {k: max(0, int(round(v))) for k, v in release.values.items()}
        noised["count-std"] = release.stds["new-records"]
        atomic_write_json(site.state_path / STATUS_FILE, {"released_at": time.time(), "counts": noised})
    return noised


# The last charged status counts and when they were released.
STATUS_FILE = "last_status.json"


def _recent_counts(site: SiteConfig) -> dict[str, float | int] | None:
    path = site.state_path / STATUS_FILE
    if site.status_interval_s <= 0 or not path.exists():
        return None
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        age = time.time() - float(kept["released_at"])
        counts = {str(k): v for k, v in kept["counts"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable: release afresh (charged), never guess
    return counts if 0 <= age < site.status_interval_s else None


# The last drift and loss scores and what they were computed from. The coordinator may poll
# every minute; with nothing changed the site answers the same scores without loading a model.
SCORES_FILE = "last_scores.json"


def _store_sizes(site: SiteConfig) -> list[list[int]]:
    """Each store file's size, modification time and inode: an append, a rewrite in place
    (even one that keeps the size) or a replaced file changes them."""
    out = []
    for path in (site.train_path, site.heldout_path):
        try:
            st = path.stat()
        except FileNotFoundError:
            out.append([0, 0, 0])
            continue
        out.append([st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def _scores_key(
    site: SiteConfig,
    job: Job,
    monitor: MonitorConfig,
    ref: Reference,
    sizes: list[list[int]],
    num_train: int,
    num_heldout: int,
    seed: int,
) -> dict:
    """What the scores depend on: the store's files (size, modification time, inode) and
    record counts, the reference window, the installed version (a version never changes),
    the job's model, adapter and sampling settings, and the device."""
    key = {
        "files": sizes,
        "records": [num_train, num_heldout],
        "reference": [ref.run_id, ref.train_start, ref.train_end, ref.heldout_end],
        "model-version": _installed_version(site),
        "model": dataclasses.asdict(job.model),
        "lora": dataclasses.asdict(job.lora),
        "eval-batch-size": job.train.eval_batch_size,
        "sample-records": monitor.sample_records,
        "seed": seed,
        "device": site.device,
    }
    return json.loads(json.dumps(key, default=str))  # as it reads back from the kept file


def _kept_scores(site: SiteConfig, key: dict) -> dict[str, float] | None:
    path = site.state_path / SCORES_FILE
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        scores = {k: float(kept["scores"][k]) for k in SCORE_KEYS}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or unreadable: compute afresh
    return scores if kept.get("key") == key else None


def _usable_reference(site: SiteConfig, num_train: int, num_heldout: int) -> Reference | None:
    ref = load_reference(site)
    if ref is not None and (ref.train_end > num_train or ref.heldout_end > num_heldout):
        # The store is append-only; a shorter one was replaced or truncated by its operator.
        # Answer as a site without a reference (counted again after its next training round)
        # instead of refusing every poll and being left out for good.
        log.warning(
            "site %s: the reference window points past the end of the data; the store was replaced "
            "or truncated, so drift is measured again after the next training round",
            site.site_id,
        )
        return None
    return ref


def _sample(texts: Sequence[str], size: int, rng: np.random.Generator) -> list[str]:
    if len(texts) <= size:
        return list(texts)
    return [texts[i] for i in sorted(rng.choice(len(texts), size=size, replace=False))]


def _scores(
    site: SiteConfig,
    job: Job,
    monitor: MonitorConfig,
    reference: Sequence[str],
    unseen: Sequence[str],
    new: Sequence[str],
    rng: np.random.Generator,
) -> dict[str, float]:
    """Drift of the new records from the reference, and the published model's loss on both."""
    lm = site_model(job, site.device)
    size, batch = monitor.sample_records, job.train.eval_batch_size
    ref_data = encode_texts(lm.tokenizer, _sample(reference, size, rng), job.model.max_length)
    new_data = encode_texts(lm.tokenizer, _sample(new, size, rng), job.model.max_length)
    unseen_data = encode_texts(lm.tokenizer, _sample(unseen, size, rng), job.model.max_length)
    js = token_js_divergence(_token_ids(ref_data.tensors), _token_ids(new_data.tensors), len(lm.tokenizer))
    shift = hidden_state_shift(
        mean_hidden_states(lm.model, ref_data, batch), mean_hidden_states(lm.model, new_data, batch)
    )
    use_adapter = _load_published(lm, site)
    loss_new = evaluate_loss(lm.model, new_data, batch_size=batch, use_adapter=use_adapter).loss
    loss_ref = evaluate_loss(lm.model, unseen_data, batch_size=batch, use_adapter=use_adapter).loss
    return {"drift-js": js, "drift-hidden": shift, "loss-new": float(loss_new), "loss-reference": float(loss_ref)}


def _token_ids(tensors: Sequence) -> list[list[int]]:
    input_ids, attention_mask = tensors[0], tensors[1]  # [N, T] each
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]


def _load_published(lm: LoraModel, site: SiteConfig) -> bool:
    """Load the installed version's adapter into ``lm``; False when none is installed (bare base model)."""
    adapter = ModelStore(site.model_store_path).current_adapter()
    if adapter is not None:
        load_adapter_arrays(lm, adapter)
    return adapter is not None


def _installed_version(site: SiteConfig) -> int:
    return int(ModelStore(site.model_store_path).state().current or 0)


def _privacy(site: SiteConfig, job: Job) -> dict[str, float | int]:
    """Epsilon spent, and after one more cycle of ``job`` (its rounds and the final evaluation).

    None of it depends on the records: the ledger holds what the site released, and the
    job fixes the sampling rate.
    """
    ledger = PrivacyLedger.load(site.ledger_path, site_id=site.site_id, accountant=site.accountant, delta=site.delta)
    spent = ledger.epsilon()
    projected = spent
    if job.privacy.enabled:
        sigma = noise_multiplier(job, site, ledger)
        cycle = [(sigma, job.privacy.sample_rate, job.train.local_steps * job.rounds)]
        if site.share_evaluation:
            cycle.append((site.eval_noise, RELEASE_SAMPLE_RATE, RELEASE_STEPS))
        projected = epsilon_for_history([*ledger.history, *cycle], site.delta, site.accountant)
    return {
        "epsilon-spent": float(spent),
        "epsilon-ceiling": float(site.epsilon_ceiling),
        "delta": float(site.delta),
        "epsilon-projected": float(projected),
        "can-afford": int(projected <= site.epsilon_ceiling),
    }


def format_status(site_id: str, status: Mapping[str, float | int]) -> str:
    """A few human-readable lines for ``fedretrain site status``."""
    lines = [f"site {site_id}"]
    if not status.get("has-reference"):
        lines.append("  never trained: no reference window yet")
    else:
        lines.append(
            f"  new records: {int(status['new-records'])} since the reference window of "
            f"{int(status['reference-records'])} records"
        )
    lines.append(f"  training window now: {int(status['train-records'])} records")
    if all(key in status for key in SCORE_KEYS):
        lines.append(
            f"  drift: tokens {status['drift-js']:.4f} bits JS, hidden states {status['drift-hidden']:.3f} "
            "reference spreads"
        )
        lines.append(
            f"  published model's loss: {status['loss-new']:.4f} on new records, "
            f"{status['loss-reference']:.4f} on reference held-out records"
        )
    elif status.get("has-reference"):
        lines.append("  drift and loss: not enough new data")
    lines.append(
        f"  model version: {int(status['model-version'])}" + (" (base model)" if not status["model-version"] else "")
    )
    lines.append(
        f"  epsilon: spent {status['epsilon-spent']:.3f} of {status['epsilon-ceiling']:.3f} "
        f"(delta {status['delta']:.0e}); after one more cycle {status['epsilon-projected']:.3f} ("
        + ("affordable" if status["can-afford"] else "over the ceiling")
        + ")"
    )
    return "\n".join(lines)

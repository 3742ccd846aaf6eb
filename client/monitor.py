"""A site's status: what arrived since it last trained, how different it looks, what it can still spend.

The coordinator polls every site (``query.status``) and decides from the replies
whether to start a retraining cycle (server/triggers.py). Everything in a reply is
a count or a score computed here, on the site's premises: no record, token or
identifier leaves. Keys of the reply:

    new-records          records after the reference window (Laplace-noised when count-noise > 0)
    reference-records    size of the reference window (trained-on records + held-out records then)
    has-reference        1 when the site has trained before, else 0
    train-records        size of the training window the site would use now
    drift-js             token Jensen-Shannon divergence, bits        } only with a reference
    drift-hidden         base model's mean hidden-state shift         } and at least
    loss-new             published model's loss on the new records    } monitor.min_new_records
    loss-reference       ... and on the reference held-out records    } new records (and a
                                                                      } reference of 2 or more)
    model-version        installed version (0: the bare base model)
    epsilon-spent, epsilon-ceiling, delta, epsilon-projected, can-afford

Whether the scores are present depends on the exact count of new records: a reply
reveals that the count is at least ``min_new_records`` even when the count itself
is noised.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from client.ingest import recover_store
from client.reference import Reference, load_reference
from client.site import noise_multiplier, site_model
from client.store import ModelStore
from fedretrain.config import Job, MonitorConfig, SiteConfig
from fedretrain.data.encoding import encode_texts
from fedretrain.data.schema import optional_texts, read_records
from fedretrain.modeling.lora_model import LoraModel, load_adapter_arrays
from fedretrain.monitoring.drift import hidden_state_shift, mean_hidden_states, token_js_divergence
from fedretrain.privacy.ledger import PrivacyLedger
from fedretrain.training.dp import poisson_sample_rate
from fedretrain.training.evaluate import evaluate_loss

log = logging.getLogger("fedretrain.client")

SCORE_KEYS = ("drift-js", "drift-hidden", "loss-new", "loss-reference")


def site_status(site: SiteConfig, job: Job, monitor: MonitorConfig, *, seed: int | None = 0) -> dict[str, float | int]:
    """Everything the coordinator may learn about this site now: scalars and counts only.

    Parameters
    ----------
    site, job, monitor
        The site's own settings, the job a retraining cycle would run, what to measure.
    seed : int | None
        Seeds ``np.random.default_rng`` for the record samples and the count noise, so
        a reply is reproducible. ``None`` draws a fresh seed from the OS (CSPRNG): use
        it in deployment when ``count-noise > 0``, or every poll repeats the same noise
        draw and the difference of two polls' counts is exact.

    Returns
    -------
    dict[str, float | int]
        The keys listed in the module docstring; every value a finite int or float.

    Raises
    ------
    DataValidationError
        If the data files are invalid. A reference that points past their end (a
        replaced or truncated store) is dropped: the site answers as if it had none.
    """
    recover_store(site)  # an ingest interrupted by a crash is completed (or undone) first
    train = [r.text for r in read_records(site.train_path)]
    heldout = optional_texts(site.heldout_path)
    ref = _usable_reference(site, len(train), len(heldout))
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    status: dict[str, float | int] = {"has-reference": int(ref is not None)}
    new_texts = [] if ref is None else train[ref.train_end:] + heldout[ref.heldout_end:]
    window = job.train.window
    # With count noise on, every count in the reply is noised: an exact training-set size
    # next to a noised new-record count would give the new count away between two polls.
    counts = {"new-records": len(new_texts),
              "reference-records": 0 if ref is None else ref.train_end - ref.train_start + ref.heldout_end,
              "train-records": min(window, len(train)) if window else len(train)}
    status.update({key: _noised_count(value, site.count_noise, rng) for key, value in counts.items()})
    reference = [] if ref is None else train[ref.train_start:ref.train_end] + heldout[:ref.heldout_end]
    # The loss comparison needs held-out records of the reference (never trained on): the
    # training window would make the reference loss look low and the gap look like drift.
    if ref is not None and len(new_texts) >= monitor.min_new_records and len(reference) >= 2 and ref.heldout_end:
        status.update(_scores(site, job, monitor, reference, heldout[:ref.heldout_end], new_texts, rng))
    status["model-version"] = _installed_version(site)
    status.update(_privacy(site, job, counts["train-records"]))
    return status


def _usable_reference(site: SiteConfig, num_train: int, num_heldout: int) -> Reference | None:
    ref = load_reference(site)
    if ref is not None and (ref.train_end > num_train or ref.heldout_end > num_heldout):
        # The store is append-only; a shorter one was replaced or truncated by its operator.
        # Answer as a site without a reference (counted again after its next training round)
        # instead of refusing every poll and being left out for good.
        log.warning("site %s: the reference window points past the end of the data; the store was replaced "
                    "or truncated, so drift is measured again after the next training round", site.site_id)
        return None
    return ref


def _noised_count(count: int, scale: float, rng: np.random.Generator) -> int:
    # Laplace(scale) on a count of sensitivity 1 is (1/scale)-DP; rounding and clipping
    # at 0 are post-processing.
    if scale <= 0:
        return count
    return max(0, int(round(count + rng.laplace(0.0, scale))))


def _sample(texts: Sequence[str], size: int, rng: np.random.Generator) -> list[str]:
    if len(texts) <= size:
        return list(texts)
    return [texts[i] for i in sorted(rng.choice(len(texts), size=size, replace=False))]


def _scores(site: SiteConfig, job: Job, monitor: MonitorConfig, reference: Sequence[str], unseen: Sequence[str],
            new: Sequence[str], rng: np.random.Generator) -> dict[str, float]:
    """Drift of the new records from the reference, and the published model's loss on both."""
    lm = site_model(job, site.device)
    size, batch = monitor.sample_records, job.train.eval_batch_size
    ref_data = encode_texts(lm.tokenizer, _sample(reference, size, rng), job.model.max_length)
    new_data = encode_texts(lm.tokenizer, _sample(new, size, rng), job.model.max_length)
    unseen_data = encode_texts(lm.tokenizer, _sample(unseen, size, rng), job.model.max_length)
    js = token_js_divergence(_token_ids(ref_data.tensors), _token_ids(new_data.tensors), len(lm.tokenizer))
    shift = hidden_state_shift(mean_hidden_states(lm.model, ref_data, batch),
                               mean_hidden_states(lm.model, new_data, batch))
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


def _privacy(site: SiteConfig, job: Job, train_records: int) -> dict[str, float | int]:
    """Epsilon spent, and after one more cycle of ``job`` (``rounds`` rounds of ``local_steps``)."""
    ledger = PrivacyLedger.load(site.ledger_path, site_id=site.site_id, accountant=site.accountant,
                                delta=site.delta)
    spent = ledger.epsilon()
    projected = spent
    if job.privacy.enabled and train_records > 0:
        q = poisson_sample_rate(train_records, job.train.batch_size)
        sigma = noise_multiplier(job, site, q)
        projected = ledger.epsilon_after(sigma, q, job.train.local_steps * job.rounds)
    return {"epsilon-spent": float(spent), "epsilon-ceiling": float(site.epsilon_ceiling),
            "delta": float(site.delta), "epsilon-projected": float(projected),
            "can-afford": int(projected <= site.epsilon_ceiling)}


def format_status(site_id: str, status: Mapping[str, float | int]) -> str:
    """A few human-readable lines for ``fedretrain site status``."""
    lines = [f"site {site_id}"]
    if not status.get("has-reference"):
        lines.append("  never trained: no reference window yet")
    else:
        lines.append(f"  new records: {int(status['new-records'])} since the reference window of "
                     f"{int(status['reference-records'])} records")
    lines.append(f"  training window now: {int(status['train-records'])} records")
    if all(key in status for key in SCORE_KEYS):
        lines.append(f"  drift: tokens {status['drift-js']:.4f} bits JS, hidden states {status['drift-hidden']:.3f} "
                     "reference spreads")
        lines.append(f"  published model's loss: {status['loss-new']:.4f} on new records, "
                     f"{status['loss-reference']:.4f} on reference held-out records")
    elif status.get("has-reference"):
        lines.append("  drift and loss: not enough new data")
    lines.append(f"  model version: {int(status['model-version'])}" + (" (base model)" if not status["model-version"]
                                                                        else ""))
    lines.append(f"  epsilon: spent {status['epsilon-spent']:.3f} of {status['epsilon-ceiling']:.3f} "
                 f"(delta {status['delta']:.0e}); after one more cycle {status['epsilon-projected']:.3f} ("
                 + ("affordable" if status["can-afford"] else "over the ceiling") + ")")
    return "\n".join(lines)

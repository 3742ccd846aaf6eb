"""A site's status reply (client/status.py): counts, scores only with enough new data,
drift that shows, privacy totals, and nothing but finite scalars under the promised keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch

import client.status
from client.ingest.reference import save_reference
from client.install.model_store import ModelStore
from client.round.site import site_model
from client.status import format_status, site_status
from fedretrain.arrays import to_torch_state_dict
from fedretrain.config import Job, MonitorConfig, SiteConfig, compose_config
from fedretrain.modeling.lora_model import adapter_arrays
from fedretrain.registry.bundle import VersionBundle
from simulation.drift import step_arrivals
from simulation.notes import site_notes, site_style, specialty_mix_for_site

BASE_KEYS = {
    "new-records",
    "reference-records",
    "has-reference",
    "train-records",
    "model-version",
    "epsilon-spent",
    "epsilon-ceiling",
    "delta",
    "epsilon-projected",
    "can-afford",
}
SCORE_KEYS = {"drift-js", "drift-hidden", "loss-new", "loss-reference"}
MIX = specialty_mix_for_site(0, dirichlet_alpha=0.5, seed=0)
MONITOR = MonitorConfig(sample_records=40, min_new_records=10)


@pytest.fixture(scope="module")
def job() -> Job:
    return Job.from_config(compose_config(["experiment=smoke"]), run_id="t")


@pytest.fixture(scope="module")
def fixed_sigma(job) -> Job:
    """The smoke job with a fixed sigma: no search for the sigma of a target epsilon (~1 s a call)."""
    return dataclasses.replace(job, privacy=dataclasses.replace(job.privacy, noise_multiplier=1.0))


def make_site(tmp_path: Path, **settings) -> SiteConfig:
    """A site with 48 training and 12 held-out notes (site 0's style and mix)."""
    data = tmp_path / "site"
    data.mkdir(parents=True)
    notes = site_notes(0, 60, MIX, 0, site_style(0, 0))
    _append(data / "train.jsonl", notes[:48])
    _append(data / "heldout.jsonl", notes[48:])
    return SiteConfig(
        site_id="site-a", data_dir=str(data), epsilon_ceiling=settings.pop("ceiling", 8.0), delta=1e-5, **settings
    )


def _append(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def arrive(site: SiteConfig, count: int, *, drifted: bool, step: int = 1) -> None:
    """``count`` new records, four in five to the training file, as ingestion appends them."""
    records = step_arrivals(0, step, count, seed=0, drifted=drifted, mix=MIX)
    cut = count * 4 // 5
    _append(site.train_path, records[:cut])
    _append(site.heldout_path, records[cut:])


def assert_scalars(status: dict) -> None:
    for key, value in status.items():
        assert type(value) in (int, float), f"{key}: {value!r}"
        assert math.isfinite(value), key


def test_a_site_that_never_trained_reports_counts_and_privacy_only(tmp_path, job):
    site = make_site(tmp_path)
    status = site_status(site, job, MONITOR)
    assert set(status) == BASE_KEYS
    assert_scalars(status)
    assert (status["has-reference"], status["new-records"], status["reference-records"]) == (0, 0, 0)
    assert (status["train-records"], status["model-version"], status["epsilon-spent"]) == (48, 0, 0.0)
    # The smoke job derives sigma to spend target_epsilon=4 over its rounds: a fresh site projects ~4.
    assert status["epsilon-projected"] == pytest.approx(4.0, rel=0.05)
    assert status["can-afford"] == 1 and status["epsilon-ceiling"] == 8.0 and status["delta"] == 1e-5
    assert "never trained" in format_status("site-a", status)


def test_scores_appear_only_with_enough_new_records(tmp_path, fixed_sigma):
    job = fixed_sigma
    site = make_site(tmp_path)
    save_reference(site, "r1", train_start=0, train_end=48, heldout_end=12)
    arrive(site, 5, drifted=False)  # 4 training + 1 held-out record
    few = site_status(site, job, MONITOR)
    assert set(few) == BASE_KEYS
    assert (few["has-reference"], few["new-records"], few["reference-records"], few["train-records"]) == (1, 5, 60, 52)
    assert "not enough new data" in format_status("site-a", few)

    arrive(site, 25, drifted=False, step=2)
    enough = site_status(site, job, MONITOR)
    assert set(enough) == BASE_KEYS | SCORE_KEYS
    assert_scalars(enough)
    assert (enough["new-records"], enough["train-records"]) == (30, 72)
    assert "drift: tokens" in format_status("site-a", enough)
    windowed = dataclasses.replace(job, train=dataclasses.replace(job.train, window=50))
    assert site_status(site, windowed, MONITOR)["train-records"] == 50


def test_a_poll_with_nothing_changed_answers_the_kept_scores_without_loading_a_model(
    tmp_path, fixed_sigma, monkeypatch
):
    # Prepare: a site with enough new records, scored once.
    job = fixed_sigma
    site = make_site(tmp_path)
    save_reference(site, "r1", train_start=0, train_end=48, heldout_end=12)
    arrive(site, 25, drifted=True)
    first = site_status(site, job, MONITOR)
    loads = []

    def no_model(*args, **kwargs):
        loads.append(args)
        raise AssertionError("the model was loaded for unchanged data")

    monkeypatch.setattr(client.status, "site_model", no_model)

    # Execute: the same data again; then the same data with another adapter scaling, a record
    # rewritten in place at the same size, and one record more (each needs the model again).
    again = site_status(site, job, MONITOR)
    rescaled = dataclasses.replace(job, lora=dataclasses.replace(job.lora, alpha=job.lora.alpha * 2))
    with pytest.raises(AssertionError, match="loaded for unchanged"):
        site_status(site, rescaled, MONITOR)
    *kept, last = site.train_path.read_text().splitlines()
    record = json.loads(last)
    record["text"] = ("X" if record["text"][0] != "X" else "Y") + record["text"][1:]  # same size
    site.train_path.write_text("\n".join([*kept, json.dumps(record)]) + "\n")
    with pytest.raises(AssertionError, match="loaded for unchanged"):
        site_status(site, job, MONITOR)
    arrive(site, 1, drifted=True, step=2)
    with pytest.raises(AssertionError, match="loaded for unchanged"):
        site_status(site, job, MONITOR)

    # Assert: the same scores with no model loaded; a changed job or store is scored afresh.
    assert {k: again[k] for k in SCORE_KEYS} == {k: first[k] for k in SCORE_KEYS}
    assert len(loads) == 3


def test_drifted_arrivals_score_higher_than_undrifted_ones(tmp_path, fixed_sigma):
    job = fixed_sigma
    statuses = {}
    for drifted in (False, True):
        site = make_site(tmp_path / str(drifted))
        save_reference(site, "r1", train_start=0, train_end=48, heldout_end=12)
        arrive(site, 40, drifted=drifted)
        statuses[drifted] = site_status(site, job, MONITOR)
    same, shifted = statuses[False], statuses[True]
    print({k: (round(same[k], 4), round(shifted[k], 4)) for k in sorted(SCORE_KEYS)})
    assert same["drift-js"] < 0.03 < 0.15 < shifted["drift-js"]
    assert same["drift-hidden"] < 0.5 < 1.0 < shifted["drift-hidden"]
    gap = {d: s["loss-new"] - s["loss-reference"] for d, s in statuses.items()}
    assert gap[True] > gap[False] + 0.3


def test_the_installed_version_is_the_one_scored(tmp_path, fixed_sigma):
    job = fixed_sigma
    site = make_site(tmp_path)
    save_reference(site, "r1", train_start=0, train_end=48, heldout_end=12)
    arrive(site, 20, drifted=False)
    base = site_status(site, job, MONITOR)
    # Install version 3 by hand (the store does not verify; client/install/installer.py does).
    adapter = {k: np.full_like(v, 0.02) for k, v in adapter_arrays(site_model(job, "cpu").model).items()}
    files = {"adapter_model.safetensors": safetensors.torch.save(to_torch_state_dict(adapter))}
    ModelStore(site.model_store_path).install(VersionBundle(b'{"version": 3}', b"sig", files), via="publish")
    installed = site_status(site, job, MONITOR)
    assert (base["model-version"], installed["model-version"]) == (0, 3)
    assert installed["loss-new"] != pytest.approx(base["loss-new"], abs=1e-4)
    assert installed["drift-js"] == base["drift-js"] and installed["drift-hidden"] == base["drift-hidden"]


def test_can_afford_flips_when_the_ceiling_is_below_the_projection(tmp_path, job):
    site = make_site(tmp_path)
    projected = site_status(site, job, MONITOR)["epsilon-projected"]
    tight = dataclasses.replace(site, epsilon_ceiling=projected * 0.9)
    assert site_status(tight, job, MONITOR)["can-afford"] == 0
    plain = dataclasses.replace(job, privacy=dataclasses.replace(job.privacy, enabled=False))
    status = site_status(tight, plain, MONITOR)
    assert status["epsilon-projected"] == status["epsilon-spent"] == 0.0 and status["can-afford"] == 1


def test_a_charged_status_noises_the_counts_and_spends_exactly_one_release(tmp_path, fixed_sigma):
    # Prepare: z = 2 on 3 counts of sensitivity 1 -> std 2 * sqrt(3) each
    from fedretrain.privacy.accounting import epsilon_for_history
    from fedretrain.privacy.ledger import PrivacyLedger

    site = make_site(tmp_path, status_noise=2.0, ceiling=50.0, status_interval_s=0.0)
    save_reference(site, "r1", train_start=0, train_end=48, heldout_end=12)
    arrive(site, 5, drifted=False)

    # Execute
    replies = [site_status(site, fixed_sigma, MONITOR, charge=True) for _ in range(6)]

    # Assert: the counts are noised ints >= 0 (they vary), the std is stated, no score leaves
    counts = [r["new-records"] for r in replies]
    assert all(type(c) is int and c >= 0 for c in counts) and len(set(counts)) > 1
    assert replies[0]["count-std"] == pytest.approx(2.0 * 3**0.5)
    assert not SCORE_KEYS & set(replies[0])
    # Six polls are six Gaussian releases of multiplier 2 in the ledger, and epsilon is theirs exactly.
    ledger = PrivacyLedger.load(site.ledger_path, site_id="site-a", accountant="rdp", delta=1e-5)
    assert [(e.kind, e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries] == [
        ("status", 2.0, 1.0, 1)
    ] * 6
    assert replies[-1]["epsilon-spent"] == pytest.approx(epsilon_for_history([(2.0, 1.0, 6)], 1e-5, "rdp"))
    # The site's own view (not charged) is exact and spends nothing.
    local = site_status(site, fixed_sigma, MONITOR)
    assert (
        local["new-records"] == 5
        and len(PrivacyLedger.load(site.ledger_path, site_id="site-a", accountant="rdp", delta=1e-5).entries) == 6
    )


def test_polls_within_the_status_interval_get_the_same_counts_at_no_cost(tmp_path, fixed_sigma):
    from fedretrain.privacy.ledger import PrivacyLedger

    site = make_site(tmp_path, status_noise=2.0, ceiling=50.0, status_interval_s=3600.0)
    save_reference(site, "r1", train_start=0, train_end=48, heldout_end=12)
    first = site_status(site, fixed_sigma, MONITOR, charge=True)
    arrive(site, 5, drifted=False)  # new data, but the interval has not passed: the same answer
    again = site_status(site, fixed_sigma, MONITOR, charge=True)
    keys = ("new-records", "reference-records", "train-records", "count-std")
    assert [again[k] for k in keys] == [first[k] for k in keys]
    assert len(PrivacyLedger.load(site.ledger_path, site_id="site-a", accountant="rdp", delta=1e-5).entries) == 1


def test_a_full_disk_at_a_site_refuses_the_poll_and_leaves_its_ledger_and_counts_as_they_were(
    tmp_path, fixed_sigma, monkeypatch
):
    import errno
    import os

    from client.handlers import refusal

    # Prepare: a site that answered one charged poll; then new records, and a full disk.
    site = make_site(tmp_path, status_noise=2.0, ceiling=50.0, status_interval_s=0.0)
    save_reference(site, "r1", train_start=0, train_end=48, heldout_end=12)
    site_status(site, fixed_sigma, MONITOR, charge=True)
    kept = {path: path.read_bytes() for path in (site.ledger_path, site.state_path / "last_status.json")}
    arrive(site, 5, drifted=False)
    opened = os.fdopen

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(opened(fd, *a, **k)))

    # Execute
    with pytest.raises(OSError, match="No space left on device") as failed:
        site_status(site, fixed_sigma, MONITOR, charge=True)
    monkeypatch.undo()

    # Assert: nothing half-written (no temporary file left either), nothing spent for the
    # reply that never left, and the error reply says why without a path of the site's.
    assert {path: path.read_bytes() for path in kept} == kept
    assert not list(site.state_path.glob(".*.tmp"))
    code, reason = refusal("query.status", failed.value)
    assert code == 4199 and "No space left on device" in reason and str(tmp_path) not in reason


def test_a_status_poll_past_the_ceiling_is_refused_and_spends_nothing(tmp_path, fixed_sigma):
    from fedretrain.errors import PrivacyBudgetExceeded

    site = make_site(tmp_path, status_noise=2.0, ceiling=0.5)  # one release of z = 2 costs more than 0.5
    with pytest.raises(PrivacyBudgetExceeded, match="ceiling"):
        site_status(site, fixed_sigma, MONITOR, charge=True)
    assert not site.ledger_path.exists()


def test_the_status_reply_carries_scalars_and_the_site_id_only(tmp_path, fixed_sigma, monkeypatch):
    # Prepare: a trained site with drifted new records, asked through the real ClientApp
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import make_client_app

    for name, value in (("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    # A research site that opted in to sharing its (un-noised) drift scores.
    site = make_site(tmp_path, share_drift_scores=True)
    save_reference(site, "cycle-1", 0, 48, 12)
    arrive(site, 30, drifted=True)
    texts = [
        json.loads(line)["text"]
        for path in (site.train_path, site.heldout_path)
        for line in path.read_text().splitlines()
    ]
    msg = Message(
        RecordDict(
            {
                "config": ConfigRecord(fixed_sigma.to_flat()),
                "monitor": ConfigRecord(dataclasses.asdict(MonitorConfig(sample_records=40))),
            }
        ),
        dst_node_id=7,
        message_type="query.status",
    )
    context = Context(run_id=1, node_id=7, node_config=site.to_node_config(), state=RecordDict(), run_config={})

    # Execute
    reply = make_client_app()(msg, context)

    # Assert: two records, scores included, every value a number; no text, token or record id anywhere
    assert not reply.has_error()
    assert set(reply.content) == {"metrics", "site"}
    assert dict(reply.content["site"]) == {"site-id": site.site_id}
    metrics = dict(reply.content["metrics"])
    assert {"drift-js", "drift-hidden", "loss-new", "loss-reference"} <= set(metrics)
    assert_scalars(metrics)
    assert len(reply.content.array_records) == 0
    dumped = json.dumps(metrics)
    assert not any(word in dumped for text in texts[:20] for word in text.split()[:3] if len(word) > 4)


def test_a_truncated_store_drops_the_reference_instead_of_refusing_every_poll(tmp_path, fixed_sigma):
    site = make_site(tmp_path)
    save_reference(site, "cycle-1", 0, 100, 12)  # the store held 100 training records then; 48 now

    status = site_status(site, fixed_sigma, MONITOR)

    assert (status["has-reference"], status["new-records"], status["reference-records"]) == (0, 0, 0)
    assert not SCORE_KEYS & set(status)

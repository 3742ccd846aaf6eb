"""The privacy promise holds against the coordinator (issue: secret noise, no oracle, every
disclosure charged): a replay with the job's seed does not reproduce a site's update, evaluate
answers once per round it trained, nothing in a train reply depends on the records, and a cycle
that cannot finish is refused before any spend.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from client.round.site import evaluate_round, train_round
from fedretrain.config import Job, SiteConfig, compose_config, site_config_from_node_config
from fedretrain.errors import ConfigError, EvaluationRefused, PrivacyBudgetExceeded
from fedretrain.modeling.lora_model import adapter_arrays, load_lora_model
from fedretrain.privacy.accounting import epsilon_for_history, sigma_to_fit
from fedretrain.privacy.ledger import PrivacyLedger
from fedretrain.privacy.release import gaussian_release

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "site-a"


@pytest.fixture(scope="module")
def job() -> Job:
    cfg = compose_config(["experiment=smoke", "train.local_steps=3", "rounds=2", "privacy.noise_multiplier=1.0"])
    return Job.from_config(cfg, run_id="promise")


@pytest.fixture(scope="module")
def initial(job):
    return adapter_arrays(load_lora_model(job.model, job.lora, seed=job.seed, device="cpu").model)


def make_site(tmp_path: Path, name: str = "site", *, records: int | None = None, **settings) -> SiteConfig:
    data = tmp_path / name
    shutil.copytree(EXAMPLE, data)
    if records is not None:
        lines = (data / "train.jsonl").read_text().splitlines(keepends=True)
        (data / "train.jsonl").write_text("".join(lines[:records]))
    return SiteConfig(
        site_id="site-a", data_dir=str(data), epsilon_ceiling=settings.pop("ceiling", 50.0), delta=1e-5, **settings
    )


def ledger_of(site: SiteConfig) -> PrivacyLedger:
    return PrivacyLedger.load(site.ledger_path, site_id=site.site_id, accountant=site.accountant, delta=site.delta)


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# --- secret noise --------------------------------------------------------------------------------


def test_a_replay_with_the_jobs_seed_does_not_reproduce_a_sites_update(tmp_path, job, initial):
    # Prepare: two copies of one site, the same data, job, seed, round and global adapter. The
    # old seeding (crc32 of job.seed, site id, round) made the two updates equal to the bit, so a
    # coordinator could replay training with and without a record and read membership off them.
    first, replay = make_site(tmp_path, "a"), make_site(tmp_path, "b")

    # Execute
    one = train_round(first, job, initial, server_round=1).adapter
    two = train_round(replay, job, initial, server_round=1).adapter

    # Assert: the noise was drawn at each site, so the updates differ by far more than rounding.
    assert max_diff(one, two) > 1e-3


def test_reproducible_noise_is_a_simulated_sites_opt_in_only(tmp_path, job, initial):
    replayable = dataclasses.replace(job, privacy=dataclasses.replace(job.privacy, reproducible_noise=True))
    # A site that has not opted in refuses the job before training or spending.
    site = make_site(tmp_path, "a")
    with pytest.raises(ConfigError, match="refuses privacy.reproducible_noise=true"):
        train_round(site, replayable, initial, server_round=1)
    assert not site.ledger_path.exists()
    # A deployed site's node config cannot opt in at all.
    node_config = {
        "site-id": "h1",
        "data-dir": str(tmp_path),
        "epsilon-ceiling": 8.0,
        "delta": 1e-5,
        "allow-reproducible-noise": True,
    }
    with pytest.raises(ConfigError, match="allow-reproducible-noise: only a simulated site"):
        site_config_from_node_config(node_config)
    assert site_config_from_node_config(node_config, simulation=True).allow_reproducible_noise
    # In simulation, with the site's consent, the researcher's replay is exact.
    a = dataclasses.replace(make_site(tmp_path, "b"), allow_reproducible_noise=True)
    b = dataclasses.replace(make_site(tmp_path, "c"), allow_reproducible_noise=True)
    assert (
        max_diff(
            train_round(a, replayable, initial, server_round=1).adapter,
            train_round(b, replayable, initial, server_round=1).adapter,
        )
        == 0.0
    )


# --- what a train reply discloses ---------------------------------------------------------------


def test_a_train_reply_says_nothing_that_depends_on_the_number_of_records(tmp_path, job, initial):
    big, small = make_site(tmp_path, "big"), make_site(tmp_path, "small", records=24)

    metrics_big = train_round(big, job, initial, server_round=1).metrics
    metrics_small = train_round(small, job, initial, server_round=1).metrics

    # 48 and 24 records: the same job's rate, sigma, steps and so the same epsilon.
    assert metrics_big == metrics_small
    assert metrics_big["sample-rate"] == job.privacy.sample_rate


# --- evaluate is not an oracle ------------------------------------------------------------------


def test_evaluate_answers_once_for_the_final_round_it_trained_and_charges_it(tmp_path, job, initial):
    # Prepare: a one-round cycle, so round 1 is its final round.
    one_round = dataclasses.replace(job, rounds=1)
    site = make_site(tmp_path, eval_noise=4.0)
    with pytest.raises(EvaluationRefused, match="did not train in round 1"):
        evaluate_round(site, one_round, initial, server_round=1)
    update = train_round(site, one_round, initial, server_round=1).adapter
    spent_training = ledger_of(site).epsilon()

    # A round that is not the cycle's last (here the job plans two): refused, nothing spent.
    with pytest.raises(EvaluationRefused, match="not the last round"):
        evaluate_round(site, job, update, server_round=1)
    # The final candidate: answered and charged as one Gaussian release of z = 4.
    first = evaluate_round(site, one_round, update, server_round=1).metrics
    ledger = ledger_of(site)
    assert [(e.kind, e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries] == [
        ("train", 1.0, job.privacy.sample_rate, 3),
        ("evaluate", 4.0, 1.0, 1),
    ]
    assert ledger.epsilon() == pytest.approx(
        epsilon_for_history([(1.0, job.privacy.sample_rate, 3), (4.0, 1.0, 1)], 1e-5)
    )
    assert ledger.epsilon() > spent_training and first["epsilon"] == pytest.approx(ledger.epsilon())
    # The same candidate again: the same answer, no new spend, no fresh noise to average away.
    assert evaluate_round(site, one_round, update, server_round=1).metrics == first
    assert len(ledger_of(site).entries) == 2
    # Another adapter for the same round (a probe of the coordinator's choosing): refused.
    probe = {k: v + 0.01 for k, v in update.items()}
    with pytest.raises(EvaluationRefused, match="already scored the round's candidate"):
        evaluate_round(site, one_round, probe, server_round=1)
    assert len(ledger_of(site).entries) == 2


def test_evaluate_refuses_a_baseline_that_is_not_the_installed_version(tmp_path, job, initial):
    job = dataclasses.replace(job, rounds=1)
    site = make_site(tmp_path)
    update = train_round(site, job, initial, server_round=1).adapter
    # Nothing is installed at this site, so the only baseline is the bare base model (None).
    with pytest.raises(EvaluationRefused, match="not the version installed"):
        evaluate_round(site, job, update, baseline=update, server_round=1)


def test_a_site_may_answer_no_evaluation_at_all(tmp_path, job, initial):
    job = dataclasses.replace(job, rounds=1)
    site = make_site(tmp_path, share_evaluation=False)
    update = train_round(site, job, initial, server_round=1).adapter
    with pytest.raises(EvaluationRefused, match="share-evaluation=false"):
        evaluate_round(site, job, update, server_round=1)


# --- lifetime-aware sigma -----------------------------------------------------------------------


def between_one_and_two_rounds(job: Job) -> float:
    """A ceiling that one round (and the final evaluation) fits but not the two planned."""
    q = job.privacy.sample_rate
    one = epsilon_for_history([(1.0, q, 3), (4.0, 1.0, 1)], 1e-5)
    two = epsilon_for_history([(1.0, q, 6), (4.0, 1.0, 1)], 1e-5)
    assert one < two
    return (one + two) / 2


def test_a_cycle_that_cannot_finish_is_refused_before_any_spend(tmp_path, job, initial):
    site = make_site(tmp_path, ceiling=between_one_and_two_rounds(job))

    with pytest.raises(PrivacyBudgetExceeded, match="the 2 remaining round"):
        train_round(site, job, initial, server_round=1)
    assert not site.ledger_path.exists()


def test_fit_sigma_to_ceiling_chooses_a_sigma_the_whole_cycle_fits(tmp_path, job, initial):
    # Prepare: the same tight ceiling, a site that asks for sigma to fit it; the job asks sigma 1.
    site = make_site(tmp_path, ceiling=between_one_and_two_rounds(job), fit_sigma_to_ceiling=True)

    # Execute: both rounds and the final evaluation
    update = train_round(site, job, initial, server_round=1).adapter
    update = train_round(site, job, update, server_round=2).adapter
    evaluate_round(site, job, update, server_round=2)

    # Assert: a larger sigma than the job's, and the whole cycle within the ceiling
    ledger = ledger_of(site)
    sigmas = {e.noise_multiplier for e in ledger.entries if e.kind == "train"}
    assert len(sigmas) == 1 and sigmas.pop() > 1.0
    assert ledger.epsilon() <= site.epsilon_ceiling


def test_sigma_to_fit_is_the_smallest_that_fits_by_hand():
    # One release already spent; 30 steps at q = 0.05 must fit the rest of a ceiling of 3.
    history = ((8.0, 1.0, 1),)
    sigma = sigma_to_fit(history, 0.05, 30, 3.0, 1e-5)
    fits = epsilon_for_history([*history, (sigma, 0.05, 30)], 1e-5)
    just_below = epsilon_for_history([*history, (sigma / 1.01, 0.05, 30)], 1e-5)
    assert fits <= 3.0 < just_below


# --- the mechanism and the ledger ---------------------------------------------------------------


def test_gaussian_release_scales_each_noise_by_its_sensitivity():
    rng = np.random.default_rng(0)
    draws = [gaussian_release({"n": 0.0, "s": 0.0}, {"n": 1.0, "s": 3.0}, 2.0, rng) for _ in range(4000)]
    # K = 2: std = 2 * sqrt(2) * sensitivity
    assert draws[0].stds == pytest.approx({"n": 2 * 2**0.5, "s": 6 * 2**0.5})
    assert np.std([d.values["s"] for d in draws]) == pytest.approx(6 * 2**0.5, rel=0.05)
    with pytest.raises(ValueError, match="sensitivity"):
        gaussian_release({"n": 0.0}, {"n": 0.0}, 2.0)


def test_a_ledger_of_schema_1_reads_as_training_rounds(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "site_id": "s",
                "accountant": "rdp",
                "delta": 1e-5,
                "entries": [
                    {
                        "run_id": "r",
                        "round": 1,
                        "noise_multiplier": 1.0,
                        "sample_rate": 0.05,
                        "steps": 30,
                        "recorded_at": "2026-01-01",
                    }
                ],
            }
        )
    )
    ledger = PrivacyLedger.load(path, site_id="s", accountant="rdp", delta=1e-5)
    assert [e.kind for e in ledger.entries] == ["train"] and ledger.trained("r", 1)

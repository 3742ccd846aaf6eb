"""Which records a site trains on (client/round/selection.py): each rule, the per-record property
that keeps DP-SGD's guarantee, the site's secret coins, and a round refused before any spend when
nothing is selected."""

from __future__ import annotations

import dataclasses
import stat

import pytest
from test_install import job, make_site  # noqa: F401  (module fixtures)

from client.round.selection import select, selection_key
from client.round.site import site_model, train_round
from fedretrain.config import TrainConfig, build
from fedretrain.data.notes import read_records
from fedretrain.errors import ConfigError
from fedretrain.modeling.lora_model import adapter_arrays
from fedretrain.privacy.ledger import PrivacyLedger

TEXTS = [f"note {i}: " + "word " * (i % 7) for i in range(200)]
KEY = bytes(range(32))


def with_train(job, **train):  # noqa: F811
    return dataclasses.replace(job, train=dataclasses.replace(job.train, **train))


def losses(texts):
    return [float(len(t)) / 10 for t in texts]  # a stand-in score: longer notes are "harder"


def test_each_rule_selects_what_it_says(job):  # noqa: F811
    assert select(TEXTS, with_train(job, selection="all"), KEY, losses) == list(range(200))
    assert select(TEXTS, with_train(job, selection="newest", selection_share=0.1), KEY, losses) == list(range(180, 200))
    random = select(TEXTS, with_train(job, selection="random", selection_share=0.25), KEY, losses)
    assert 30 <= len(random) <= 70  # binomial(200, 0.25): 50 +- 6
    assert random == select(TEXTS, with_train(job, selection="random", selection_share=0.25), KEY, losses)
    other_cycle = dataclasses.replace(with_train(job, selection="random", selection_share=0.25), run_id="next")
    assert random != select(TEXTS, other_cycle, KEY, losses)  # new coins every cycle
    sure = with_train(job, selection="uncertainty", selection_threshold=1.2, selection_share=0.0)
    assert [TEXTS[i] for i in select(TEXTS, sure, KEY, losses)] == [t for t in TEXTS if len(t) / 10 >= 1.2]


@pytest.mark.parametrize("rule", ["uncertainty", "random"])
def test_one_record_more_changes_the_selection_by_that_record_only(job, rule):  # noqa: F811
    # The per-record property behind "no extra accounting": neighbouring data sets stay neighbouring.
    settings = with_train(job, selection=rule, selection_threshold=1.2, selection_share=0.3)
    before = {TEXTS[i] for i in select(TEXTS, settings, KEY, losses)}
    more = [*TEXTS[:100], "an extra note: " + "word " * 9, *TEXTS[100:]]
    after = {more[i] for i in select(more, settings, KEY, losses)}
    assert after - before <= {more[100]} and before <= after


def test_nothing_selected_is_a_clear_refusal(job):  # noqa: F811
    none = with_train(job, selection="uncertainty", selection_threshold=99.0, selection_share=0.0)
    with pytest.raises(ConfigError, match="kept none of this site's 200 records.*selection_threshold"):
        select(TEXTS, none, KEY, losses)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"selection": "hardest"}, "selection"),
        ({"selection": "uncertainty"}, "selection_threshold"),
        ({"selection": "random", "selection_share": 0}, "trains on nothing"),
        ({"selection_share": 1.5}, "selection_share"),
    ],
)
def test_bad_selection_settings_name_the_key(train, message):
    with pytest.raises(ConfigError, match=f"train.*{message}"):
        build(TrainConfig, train, "train")


def test_the_selection_key_is_the_sites_own_secret(tmp_path):
    key = selection_key(tmp_path)
    assert len(key) == 32 and selection_key(tmp_path) == key
    assert stat.S_IMODE((tmp_path / "selection.key").stat().st_mode) == 0o600


def test_a_round_trains_on_the_uncertain_records_and_refuses_before_spending_when_there_are_none(tmp_path, job):  # noqa: F811
    site = make_site(tmp_path, None)
    adapter = adapter_arrays(site_model(job, "cpu").model)
    ledger = site.ledger_path

    def spent() -> int:
        return (
            len(PrivacyLedger.load(ledger, site_id=site.site_id, accountant="rdp", delta=site.delta).entries)
            if ledger.exists()
            else 0
        )

    sure = with_train(job, selection="uncertainty", selection_threshold=0.0, local_steps=1)
    assert train_round(site, sure, adapter, 1).metrics["steps"] == 1 and spent() == 1
    none = dataclasses.replace(
        with_train(job, selection="uncertainty", selection_threshold=99.0, selection_share=0.0), run_id="other"
    )
    with pytest.raises(ConfigError, match="kept none"):
        train_round(site, none, adapter, 1)
    assert spent() == 1


def test_replay_keeps_the_previous_cycles_window_for_the_whole_cycle(tmp_path, job):  # noqa: F811
    from client.round.selection import replay_window, replayed

    # Round 1 of cycle B: the reference is cycle A's window; later rounds find it kept.
    assert replay_window(tmp_path, "B", ("A", 10, 50)) == (10, 50)
    assert replay_window(tmp_path, "B", ("B", 50, 90)) == (10, 50)
    assert replay_window(tmp_path, "C", ("C", 0, 5)) is None  # no earlier cycle than this one's own
    old = [f"old note {i}" for i in range(400)]
    settings = with_train(job, replay=0.25)
    mixed = replayed(old, ["old note 3"], settings, KEY)
    assert "old note 3" not in mixed and 70 <= len(mixed) <= 130  # binomial(399, 0.25): ~100 +- 9
    assert replayed(old, [], with_train(job, replay=0.0), KEY) == []


def test_a_round_with_replay_trains_on_the_previous_window_too(tmp_path, job, monkeypatch):  # noqa: F811
    import client.round.site as site_module

    site = make_site(tmp_path, None)
    adapter = adapter_arrays(site_model(job, "cpu").model)
    first = with_train(job, local_steps=1, window=10)
    train_round(site, first, adapter, 1)  # cycle A trains the newest 10 records; its window is the reference
    seen: list[list[str]] = []
    real = site_module._train_and_record
    monkeypatch.setattr(
        site_module,
        "_train_and_record",
        lambda s, j, a, r, texts, mu=0.0: (seen.append(texts), real(s, j, a, r, texts, mu))[1],
    )
    second = dataclasses.replace(with_train(job, local_steps=1, window=5, replay=1.0), run_id="cycle-b")
    train_round(site, second, adapter, 1)
    records = [r.text for r in read_records(site.train_path)]
    assert seen[0] == records[-5:] + records[-10:-5]  # the window, then the rest of cycle A's window


def test_the_curriculum_pool_grows_from_easy_to_hard_round_by_round(job):  # noqa: F811
    from client.round.selection import curriculum_threshold, paced

    paced_job = dataclasses.replace(with_train(job, curriculum_start=1.0, curriculum_end=2.0), rounds=3)
    assert [curriculum_threshold(paced_job, r) for r in (1, 2, 3)] == [1.0, 1.5, 2.0]
    pools = [paced(TEXTS, paced_job, r, losses) for r in (1, 2, 3)]
    assert len(pools[0]) < len(pools[1]) < len(pools[2]) and set(pools[0]) <= set(pools[1]) <= set(pools[2])
    assert all(losses([TEXTS[i]])[0] <= 1.0 for i in pools[0])
    assert paced(TEXTS, job, 1, losses) == list(range(200))  # no curriculum: everything
    with pytest.raises(ConfigError, match="round 1's pool"):
        paced(
            TEXTS, dataclasses.replace(with_train(job, curriculum_start=0.1, curriculum_end=2.0), rounds=3), 1, losses
        )
    with pytest.raises(ConfigError, match="curriculum_end"):
        build(TrainConfig, {"curriculum_start": 2.0, "curriculum_end": 1.0}, "train")
    with pytest.raises(ConfigError, match="both"):
        build(TrainConfig, {"curriculum_start": 2.0}, "train")


def test_a_round_under_a_curriculum_trains_and_refuses_an_empty_pool_before_spending(tmp_path, job):  # noqa: F811
    site = make_site(tmp_path, None)
    adapter = adapter_arrays(site_model(job, "cpu").model)
    easy = dataclasses.replace(with_train(job, local_steps=1, curriculum_start=50.0, curriculum_end=60.0), rounds=2)
    assert train_round(site, easy, adapter, 1).metrics["steps"] == 1
    hard = dataclasses.replace(with_train(job, local_steps=1, curriculum_start=0.0, curriculum_end=0.1), run_id="x")
    before = site.ledger_path.read_bytes()
    with pytest.raises(ConfigError, match="pool"):
        train_round(site, hard, adapter, 1)
    assert site.ledger_path.read_bytes() == before


def test_the_drift_scenario_takes_every_option():
    from fedretrain.config import compose_config

    cfg = compose_config(
        [
            "experiment=drift",
            "train.selection=uncertainty",
            "train.selection_threshold=3.5",
            "train.selection_share=0.2",
            "train.replay=0.25",
            "train.curriculum_start=3",
            "train.curriculum_end=6",
            "train.require_review=false",
        ]
    )
    assert (cfg.train.selection, cfg.train.replay, cfg.train.curriculum_end) == ("uncertainty", 0.25, 6.0)
    assert cfg.scenario.name == "drift"

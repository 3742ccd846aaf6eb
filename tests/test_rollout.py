"""The staged rollout's pieces: the registry's signed withdrawal, a canary site's trial (verified,
served in shadow or A/B, reported noised and charged once, withdrawn or ended by promotion), and
the coordinator's choice of canaries and its verdict on their figures.

The whole rollout through Flower's simulation engine is tests/test_rollout_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient
from test_install import coordinator, delivered, job, make_site, publish, resigned  # noqa: F401  (module fixtures)
from test_site_serve import site  # noqa: F401  (a site that installed version 1)

from client.handlers import answer
from client.install.installer import receive_version
from client.install.model_store import ModelStore
from client.install.trial import current_trial, receive_trial, withdraw_trial
from client.serve.app import ServedModel, create_app
from client.serve.canary import canary_report
from client.serve.journal import Journal
from client.serve.replay import read_traffic, replay
from fedretrain.config import PublishConfig, build
from fedretrain.errors import ConfigError, DataValidationError, RegistryError, VerificationError
from fedretrain.privacy.ledger import PrivacyLedger
from fedretrain.registry.bundle import WithdrawalRecord
from fedretrain.registry.signing import generate_keypair, load_private_key
from fedretrain.registry.store import Registry
from server.cycle.rollout import HOLD, PROMOTE, ROLLBACK, choose_canaries, decide, judge

SHADOW = {"mode": "shadow", "ab-share": 0.5, "min-feedback": 4}


# -- the registry ---------------------------------------------------------------------------------


def test_a_pending_version_is_withdrawn_with_a_signed_record_and_can_never_be_approved(tmp_path, job):  # noqa: F811
    keys = generate_keypair(tmp_path / "keys")
    key = load_private_key(keys.private_path)
    registry = Registry(tmp_path / "registry")
    publish(registry, key, job, tmp_path / "a1", 0.01)
    pending = publish(registry, key, job, tmp_path / "a2", 0.02, require_approval=True)
    assert registry.status(pending) == "pending"

    record = registry.withdraw(pending, signing_key=key, reason="canary site-00: worse")
    assert registry.status(pending) == "withdrawn" and registry.champion() == 1
    assert registry.withdrawal(pending) == record and record.record["reason"] == "canary site-00: worse"
    assert registry.check().ok
    with pytest.raises(RegistryError, match="is withdrawn; only a pending version can be approved"):
        registry.approve(pending, signing_key=key, approver="me")
    with pytest.raises(RegistryError, match="only a pending version can be withdrawn"):
        registry.withdraw(1, signing_key=key, reason="no")

    # A withdrawal that is not the coordinator's is found by the audit.
    folder = registry.version_dir(pending)
    (folder / "withdrawal.json").write_bytes(record.payload_bytes.replace(b"worse", b"fine!"))
    assert any("withdrawal" in p for p in registry.check().problems)


# -- the canary site --------------------------------------------------------------------------------


def test_a_canary_verifies_the_version_on_trial_and_refuses_a_forged_or_stale_one(site, job, coordinator):  # noqa: F811
    registry, key, _ = coordinator
    v2 = registry.bundle(2)
    forged = resigned(v2, load_private_key(generate_keypair(Path(site.data_dir) / "other").private_path))
    with pytest.raises(VerificationError, match="signature"):
        receive_trial(site, job, forged, SHADOW)
    with pytest.raises(VerificationError, match="not newer"):
        receive_trial(site, job, registry.bundle(1), SHADOW)
    with pytest.raises(ConfigError, match="rollout.mode"):
        receive_trial(site, job, v2, {**SHADOW, "mode": "canary"})
    store = ModelStore(site.model_store_path)
    assert current_trial(store) is None

    metrics = receive_trial(site, job, v2, SHADOW)
    assert metrics == {"trial-version": 2, "already-on-trial": 0, "installed-version": 1}
    assert receive_trial(site, job, v2, SHADOW)["already-on-trial"] == 1  # a re-send
    trial, _ = current_trial(store)
    assert (trial.version, trial.mode, store.state().current) == (2, "shadow", 1)  # installed: still 1


def test_shadow_serves_the_installed_answer_and_journals_both(site, job, coordinator):  # noqa: F811
    registry, _, _ = coordinator
    receive_trial(site, job, registry.bundle(2), SHADOW)
    journal = Journal.at(site.state_path)
    client = TestClient(create_app(site, journal, ServedModel(site)), base_url="http://127.0.0.1")
    body = client.post("/v1/completions", json={"prompt": "Patient presents with", "max_tokens": 5}).json()
    assert body["model"] == "fedretrain-v1"
    kept = journal.request(body["id"])
    assert kept["trial"] == {"version": 2, "mode": "shadow", "installed": 1}
    assert kept["shadow"]["version"] == 2 and isinstance(kept["shadow"]["completion"], str)


def test_ab_serves_each_version_by_its_share(site, job, coordinator):  # noqa: F811
    registry, _, _ = coordinator
    receive_trial(site, job, registry.bundle(2), {**SHADOW, "mode": "ab", "ab-share": 0.5})
    served = ServedModel(site)
    versions = [served.answer(f"Note {i}:", 1, 0.0, 0)["version"] for i in range(40)]
    assert set(versions) == {1, 2} and 8 <= versions.count(2) <= 32  # binomial(40, 0.5): p < 1e-4 outside


def test_the_canary_report_waits_for_feedback_then_is_noised_charged_once_and_kept(site, job, coordinator):  # noqa: F811
    registry, _, _ = coordinator
    receive_trial(site, job, registry.bundle(2), SHADOW)
    assert canary_report(site, job) == {"trial-version": 2, "ready": 0}
    traffic = Path(site.data_dir) / "traffic.jsonl"
    lines = [{"prompt": f"Patient {i} presents with", "correction": " chest pain, stable."} for i in range(5)]
    traffic.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert replay(site, traffic) == {"replayed": 5, "replayed-corrections": 5, "replayed-ratings": 0}

    report = canary_report(site, job)
    assert report["ready"] == 1 and report["trial-version"] == 2
    # The sums of an evaluation reply, noised (std from the site's eval-noise), no ratings in shadow.
    assert {"num-examples", "diff-sum", "diff-sumsq", "diff-sum-std", "eval-clip", "epsilon"} <= set(report)
    assert not any(key.startswith("ab-") for key in report)
    assert report["diff-sum-std"] == pytest.approx(site.eval_noise * np.sqrt(3) * site.eval_clip)

    def canary_releases() -> int:
        ledger = PrivacyLedger.load(site.ledger_path, site_id=site.site_id, accountant="rdp", delta=site.delta)
        return [e.kind for e in ledger.entries].count("canary")

    assert canary_releases() == 1
    # Asked again: the same figures, nothing spent again.
    assert canary_report(site, job) == report
    assert canary_releases() == 1


def test_a_signed_withdrawal_ends_the_trial_and_the_version_is_never_trialled_again(site, job, coordinator):  # noqa: F811
    registry, key, _ = coordinator
    receive_trial(site, job, registry.bundle(2), SHADOW)
    from fedretrain.registry.manifest import format_time, utc_now
    from fedretrain.registry.signing import canonical_json, key_id, sign

    def withdrawal(signer, version: int) -> WithdrawalRecord:
        body = {
            "kind": "withdrawal",
            "version": version,
            "reason": "worse at the canaries",
            "created_at": format_time(utc_now()),
            "key_id": key_id(signer.public_key()),
        }
        payload = canonical_json(body)
        return WithdrawalRecord(payload, sign(signer, payload))

    other = load_private_key(generate_keypair(Path(site.data_dir) / "other").private_path)
    with pytest.raises(VerificationError, match="signature"):
        withdraw_trial(site, withdrawal(other, 2))
    assert current_trial(ModelStore(site.model_store_path)) is not None

    assert withdraw_trial(site, withdrawal(key, 2)) == {"withdrawn-version": 2, "trial-ended": 1}
    assert current_trial(ModelStore(site.model_store_path)) is None
    with pytest.raises(VerificationError, match="was withdrawn here"):
        receive_trial(site, job, registry.bundle(2), SHADOW)
    assert ModelStore(site.model_store_path).state().current == 1


def test_installing_the_version_on_trial_ends_the_trial(site, job, coordinator):  # noqa: F811
    registry, _, _ = coordinator
    receive_trial(site, job, registry.bundle(2), SHADOW)
    metrics = receive_version(site, job, delivered(registry, 2)).metrics
    assert metrics["installed-version"] == 2 and metrics["trial-ended"] == 1
    assert current_trial(ModelStore(site.model_store_path)) is None


def test_messages_reach_the_trial_through_the_sites_handlers(site, job, coordinator):  # noqa: F811
    from flwr.app import ConfigRecord, RecordDict

    registry, _, _ = coordinator
    content = RecordDict(
        {
            "version": ConfigRecord(dict(registry.bundle(2).to_mapping())),
            "rollout": ConfigRecord(SHADOW),
            "config": ConfigRecord(job.to_flat()),
        }
    )
    reply = answer(site, "query.trial", content)
    assert reply["metrics"]["trial-version"] == 2 and reply["site"]["site-id"] == site.site_id
    asked = answer(site, "query.canary", RecordDict({"config": ConfigRecord(job.to_flat())}))
    assert dict(asked["metrics"]) == {"trial-version": 2, "ready": 0}


def test_a_replay_file_is_checked_line_by_line(tmp_path):
    path = tmp_path / "traffic.jsonl"
    path.write_text('{"prompt": "a", "correction": "b"}\n\n{"prompt": ""}\n')
    with pytest.raises(DataValidationError, match=r"traffic.jsonl:3: field .prompt."):
        read_traffic(path)
    path.write_text('{"prompt": "a", "max_tokens": 0}\n')
    with pytest.raises(DataValidationError, match="max_tokens"):
        read_traffic(path)
    path.write_text("not json\n")
    with pytest.raises(DataValidationError, match=r"traffic.jsonl:1: field .line."):
        read_traffic(path)


def test_a_deployed_site_may_not_replay_traffic():
    from fedretrain.config import site_config_from_node_config

    node = {"site-id": "a", "data-dir": "/x", "epsilon-ceiling": 8.0, "delta": 1e-5, "replay-traffic": "/t.jsonl"}
    with pytest.raises(ConfigError, match="replay-traffic: only a simulated site"):
        site_config_from_node_config(node)
    assert site_config_from_node_config(node, simulation=True).replay_traffic == "/t.jsonl"


# -- the coordinator's side -----------------------------------------------------------------------


def test_canaries_are_the_named_sites_or_a_share_drawn_with_the_seed():
    sites = {f"site-{i:02d}": i + 1 for i in range(5)}
    assert choose_canaries(PublishConfig(canary=("site-03", "site-01")), sites, 0, 2) == ["site-01", "site-03"]
    share = PublishConfig(canary=0.4)
    drawn = choose_canaries(share, sites, 0, 2)
    assert len(drawn) == 2 and drawn == choose_canaries(share, sites, 0, 2)
    # At least one canary, and at least one site left out.
    assert len(choose_canaries(PublishConfig(canary=0.01), sites, 0, 2)) == 1
    assert len(choose_canaries(PublishConfig(canary=0.99), sites, 0, 2)) == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"canary": 1.5}, "canary: a share"),
        ({"canary": []}, "at least one site"),
        ({"canary": ["a", "a"]}, "named twice"),
        ({"canary": "site-00"}, "expected a list or float"),
        ({"mode": "canary"}, "mode"),
        ({"min_feedback": 1}, "min_feedback"),
        ({"tolerance": -1}, "tolerance"),
    ],
)
def test_bad_rollout_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=f"publish.*{message}"):
        build(PublishConfig, override, "publish")


def report(change: float, n: float = 200, spread: float = 0.1, noise: float = 1.0, **extra) -> dict:
    """A canary's metrics: ``n`` corrected answers whose loss changes by ``change`` on average."""
    return {
        "num-examples": n,
        "diff-sum": change * n,
        "diff-sumsq": n * (change**2 + spread**2),
        "num-examples-std": noise,
        "diff-sum-std": noise,
        "diff-sumsq-std": noise,
        "eval-clip": 1.0,
        "ready": 1,
        **extra,
    }


def test_the_verdict_follows_the_interval_of_each_canary():
    policy = PublishConfig(canary=("a",), tolerance=0.0)
    assert judge("a", report(+0.2), policy).verdict == "worse"
    assert judge("a", report(-0.2), policy).verdict == "not worse"
    assert judge("a", report(+0.005), policy).verdict == "inconclusive"
    # The noise widens the interval: a sure change under heavy noise is inconclusive.
    assert judge("a", report(-0.05, noise=40.0), policy).verdict == "inconclusive"
    figures = judge("a", report(+0.2), policy).figures["corrections"]
    assert figures["ci_low"] > 0 and figures["change"] == pytest.approx(0.2)


def test_ab_ratings_can_show_a_candidate_worse_though_its_corrections_do_not():
    policy = PublishConfig(canary=("a",), mode="ab", rating_tolerance=0.05)
    zero = {f"ab-{arm}-{k}-std": 1.0 for arm in ("trial", "installed") for k in ("good", "rated")}
    ratings = {"ab-trial-good": 40, "ab-trial-rated": 200, "ab-installed-good": 150, "ab-installed-rated": 200}
    verdict = judge("a", report(-0.2, **zero, **ratings), policy)
    assert verdict.verdict == "worse" and verdict.figures["ratings"]["change"] == pytest.approx(0.2 - 0.75)
    # Equal shares of 200 ratings each cannot rule out a loss of 5 points; of 2000 each they can.
    same = {**ratings, "ab-trial-good": 150}
    assert judge("a", report(-0.2, **zero, **same), policy).verdict == "inconclusive"
    many = {"ab-trial-good": 1600, "ab-trial-rated": 2000, "ab-installed-good": 1500, "ab-installed-rated": 2000}
    assert judge("a", report(-0.2, **zero, **many), policy).verdict == "not worse"


def test_one_worse_canary_rolls_back_all_not_worse_promotes_else_hold():
    auto = PublishConfig(canary=("a", "b"))
    worse, fine, unsure = (judge(s, report(c), auto) for s, c in (("a", 0.2), ("b", -0.2), ("b", 0.005)))
    assert decide([worse, fine], auto)[0] == ROLLBACK
    assert decide([fine, fine], auto)[0] == PROMOTE
    assert decide([fine, unsure], auto)[0] == HOLD
    held = PublishConfig(canary=("a", "b"), action="hold")
    decision, called, reasons = decide([worse, fine], held)
    assert (decision, called) == (HOLD, ROLLBACK) and "the operator decides" in reasons[-1]
    assert reasons[0].startswith("canary a: worse: loss on 200 corrected answers changes by +0.2000")


def test_a_copy_of_the_site_keeps_its_trial(tmp_path, site, job, coordinator):  # noqa: F811
    # The trial lives in the site's state folder, whole: a backup restored elsewhere keeps it.
    registry, _, _ = coordinator
    receive_trial(site, job, registry.bundle(2), SHADOW)
    copy = tmp_path / "copy"
    shutil.copytree(site.model_store_path, copy)
    assert current_trial(ModelStore(copy))[0].version == 2


# -- the coordinator's loop, on a grid double -----------------------------------------------------


def staged_registry(tmp_path, job):  # noqa: F811
    """A registry with champion 1 and version 2 published pending (as a staged rollout publishes it)."""
    from server.cycle.publish import RegistryHandle

    keys = generate_keypair(tmp_path / "keys")
    key = load_private_key(keys.private_path)
    registry = Registry(tmp_path / "registry")
    publish(registry, key, job, tmp_path / "a1", 0.01)
    publish(registry, key, job, tmp_path / "a2", 0.02, require_approval=True)
    return RegistryHandle(registry, key, 30.0)


def grid_answering(replies: dict[str, object]):
    """A Flower Grid double: each message type answered per node by ``replies[type](node)``
    (a metrics dict, an Error, or None for silence); sites are ``site-<node>``."""
    from unittest.mock import Mock

    from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid

    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [1, 2, 3]
    sent: list = []

    def send_and_receive(messages, timeout):
        out = []
        for msg in messages:
            sent.append(msg)
            node = msg.metadata.dst_node_id
            answer = replies[msg.metadata.message_type](node)
            if answer is None:
                continue
            content = (
                answer
                if isinstance(answer, Error)
                else RecordDict({"metrics": MetricRecord(answer), "site": ConfigRecord({"site-id": f"site-{node}"})})
            )
            out.append(Message(content, reply_to=msg))
        return out

    grid.send_and_receive.side_effect = send_and_receive
    return grid, sent


@pytest.mark.usefixtures("instruction_identity")
def test_a_worse_canary_gets_a_signed_withdrawal_and_no_other_site_hears_of_the_version(tmp_path, job):  # noqa: F811
    from server.cycle.rollout import run_rollout

    handle = staged_registry(tmp_path, job)
    grid, sent = grid_answering(
        {
            "query.trial": lambda node: {"trial-version": 2, "already-on-trial": 0},
            "query.canary": lambda node: report(+0.3, **{"trial-version": 2}),
            "query.withdraw": lambda node: {"withdrawn-version": 2, "trial-ended": 1},
        }
    )
    policy = PublishConfig(canary=("site-1",), check_s=1, timeout_s=10)
    record = run_rollout(
        grid,
        handle,
        policy,
        job,
        2,
        {"site-1": 1, "site-2": 2, "site-3": 3},
        seed=0,
        publish_timeout_s=5,
        approver="test",
    )
    assert record["decision"] == ROLLBACK and record["withdrawn_at"] == ["site-1"]
    assert {(m.metadata.message_type, m.metadata.dst_node_id) for m in sent} == {
        ("query.trial", 1),
        ("query.canary", 1),
        ("query.withdraw", 1),
    }
    assert handle.registry.status(2) == "withdrawn" and handle.registry.champion() == 1
    (decision,) = [d for d in handle.registry.decisions() if d.get("kind") == "rollout"]
    assert decision["decision"] == ROLLBACK and decision["reports"]["site-1"]["verdict"] == "worse"


@pytest.mark.usefixtures("instruction_identity")
def test_a_silent_canary_holds_the_version_at_its_deadline(tmp_path, job):  # noqa: F811
    from server.cycle.rollout import run_rollout

    handle = staged_registry(tmp_path, job)
    grid, sent = grid_answering(
        {
            "query.trial": lambda node: {"trial-version": 2, "already-on-trial": 0},
            "query.canary": lambda node: {"trial-version": 2, "ready": 0} if node == 1 else None,
        }
    )
    now = [0.0]
    policy = PublishConfig(canary=("site-1", "site-2"), check_s=30, timeout_s=100)
    record = run_rollout(
        grid,
        handle,
        policy,
        job,
        2,
        {"site-1": 1, "site-2": 2, "site-3": 3},
        seed=0,
        publish_timeout_s=5,
        approver="test",
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    assert record["decision"] == HOLD and record["polls"] == 5  # at 0, 30, 60, 90 and 100 s
    assert {s: r["verdict"] for s, r in record["reports"].items()} == {"site-1": "silent", "site-2": "silent"}
    assert "no report within publish.timeout_s=100 s" in record["reasons"][0]
    assert handle.registry.status(2) == "pending"  # for the operator to approve, or not
    assert not any(m.metadata.message_type == "query.withdraw" for m in sent)


@pytest.mark.usefixtures("instruction_identity")
def test_canaries_not_worse_promote_the_version_to_every_site(tmp_path, job):  # noqa: F811
    from server.cycle.rollout import run_rollout

    handle = staged_registry(tmp_path, job)
    grid, sent = grid_answering(
        {
            "query.trial": lambda node: {"trial-version": 2, "already-on-trial": 0},
            "query.canary": lambda node: report(-0.3, **{"trial-version": 2}),
            "query.publish": lambda node: {"installed-version": 2},
        }
    )
    record = run_rollout(
        grid,
        handle,
        PublishConfig(canary=("site-1",)),
        job,
        2,
        {"site-1": 1, "site-2": 2, "site-3": 3},
        seed=0,
        publish_timeout_s=5,
        approver="test",
    )
    assert record["decision"] == PROMOTE and handle.registry.champion() == 2
    assert sorted(record["publication"]["installed"]) == ["site-1", "site-2", "site-3"]
    published = [m for m in sent if m.metadata.message_type == "query.publish"]
    assert sorted(m.metadata.dst_node_id for m in published) == [1, 2, 3]


def test_a_canary_reports_after_report_after_s_with_what_it_has():
    from datetime import UTC, datetime, timedelta

    from client.install.trial import Trial

    trial = Trial.from_settings(2, {**SHADOW, "min-feedback": 100, "report-after-s": 3600}, "run")
    started = datetime.strptime(trial.started_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert not trial.ready(50, started + timedelta(minutes=30)) and trial.ready(100, started)
    assert trial.ready(50, started + timedelta(hours=2)) and not trial.ready(1, started + timedelta(hours=2))
    with pytest.raises(ConfigError, match="report-after-s"):
        Trial.from_settings(2, {**SHADOW, "report-after-s": -1}, "run")


@pytest.mark.usefixtures("instruction_identity")
def test_a_canary_that_refuses_its_report_holds_the_version_at_once(tmp_path, job):  # noqa: F811
    from flwr.app import Error

    from server.cycle.rollout import run_rollout

    handle = staged_registry(tmp_path, job)
    grid, sent = grid_answering(
        {
            "query.trial": lambda node: {"trial-version": 2, "already-on-trial": 0},
            "query.canary": lambda node: Error(code=4102, reason="PrivacyBudgetExceeded: the ceiling"),
        }
    )
    record = run_rollout(
        grid,
        handle,
        PublishConfig(canary=("site-1",), check_s=30, timeout_s=3600),
        job,
        2,
        {"site-1": 1, "site-2": 2},
        seed=0,
        publish_timeout_s=5,
        approver="test",
        sleep=lambda s: pytest.fail("no second poll: a refusal is final"),
    )
    assert record["decision"] == HOLD and record["polls"] == 1
    assert record["reports"]["site-1"]["verdict"] == "refused" and "PrivacyBudgetExceeded" in record["reasons"][0]


@pytest.mark.usefixtures("instruction_identity")
@pytest.mark.parametrize(
    "bad",
    [
        {"ready": 1, "trial-version": 2},  # no sums
        report(-0.3, **{"trial-version": 3}),  # another version's
        report(-0.3, noise=0.0, **{"trial-version": 2}),  # no noise
        report(-0.3, **{"trial-version": 2, "ab-trial-good": 5}),  # A/B counts in part
    ],
)
def test_a_malformed_report_is_a_refusal_not_a_crash(tmp_path, job, bad):  # noqa: F811
    from server.cycle.rollout import run_rollout

    handle = staged_registry(tmp_path, job)
    grid, _ = grid_answering({"query.trial": lambda node: {"trial-version": 2}, "query.canary": lambda node: bad})
    record = run_rollout(
        grid,
        handle,
        PublishConfig(canary=("site-1",)),
        job,
        2,
        {"site-1": 1},
        seed=0,
        publish_timeout_s=5,
        approver="test",
    )
    assert record["decision"] == HOLD and record["reports"]["site-1"]["verdict"] == "refused"
    assert "a malformed report" in record["reasons"][0]


def test_an_answer_rated_again_and_again_counts_once_and_shadow_counts_corrections_only(site, job, coordinator):  # noqa: F811
    from client.install.trial import current_trial
    from client.serve.canary import trial_feedback
    from client.serve.feedback import give_feedback

    registry, _, _ = coordinator
    receive_trial(site, job, registry.bundle(2), {**SHADOW, "mode": "ab"})
    journal = Journal.at(site.state_path)
    client = TestClient(create_app(site, journal, ServedModel(site)), base_url="http://127.0.0.1")
    first = client.post("/v1/completions", json={"prompt": "Cough", "max_tokens": 2}).json()["id"]
    for rating in ("bad", "bad", "bad", "good"):
        give_feedback(site, journal, first, rating=rating)
    trial, _ = current_trial(ModelStore(site.model_store_path))
    counted = trial_feedback(journal, trial)
    assert sum(arm[1] for arm in counted["ratings"].values()) == 1 and counted["with_feedback"] == 1
    assert sum(arm[0] for arm in counted["ratings"].values()) == 1  # the last rating: good
    shadow = dataclasses.replace(trial, mode="shadow")
    assert trial_feedback(journal, shadow)["with_feedback"] == 0  # a rating is not scored in shadow

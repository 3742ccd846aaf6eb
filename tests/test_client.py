"""A site's round: data checked first, budget checked before training, spend recorded after,
and every refusal answered as an error reply with its reason (never a crash, never an update).
A deployed site's messages go to its warm worker, a real process: the ClientApp Flower starts
per message only forwards; the worker keeps the model loaded, answers refusals as error
replies, is restarted when it dies, and ignores garbage.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client.round.site
from client.app import WORKER_UNAVAILABLE, make_client_app
from client.handlers import ERROR_CODES
from client.join import claim_state, node_config_path, prepare_site
from client.round.site import check_ready, evaluate_round, train_round
from client.worker import WorkerAddress, WorkerProcess, ask
from fedretrain.arrays import NOT_PRIVATE_EPSILON, AdapterSpec, from_array_record, to_array_record
from fedretrain.config import Job, SiteConfig, compose_config
from fedretrain.errors import ConfigError, DataValidationError, PrivacyBudgetExceeded
from fedretrain.modeling.lora_model import adapter_arrays, load_lora_model
from fedretrain.privacy.ledger import PrivacyLedger
from strategies.validation import RANK_METRIC, TRAIN_METRICS

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "site-a"


@pytest.fixture(scope="module")
def job() -> Job:
    cfg = compose_config(["experiment=smoke", "train.local_steps=3", "train.batch_size=8", "rounds=2"])
    return Job.from_config(cfg, run_id="test-run")


@pytest.fixture(scope="module")
def initial_adapter(job):
    return adapter_arrays(load_lora_model(job.model, job.lora, seed=job.seed, device="cpu").model)


def make_site(tmp_path: Path, ceiling: float = 8.0) -> SiteConfig:
    data = tmp_path / "site"
    shutil.copytree(EXAMPLE, data)
    return SiteConfig(site_id="site-a", data_dir=str(data), epsilon_ceiling=ceiling, delta=1e-5)


def test_a_round_trains_the_adapter_and_records_the_spend(tmp_path, job, initial_adapter):
    site = make_site(tmp_path)
    outcome = train_round(site, job, initial_adapter, server_round=1)
    # Only LoRA tensors of the agreed shapes leave, and they changed.
    assert AdapterSpec.from_state_dict(outcome.adapter) == AdapterSpec.from_state_dict(initial_adapter)
    assert any((outcome.adapter[k] != initial_adapter[k]).any() for k in initial_adapter)
    # The spend is in the site's ledger, and the reported epsilon is the ledger's.
    ledger = PrivacyLedger.load(site.ledger_path, site_id="site-a", accountant="rdp", delta=1e-5)
    assert [(e.run_id, e.round, e.steps) for e in ledger.entries] == [("test-run", 1, 3)]
    assert outcome.metrics["epsilon"] == pytest.approx(ledger.epsilon())
    assert 0 < outcome.metrics["epsilon"] <= site.epsilon_ceiling
    # Nothing in the reply depends on the records: no count, no training loss.
    assert set(outcome.metrics) == {*TRAIN_METRICS, RANK_METRIC}
    assert outcome.metrics["lora-rank"] == job.lora.r
    assert outcome.metrics["sample-rate"] == job.privacy.sample_rate


def test_the_site_refuses_before_crossing_its_ceiling_and_keeps_refusing_after_restart(tmp_path, job, initial_adapter):
    site = make_site(tmp_path)
    first = train_round(site, job, initial_adapter, server_round=1)
    # A ceiling just above what one round spent: the next round would cross it.
    tight = SiteConfig(
        site_id="site-a", data_dir=site.data_dir, epsilon_ceiling=first.metrics["epsilon"] * 1.01, delta=1e-5
    )
    with pytest.raises(PrivacyBudgetExceeded, match="ceiling"):
        train_round(tight, job, initial_adapter, server_round=2)
    # Nothing was recorded for the refused round; the ledger file is the site's memory.
    ledger = PrivacyLedger.load(site.ledger_path, site_id="site-a", accountant="rdp", delta=1e-5)
    assert len(ledger.entries) == 1


def test_a_coordinator_cannot_switch_dp_off_unless_the_site_allows_it(tmp_path, job, initial_adapter):
    site = make_site(tmp_path)
    plain_job = dataclasses.replace(job, privacy=dataclasses.replace(job.privacy, enabled=False))
    # The coordinator's job says privacy.enabled=false; the site's own config has not opted in.
    with pytest.raises(PrivacyBudgetExceeded, match="allow-non-private"):
        train_round(site, plain_job, initial_adapter, server_round=1)
    # A research site that opted in trains without DP: no ledger entry, no epsilon claimed.
    sandbox = dataclasses.replace(site, allow_non_private=True)
    outcome = train_round(sandbox, plain_job, initial_adapter, server_round=1)
    assert outcome.metrics["epsilon"] == NOT_PRIVATE_EPSILON
    assert not site.ledger_path.exists()


def test_the_ledger_stays_locked_from_budget_check_to_record(tmp_path, job, initial_adapter, monkeypatch):
    site = make_site(tmp_path)
    lock_free_while_training = []
    real_train = client.round.site.train_lora

    def train_and_probe(*args, **kwargs):
        # What a second round at this site (another run) would try while this one trains.
        fd = os.open(f"{site.ledger_path}.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock_free_while_training.append(True)
        except BlockingIOError:
            lock_free_while_training.append(False)
        finally:
            os.close(fd)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(client.round.site, "train_lora", train_and_probe)
    train_round(site, job, initial_adapter, server_round=1)
    assert lock_free_while_training == [False]


def test_bad_data_stops_the_round_before_any_spend(tmp_path, job, initial_adapter):
    site = make_site(tmp_path)
    Path(site.data_dir, "train.jsonl").write_text('{"text": "ok"}\n{"text": ""}\n')
    with pytest.raises(DataValidationError, match=r"train.jsonl:2: field 'text' is empty"):
        train_round(site, job, initial_adapter, server_round=1)
    assert not site.ledger_path.exists()


def test_the_ready_check_refuses_what_a_round_would_and_spends_nothing(tmp_path, job):
    # A site with good data and budget is ready; nothing is written to its ledger.
    site = make_site(tmp_path / "good")
    assert check_ready(site, job, server_round=1) == {"ready": 1}
    assert not site.ledger_path.exists()
    # A bad file, and a ceiling the cycle's rounds would cross: refused as a round would be.
    bad = make_site(tmp_path / "bad")
    Path(bad.data_dir, "train.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(DataValidationError, match=r"train.jsonl:2: field 'text' is missing"):
        check_ready(bad, job, server_round=1)
    poor = make_site(tmp_path / "poor", ceiling=0.5)
    with pytest.raises(PrivacyBudgetExceeded, match="above the lifetime ceiling"):
        check_ready(poor, job, server_round=1)
    assert not bad.ledger_path.exists() and not poor.ledger_path.exists()


def test_evaluation_sends_noised_sums_of_the_clipped_changes(tmp_path, job, initial_adapter):
    # A small release noise (z = 0.5 costs about epsilon 8 per release) and a ceiling to match.
    site = dataclasses.replace(make_site(tmp_path, ceiling=100.0), eval_noise=0.5, eval_clip=1.0)
    job = dataclasses.replace(job, rounds=1)  # sites score only a cycle's final candidate
    train_round(site, job, initial_adapter, server_round=1)
    # LoRA starts with B = 0: the initial adapter is the base model exactly, every change is 0.
    scored = evaluate_round(site, job, initial_adapter, server_round=1).metrics
    # 3 statistics, z = 0.5, sensitivities 1, D = 1, D^2 = 1: std = 0.5 * sqrt(3) each.
    std = 0.5 * 3**0.5
    assert scored["num-examples-std"] == scored["diff-sum-std"] == scored["diff-sumsq-std"] == pytest.approx(std)
    # 12 held-out records; the noise is within 6 standard deviations of the truth.
    assert abs(scored["num-examples"] - 12) < 6 * std
    assert abs(scored["diff-sum"]) < 6 * std and abs(scored["diff-sumsq"]) < 6 * std
    assert scored["eval-clip"] == 1.0


def _call(app, site: SiteConfig, job: Job, adapter, message_type=MessageType.TRAIN, server_round=1) -> Message:
    config = ConfigRecord({**job.to_flat(), "server-round": server_round})
    msg = Message(
        RecordDict({"arrays": to_array_record(adapter), "config": config}), dst_node_id=7, message_type=message_type
    )
    context = Context(run_id=1, node_id=7, node_config=site.to_node_config(), state=RecordDict(), run_config={})
    return app(msg, context)


def test_client_app_replies_with_adapter_metrics_and_site_id(tmp_path, job, initial_adapter, instruction_identity):
    site = make_site(tmp_path)
    reply = _call(make_client_app(), site, job, initial_adapter)
    assert not reply.has_error()
    assert set(from_array_record(reply.content["arrays"])) == set(initial_adapter)
    assert reply.content["site"]["site-id"] == "site-a"
    assert reply.content["metrics"]["epsilon"] > 0


def test_client_app_turns_a_refusal_into_an_error_reply(tmp_path, job, initial_adapter, instruction_identity):
    site = make_site(tmp_path, ceiling=1e-3)
    reply = _call(make_client_app(), site, job, initial_adapter)
    assert reply.has_error()
    assert reply.error.code == ERROR_CODES[PrivacyBudgetExceeded]
    assert "PrivacyBudgetExceeded" in reply.error.reason and "ceiling" in reply.error.reason
    assert not reply.has_content()


@pytest.mark.parametrize(("mu", "trained"), [(0.5, True), (-1.0, False), ("big", False)])
def test_a_strategys_proximal_term_is_honoured_and_checked(
    tmp_path, job, initial_adapter, instruction_identity, mu, trained
):
    # Flower's FedProx adds "proximal-mu" to the train config: not part of the job, read by the site.
    site = make_site(tmp_path)
    msg = Message(
        RecordDict(
            {"arrays": to_array_record(initial_adapter), "config": ConfigRecord({**job.to_flat(), "proximal-mu": mu})}
        ),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    context = Context(run_id=1, node_id=7, node_config=site.to_node_config(), state=RecordDict(), run_config={})
    reply = make_client_app()(msg, context)
    assert reply.has_error() is not trained
    if not trained:
        assert "proximal-mu: a number in [0, 1000]" in reply.error.reason and not site.ledger_path.exists()


def test_client_app_refuses_a_job_with_unknown_keys(tmp_path, job, initial_adapter, instruction_identity):
    site = make_site(tmp_path)
    bad_job = json.loads(json.dumps(job.to_flat()))
    bad_job["privacy.epsilon_ceiling"] = 1000.0  # a coordinator may not set a site's ceiling
    msg = Message(
        RecordDict({"arrays": to_array_record(initial_adapter), "config": ConfigRecord(bad_job)}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    context = Context(run_id=1, node_id=7, node_config=site.to_node_config(), state=RecordDict(), run_config={})
    reply = make_client_app()(msg, context)
    assert reply.has_error() and "privacy.epsilon_ceiling" in reply.error.reason
    assert not site.ledger_path.exists()


@pytest.mark.parametrize("forged", [False, True])
def test_a_site_requiring_secure_aggregation_refuses_a_plain_train_message_before_training(
    tmp_path, job, initial_adapter, instruction_identity, forged
):
    import dataclasses

    from fedretrain.secagg import SECURE_STAGE

    site = dataclasses.replace(make_site(tmp_path), require_secure_aggregation=True)
    config = ConfigRecord({**job.to_flat(), "server-round": 1})
    content = RecordDict({"arrays": to_array_record(initial_adapter), "config": config})
    if forged:  # the coordinator claims the protocol; only the site's own mod may say so
        content[SECURE_STAGE] = ConfigRecord({"stage": "collect_masked_vectors"})
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config=site.to_node_config(), state=RecordDict(), run_config={})

    reply = make_client_app()(msg, context)

    assert reply.has_error() and reply.error.code == ERROR_CODES[ConfigError]
    assert "only under secure aggregation" in reply.error.reason and "outside the protocol" in reply.error.reason
    assert not site.ledger_path.exists()  # nothing trained, nothing spent


def test_a_site_requiring_secure_aggregation_is_not_ready_for_a_job_without_it(tmp_path, job):
    import dataclasses

    from client.round.site import check_ready

    site = dataclasses.replace(make_site(tmp_path), require_secure_aggregation=True)
    with pytest.raises(ConfigError, match="this job does not use it"):
        check_ready(site, job, 1)
    assert check_ready(site, dataclasses.replace(job, secure_aggregation=True), 1) == {"ready": 1}


# --- a deployed site: the ClientApp forwards to the site's warm worker (client/worker.py) ----

DEPLOYED = make_client_app(use_worker=True)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    site = make_site(root)
    prepare_site(site.to_node_config())
    log = open(root / "worker.log", "wb")  # noqa: SIM115 - closed below
    process = WorkerProcess(site, node_config_path(site), output=log)
    process.start()
    process.keep_running(interval_s=0.5)
    yield site, process, root / "worker.log"
    process.stop()
    log.close()


def _answered(log: Path, what: str) -> int:
    return log.read_text().count(f"site worker: {what} answered")


def test_rounds_are_answered_by_one_warm_worker(worker, job, initial_adapter, instruction_identity):
    site, process, log = worker
    pid = process.proc.pid
    replies = [_call(DEPLOYED, site, job, initial_adapter, server_round=r) for r in (1, 2)]

    assert all(not reply.has_error() for reply in replies), [r.error for r in replies if r.has_error()]
    assert all(reply.content["site"]["site-id"] == "site-a" for reply in replies)
    assert [reply.content["site"]["server-round"] for reply in replies] == [1, 2]
    # The worker trained both rounds in the one process, and its spend is in the site's ledger.
    assert _answered(log, "train") == 2 and process.proc.pid == pid
    ledger = PrivacyLedger.load(site.ledger_path, site_id="site-a", accountant="rdp", delta=1e-5)
    assert [e.round for e in ledger.entries] == [1, 2]
    assert replies[1].content["metrics"]["epsilon"] == pytest.approx(ledger.epsilon())


def test_a_refusal_at_the_worker_is_an_error_reply_without_paths(tmp_path, job, initial_adapter, instruction_identity):
    # A second site, whose data is broken, with its own worker.
    site = make_site(tmp_path)
    prepare_site(site.to_node_config())
    Path(site.data_dir, "train.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    process = WorkerProcess(site, node_config_path(site), output=open(os.devnull, "wb"))  # noqa: SIM115
    process.start()
    try:
        reply = _call(DEPLOYED, site, job, initial_adapter)
    finally:
        process.stop()
    assert reply.has_error() and reply.error.code == ERROR_CODES[DataValidationError]
    assert "train.jsonl:2: field 'text' is missing" in reply.error.reason
    assert site.data_dir not in reply.error.reason
    assert not WorkerAddress.read(site.state_path)  # a stopped worker leaves no address behind


def test_garbage_on_the_socket_is_dropped_and_the_worker_keeps_answering(
    worker, job, initial_adapter, instruction_identity
):
    site, process, log = worker
    address = WorkerAddress.read(site.state_path)
    for garbage in (b"\xff\xff\xff\xff" + b"x" * 16, b"\x00\x00\x00\x02[]" + b"\x00" * 8, b"\x00\x00"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(address.socket))
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            try:
                answer = sock.recv(1)
            except ConnectionResetError:  # closed with the rest of the garbage unread
                answer = b""
            assert answer == b""  # dropped without an answer
    # A message type the site does not answer (Flower's ClientApp would not even pass it on).
    config = ConfigRecord({**job.to_flat(), "server-round": 1})
    code, reason = ask(address, "query.nonsense", RecordDict({"config": config}))
    assert code == ERROR_CODES[ConfigError] and "this site answers train, evaluate" in reason
    assert "malformed request was dropped" in log.read_text() and process.proc.pid == address.pid


def test_a_killed_worker_is_an_error_reply_then_a_new_worker_answers(
    worker, job, initial_adapter, instruction_identity, caplog
):
    site, process, log = worker
    old = process.proc.pid
    os.kill(old, signal.SIGKILL)
    process.proc.wait()
    reply = _call(DEPLOYED, site, job, initial_adapter, server_round=3)
    assert reply.has_error() and reply.error.code == WORKER_UNAVAILABLE

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        address = WorkerAddress.read(site.state_path)
        if address is not None and address.pid != old:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the keeper did not start a new worker")
    reply = _call(DEPLOYED, site, job, initial_adapter, server_round=3)
    assert not reply.has_error(), reply.error
    assert f"the site worker exited with code {-signal.SIGKILL}; starting a new one" in caplog.text


def test_while_site_join_runs_and_its_worker_starts_the_answer_is_an_error_reply(
    tmp_path, job, initial_adapter, instruction_identity
):
    # site join holds the state (its worker has not written its address yet).
    site = make_site(tmp_path)
    with claim_state(site):
        reply = _call(DEPLOYED, site, job, initial_adapter)
    assert reply.has_error() and reply.error.code == WORKER_UNAVAILABLE
    assert not site.ledger_path.exists()  # nothing trained here, in the bundle's code


def test_without_a_worker_the_client_app_answers_itself(tmp_path, job, initial_adapter, instruction_identity, caplog):
    site = make_site(tmp_path)
    reply = _call(DEPLOYED, site, job, initial_adapter)
    assert not reply.has_error(), reply.error
    assert "no site worker runs for site-a" in caplog.text

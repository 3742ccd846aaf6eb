"""A site's inference service and the feedback on its answers (client/serve/).

On a site that installed version 1 of a real registry (tests/test_install.py's fixtures:
the embedded model, signed versions), the service answers OpenAI-style completions with
the installed version, keeps each answer at the site, takes ratings and corrections, and
picks up version 2 once the site installs it. The bad inputs get an OpenAI-shaped error
naming the field; nothing half-done is kept.
"""

from __future__ import annotations

import json
import shlex
import urllib.request
from pathlib import Path

import pytest
from processes import first_line, start_cli
from starlette.testclient import TestClient
from test_install import coordinator, delivered, job, make_site  # noqa: F401  (module fixtures)
from test_readme import readme_commands

from cli.main import main
from client.install.installer import receive_version
from client.serve.app import FEEDBACK_PER_MINUTE, ServedModel, create_app
from client.serve.journal import Journal, wilson
from fedretrain.data.notes import read_records
from fedretrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def site(tmp_path, job, coordinator):  # noqa: F811
    registry, _, public = coordinator
    site = make_site(tmp_path, public)
    receive_version(site, job, delivered(registry, 1))
    return site


@pytest.fixture
def service(site):
    journal = Journal.at(site.state_path)
    return TestClient(create_app(site, journal, ServedModel(site)), base_url="http://127.0.0.1"), journal


def test_an_answer_names_its_version_and_is_kept_at_the_site(site, service, job, coordinator):  # noqa: F811
    client, journal = service
    assert client.get("/v1/models").json()["data"][0]["id"] == "fedretrain-v1"
    reply = client.post("/v1/completions", json={"prompt": "Patient presents with", "max_tokens": 6})
    body = reply.json()
    assert reply.status_code == 200 and body["object"] == "text_completion" and body["model"] == "fedretrain-v1"
    assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["finish_reason"] == "length"
    kept = journal.request(body["id"])
    assert kept["version"] == 1 and kept["prompt"] == "Patient presents with"
    assert kept["completion"] == body["choices"][0]["text"] and kept["latency_s"] > 0
    # Greedy and seeded: the same request, the same answer.
    again = client.post("/v1/completions", json={"prompt": ["Patient presents with"], "max_tokens": 6})
    assert again.json()["choices"][0]["text"] == body["choices"][0]["text"]

    # The site installs version 2: the next answer is version 2's, without a restart.
    registry, _, _ = coordinator
    receive_version(site, job, delivered(registry, 2))
    assert client.post("/v1/completions", json={"prompt": "Chest pain", "max_tokens": 4}).json()["model"] == (
        "fedretrain-v2"
    )
    assert [v["version"] for v in journal.scores()] == [1, 2]


def test_ratings_and_corrections_make_the_versions_live_score(site, service):
    client, journal = service
    ids = [
        client.post("/v1/completions", json={"prompt": f"Note {i}:", "max_tokens": 3}).json()["id"] for i in range(4)
    ]
    for request_id, rating in zip(ids[:3], ["good", "good", "bad"], strict=True):
        assert client.post("/v1/feedback", json={"id": request_id, "rating": rating}).status_code == 200
    before = len(read_records(site.train_path)) + len(read_records(site.heldout_path))
    corrected = client.post("/v1/feedback", json={"id": ids[3], "correction": " stable, discharged home."})
    assert corrected.status_code == 200, corrected.text
    # The correction went through ingestion: one record more, prompt and correction as one note.
    records = read_records(site.train_path) + read_records(site.heldout_path)
    assert len(records) == before + 1 and any(r.text == "Note 3: stable, discharged home." for r in records)

    (score,) = client.get("/v1/scores").json()["versions"]
    low, high = wilson(2, 3)
    assert (score["version"], score["requests"], score["good"], score["bad"], score["corrections"]) == (1, 4, 2, 1, 1)
    assert score["good_rate"] == pytest.approx(2 / 3) and score["good_rate_interval"] == pytest.approx([low, high])
    assert 0.2 < low < 2 / 3 < high < 1.0
    # The log is the site's own: a fresh reader (the CLI's) sees the same.
    assert Journal.at(site.state_path).scores() == journal.scores()


def test_bad_feedback_is_refused_with_the_field_and_nothing_recorded(site, service):
    client, journal = service
    request_id = client.post("/v1/completions", json={"prompt": "Cough", "max_tokens": 2}).json()["id"]

    def error(body: dict) -> tuple[int, str | None, str]:
        reply = client.post("/v1/feedback", json=body)
        return reply.status_code, reply.json()["error"]["param"], reply.json()["error"]["message"]

    assert error({"id": "cmpl-000000000000000000000000", "rating": "good"})[:2] == (404, "id")
    assert error({"id": request_id, "rating": "meh"})[:2] == (400, "rating")
    assert error({"id": request_id})[:2] == (400, None)
    assert error({"id": request_id, "rating": "good", "correction": "x"})[0] == 400
    status, param, message = error({"id": request_id, "correction": 7})
    assert (status, param) == (400, "correction")
    assert not journal.feedback_path.exists() or journal.feedback_path.read_text() == ""


def test_a_second_correction_of_one_answer_is_refused_and_not_recorded(site, service):
    client, journal = service
    request_id = client.post("/v1/completions", json={"prompt": "Cough", "max_tokens": 2}).json()["id"]
    assert client.post("/v1/feedback", json={"id": request_id, "correction": " dry, three days."}).status_code == 200
    again = client.post("/v1/feedback", json={"id": request_id, "correction": " productive."})
    assert again.status_code == 409 and again.json()["error"]["param"] == "correction"
    assert len(journal.feedback_for(request_id)) == 1


def test_only_local_json_requests_reach_the_service(site, service):
    client, journal = service
    # A page elsewhere: a name of its own rebound to 127.0.0.1, or a "simple" cross-origin POST.
    rebound = client.post("/v1/completions", json={"prompt": "x"}, headers={"host": "evil.example:8780"})
    assert rebound.status_code == 400 and "only to 127.0.0.1" in rebound.json()["error"]["message"]
    assert client.get("/v1/scores", headers={"host": "[::1"}).status_code == 400
    simple = client.post("/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert simple.status_code == 415 and not journal.requests_path.exists()
    # A prompt longer than the model's context is refused before any work.
    context = ServedModel(site).current().model.config.max_position_embeddings
    long = client.post("/v1/completions", json={"prompt": "word " * context, "max_tokens": 4})
    assert long.status_code == 400 and long.json()["error"]["param"] == "prompt"


def test_a_site_without_a_pinned_key_does_not_serve(tmp_path):
    site = make_site(tmp_path, None)
    with pytest.raises(ConfigError, match="coordinator-key is not set"):
        ServedModel(site)


def test_a_flood_of_ratings_from_one_client_is_rate_limited(site, service):
    client, journal = service
    request_id = client.post("/v1/completions", json={"prompt": "Fever", "max_tokens": 2}).json()["id"]
    codes = [client.post("/v1/feedback", json={"id": request_id, "rating": "bad"}).status_code for _ in range(40)]
    assert codes[:FEEDBACK_PER_MINUTE] == [200] * FEEDBACK_PER_MINUTE and set(codes[FEEDBACK_PER_MINUTE:]) == {429}
    limited = client.post("/v1/feedback", json={"id": request_id, "rating": "bad"})
    assert limited.json()["error"]["type"] == "rate_limit_error" and int(limited.headers["retry-after"]) > 0
    assert len(journal.feedback_path.read_text().splitlines()) == FEEDBACK_PER_MINUTE


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "x", "temperature": 9}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": 3}, "prompt"),
    ],
)
def test_a_malformed_completion_request_names_its_field(service, body, param):
    client, journal = service
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param
    assert not journal.requests_path.exists()


def test_a_site_with_nothing_installed_says_so(tmp_path, coordinator):  # noqa: F811
    _, _, public = coordinator
    site = make_site(tmp_path, public)
    client = TestClient(create_app(site, Journal.at(site.state_path), ServedModel(site)), base_url="http://127.0.0.1")
    reply = client.post("/v1/completions", json={"prompt": "x"})
    assert reply.status_code == 503 and "no version is installed" in reply.json()["error"]["message"]


@pytest.mark.usefixtures("cli_logging")
def test_the_cli_serves_and_takes_feedback(site, tmp_path, capsys):
    settings = tmp_path / "site.json"
    settings.write_text(
        json.dumps(
            {
                "site-id": site.site_id,
                "data-dir": site.data_dir,
                "epsilon-ceiling": site.epsilon_ceiling,
                "delta": site.delta,
                "coordinator-key": site.coordinator_key,
                "device": "cpu",
            }
        )
    )
    # The README's command as written, in the directory holding site.json, on a free port.
    (command,) = [c for c in readme_commands() if c.startswith("fedretrain site serve")]
    proc = start_cli([*shlex.split(command)[1:], "--port", "0"], cwd=tmp_path)
    try:
        line = first_line(proc, timeout_s=120)
        assert line.startswith("fedretrain site serve: http://127.0.0.1:") and "version 1" in line, (
            line + proc.stderr.read()
        )
        request = urllib.request.Request(
            line.split()[3],
            data=json.dumps({"prompt": "Patient presents with", "max_tokens": 4}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = json.loads(reply.read())
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    assert main(["site", "feedback", answer["id"], "--rating", "good", "--site-config", str(settings)]) == 0
    assert main(["site", "feedback", answer["id"], "--correction", " chest pain.", "--site-config", str(settings)]) == 0
    assert main(["site", "feedback", "--scores", "--site-config", str(settings)]) == 0
    out = capsys.readouterr().out
    scores = json.loads(out[out.index("{") :])
    assert scores["versions"][0] | {"latency_median_s": 0, "latency_p95_s": 0} == {
        "version": 1,
        "requests": 1,
        "latency_median_s": 0,
        "latency_p95_s": 0,
        "good": 1,
        "bad": 0,
        "corrections": 1,
        "good_rate": 1.0,
        "good_rate_interval": list(wilson(1, 1)),
    }
    assert main(["site", "feedback", "cmpl-nope", "--rating", "bad", "--site-config", str(settings)]) == 2
    assert "no request 'cmpl-nope'" in capsys.readouterr().err


def test_a_line_torn_by_a_crash_costs_only_itself(tmp_path):
    journal = Journal.at(tmp_path)
    journal.record_request({"id": "cmpl-a", "version": 1, "latency_s": 0.1})
    with journal.requests_path.open("ab") as f:
        f.write(b'{"id": "cmpl-torn", "vers')  # the crash: no end to the line
    journal.record_request({"id": "cmpl-b", "version": 1, "latency_s": 0.2})
    fresh = Journal.at(tmp_path)  # as another process reads it
    assert fresh.request("cmpl-a")["latency_s"] == 0.1 and fresh.request("cmpl-b")["latency_s"] == 0.2
    assert [s["requests"] for s in fresh.scores()] == [2]


def test_the_review_queue_in_the_sites_service(site, service):
    client, _ = service
    page = client.get("/review")
    assert page.status_code == 200 and "Review queue: site site-a" in page.text
    queue = client.get("/v1/review", params={"limit": 3}).json()
    assert queue["version"] == 1 and queue["waiting"] >= 3 and len(queue["records"]) == 3
    losses = [r["loss"] for r in queue["records"]]
    assert losses == sorted(losses, reverse=True)  # least sure first
    first, second = queue["records"][0]["id"], queue["records"][1]["id"]

    def post(body):
        return client.post("/v1/review", json={"by": "dr. reviewer", **body})

    assert post({"id": first, "decision": "accept"}).json()["recorded"]["decision"] == "accept"
    corrected = post({"id": second, "decision": "correct", "text": "Chief complaint: chest pain, resolved."})
    assert corrected.status_code == 200 and corrected.json()["recorded"]["id"] == f"{second}.corrected"
    after = client.get("/v1/review", params={"limit": 500}).json()
    assert after["waiting"] == queue["waiting"] - 2  # the correction came in accepted
    assert {first, second}.isdisjoint(r["id"] for r in after["records"])
    # Refusals name the field; nothing is recorded for them.
    assert post({"id": "no-such-record", "decision": "accept"}).status_code == 404
    assert post({"id": first, "decision": "maybe"}).json()["error"]["param"] == "decision"
    assert post({"id": first, "decision": "correct"}).json()["error"]["param"] == "text"
    assert client.post("/v1/review", json={"id": first, "decision": "accept"}).json()["error"]["param"] == "by"
    assert client.get("/v1/review", params={"limit": 0}).status_code == 400
    assert client.get("/v1/review").json()["waiting"] == after["waiting"]

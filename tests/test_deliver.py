"""The coordinator's delivery of a version: who installed it, who refused and why, who never
answered; a malformed reply is a refusal, never a crash."""

from __future__ import annotations

from unittest.mock import Mock

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedretrain.config import Job, compose_config
from fedretrain.registry.bundle import VersionBundle
from server.cycle.publish import PUBLISH_MESSAGE, deliver

pytestmark = pytest.mark.usefixtures("instruction_identity")


def reply_from(node_id: int, content: RecordDict | Error) -> Message:
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node_id, message_type=PUBLISH_MESSAGE))


def test_deliver_sorts_replies_into_installed_refused_and_silent():
    # Prepare: four nodes; 1 installs, 2 refuses, 3 answers without its site record, 4 is silent
    bundle = VersionBundle(b'{"version":3}', bytes(64), {"adapter_model.safetensors": b"x"})
    job = Job.from_config(compose_config(["experiment=smoke"]), run_id="r")
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [4, 3, 2, 1]
    grid.send_and_receive.return_value = [
        reply_from(
            1,
            RecordDict(
                {"metrics": MetricRecord({"installed-version": 3}), "site": ConfigRecord({"site-id": "site-a"})}
            ),
        ),
        reply_from(2, Error(code=4108, reason="VerificationError: hashes: mismatch")),
        reply_from(3, RecordDict({"metrics": MetricRecord({"installed-version": 3})})),
    ]

    # Execute
    outcome = deliver(grid, bundle, None, job, timeout_s=5)

    # Assert: every node got one query.publish message carrying the bundle and the job
    (messages,), kwargs = grid.send_and_receive.call_args
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3, 4] and kwargs == {"timeout": 5}
    assert all(m.metadata.message_type == "query.publish" for m in messages)
    assert dict(messages[0].content["version"]) == bundle.to_mapping()
    assert outcome["installed"] == {"site-a": {"node_id": 1, "installed-version": 3}}
    assert [r["node_id"] for r in outcome["refused"]] == [2, 3]
    assert "hashes: mismatch" in outcome["refused"][0]["reason"]
    assert "malformed reply" in outcome["refused"][1]["reason"]
    assert outcome["no_reply"] == [4]

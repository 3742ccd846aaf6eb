"""server/cycle/resume.py: what a round's checkpoint keeps, and how a resumed cycle takes it back
(real checkpoints in tmp_path, a real FedAvgLoRA, a hand-made round log).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedretrain.arrays import AdapterSpec, from_array_record, to_array_record
from fedretrain.config import Job
from fedretrain.errors import ResumeError
from server.cycle.resume import CheckpointWriter, check_registry_pointer, privacy_totals, resume_point
from strategies import FedAvgLoRA
from strategies.checked import RejectedReply, RoundLog
from strategies.validation import SiteEvaluation

SPEC = AdapterSpec(entries=(("lora_A", (1, 2), "float32"), ("lora_B", (2, 1), "float32")))
JOB = Job(run_id="cycle-7", seed=0, rounds=3)


def privacy(epsilon: float, node_id: int) -> dict[str, float | int]:
    return {
        "node-id": node_id,
        "num-examples": 10,
        "data-size": 100,
        "train-loss": 1.0,
        "epsilon": epsilon,
        "epsilon-ceiling": 8.0,
        "delta": 1e-5,
        "noise-multiplier": 1.1,
        "steps": 5,
    }


def adapter(a: float, b: float) -> dict[str, np.ndarray]:
    return {"lora_A": np.array([[a, -a]], np.float32), "lora_B": np.array([[b], [2 * b]], np.float32)}


def test_privacy_totals_give_each_sites_last_epsilon_and_its_rounds():
    # Prepare: site a in rounds 1, 2, 3 (epsilon 1.0, 1.5, 2.5); site b only in round 2
    # (0.7). The log's keys are out of order, as a dict rebuilt from JSON may be.
    round_log = {
        3: RoundLog(accepted={"a": privacy(2.5, 1)}),
        1: RoundLog(accepted={"a": privacy(1.0, 1)}),
        2: RoundLog(
            accepted={"b": privacy(0.7, 2), "a": privacy(1.5, 1)},
            rejected=[RejectedReply(node_id=3, site_id="c", reason="stale")],
        ),
    }

    # Execute
    totals = privacy_totals(round_log)

    # Assert: a's epsilon is round 3's, not the last one iterated; a rejected site is not counted.
    assert totals == {
        "a": {"rounds": 3, "epsilon": 2.5, "epsilon_ceiling": 8.0, "delta": 1e-5},
        "b": {"rounds": 1, "epsilon": 0.7, "epsilon_ceiling": 8.0, "delta": 1e-5},
    }


def test_privacy_totals_of_an_empty_log_are_empty():
    assert privacy_totals({}) == {}


def round_log() -> dict[int, RoundLog]:
    return {
        1: RoundLog(
            sampled=3,
            bytes_down=300,
            bytes_up=240,
            accepted={"a": privacy(1.0, 1), "b": privacy(0.5, 2)},
            rejected=[RejectedReply(node_id=3, site_id=None, reason="error reply (code 0): 'boom'")],
            evaluation={
                "a": SiteEvaluation.from_metrics(
                    "a", 1, {"num-examples": 5, "diff-sum": -1.5, "diff-sumsq": 0.75, "diff-sum-std": 0.25}
                )
            },
            evaluation_rejected=[RejectedReply(node_id=2, site_id="b", reason="stale or replayed reply")],
        ),
        2: RoundLog(sampled=2, bytes_down=200, bytes_up=160, accepted={"a": privacy(1.75, 1), "b": privacy(0.5, 2)}),
    }


@pytest.mark.usefixtures("keep_global_random_state")
def test_a_written_checkpoint_restores_the_strategy_the_random_state_and_the_adapter(tmp_path):
    # Prepare: a strategy that has run two rounds; checkpoints after round 1 and round 2.
    strategy = FedAvgLoRA(spec=SPEC)
    strategy.round_log = round_log()
    writer = CheckpointWriter(
        tmp_path / "run", strategy, JOB, num_rounds=3, registry_root=tmp_path / "registry", champion=4
    )
    writer.write(1, to_array_record(adapter(0.5, 0.25)))
    writer.write(2, to_array_record(adapter(1.5, -0.75)))
    # What the coordinator would have drawn next, had it gone on.
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    # Execute: a new process (a fresh strategy) resumes.
    checkpoint = resume_point(tmp_path / "run")
    fresh = FedAvgLoRA(spec=SPEC)
    arrays = CheckpointWriter(
        tmp_path / "run", fresh, JOB, num_rounds=3, registry_root=tmp_path / "registry", champion=4
    ).restore(checkpoint)

    # Assert: round 2's adapter, exactly; the round log equal entry for entry, its
    # rejections RejectedReply again (not dicts); the random draws repeat.
    assert checkpoint.server_round == 2
    back = from_array_record(arrays)
    assert back["lora_A"].tolist() == [[1.5, -1.5]] and back["lora_B"].tolist() == [[-0.75], [-1.5]]
    assert back["lora_A"].dtype == np.float32
    assert fresh.round_log == round_log()
    assert isinstance(fresh.round_log[1].rejected[0], RejectedReply)
    assert isinstance(fresh.round_log[1].evaluation_rejected[0], RejectedReply)
    assert fresh.round_log[1].evaluation["a"].change == -1.5 / 5  # typed again, not a dict
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    # The state names the run, the rounds, the privacy totals and the registry pointer.
    assert checkpoint.state["run_id"] == "cycle-7" and checkpoint.state["num_rounds"] == 3
    assert checkpoint.state["sites"] == {
        "a": {"rounds": 2, "epsilon": 1.75, "epsilon_ceiling": 8.0, "delta": 1e-5},
        "b": {"rounds": 2, "epsilon": 0.5, "epsilon_ceiling": 8.0, "delta": 1e-5},
    }
    assert checkpoint.state["registry"] == {"root": str((tmp_path / "registry").resolve()), "champion": 4}


def test_the_registry_pointer_passes_when_unchanged_and_refuses_a_new_champion(tmp_path):
    # Prepare
    strategy = FedAvgLoRA(spec=SPEC)
    writer = CheckpointWriter(
        tmp_path / "run", strategy, JOB, num_rounds=3, registry_root=tmp_path / "registry", champion=4
    )
    writer.write(1, to_array_record(adapter(0.0, 0.0)))
    checkpoint = resume_point(tmp_path / "run")

    # Execute / Assert: the same registry (spelt another way) and champion pass.
    check_registry_pointer(checkpoint, tmp_path / "registry" / ".." / "registry", 4)

    # A version published since (champion 5) is refused, naming both champions.
    with pytest.raises(ResumeError) as moved:
        check_registry_pointer(checkpoint, tmp_path / "registry", 5)
    assert "with champion 4" in str(moved.value) and "with champion 5" in str(moved.value)

    # So is a rollback to no champion at all, and another registry.
    with pytest.raises(ResumeError):
        check_registry_pointer(checkpoint, tmp_path / "registry", None)
    with pytest.raises(ResumeError):
        check_registry_pointer(checkpoint, tmp_path / "other-registry", 4)


def test_a_cycle_that_started_with_no_champion_resumes_with_none(tmp_path):
    writer = CheckpointWriter(
        tmp_path / "run", FedAvgLoRA(spec=SPEC), JOB, num_rounds=3, registry_root=tmp_path / "registry", champion=None
    )
    writer.write(1, to_array_record(adapter(0.0, 0.0)))

    check_registry_pointer(resume_point(tmp_path / "run"), tmp_path / "registry", None)

    with pytest.raises(ResumeError):
        check_registry_pointer(resume_point(tmp_path / "run"), tmp_path / "registry", 1)


def test_resume_point_of_a_run_without_checkpoints_is_an_error(tmp_path):
    (tmp_path / "run").mkdir()

    with pytest.raises(ResumeError) as none:
        resume_point(tmp_path / "run")

    assert str(tmp_path / "run") in str(none.value)
    assert "no complete checkpoint" in str(none.value)

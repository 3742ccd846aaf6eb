"""server/cycle/checkpoint.py: hashed, atomic, per-round checkpoints on real safetensors files.

Each test writes real checkpoints into tmp_path and damages them by hand the way a
disk or a crash would.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from server.cycle.checkpoint import KEEP, checkpoint_dir, load_latest, write_checkpoint


@pytest.fixture(autouse=True)
def propagating_logs(monkeypatch):
    # `cli.main.main` (run by other test files) turns propagation off on the
    # "fedretrain" logger; caplog listens at the root, so turn it back on here.
    monkeypatch.setattr(logging.getLogger("fedretrain"), "propagate", True)


def tensors_for(value: float) -> dict[str, dict[str, np.ndarray]]:
    """Three groups, one of them ("adapter2") sharing the "adapter" prefix without its slash."""
    return {
        "adapter": {"lora_A": np.full((1, 2), value, np.float32), "lora_B": np.full((2, 1), -value, np.float32)},
        "adapter2": {"lora_A": np.full((3,), 99.0, np.float64)},
        "rng": {"torch": np.arange(5, dtype=np.uint8)},
    }


def write_rounds(run_dir: Path, rounds: range) -> None:
    for r in rounds:
        write_checkpoint(run_dir, r, tensors_for(float(r)), {"run_id": "cycle-1", "value": r})


def entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir(run_dir).iterdir())


# --- round trip -----------------------------------------------------------------------


def test_a_checkpoint_round_trips_its_tensors_by_group_and_its_state(tmp_path):
    # Prepare
    tensors = {
        "adapter": {"lora_A": np.array([[0.5, -1.25]], np.float32), "lora_B": np.array([[2.0], [3.0]], np.float32)},
        "adapter2": {"lora_A": np.array([7, 8, 9], np.int64)},
        "strategy": {"moment": np.array([1e-8, 1e8], np.float64)},
        "rng": {"torch": np.array([0, 255, 17], np.uint8)},
    }
    state = {
        "run_id": "cycle-1",
        "strategy": {"round_log": {"2": {"sampled": 3}}},
        "gauss": None,
        "random": [3, [1, 2, 3], 0.25],
        "sites": {"a": {"epsilon": 1.5}},
    }

    # Execute
    path = write_checkpoint(tmp_path, 2, tensors, state)
    loaded = load_latest(tmp_path)

    # Assert: same directory, round; every group back bit for bit with its dtype; the
    # state is the given one plus "round".
    assert path == tmp_path / "checkpoints" / "round-0002"
    assert loaded is not None and loaded.server_round == 2 and loaded.path == path
    for group, arrays in tensors.items():
        back = loaded.group(group)
        assert sorted(back) == sorted(arrays), group
        for key, value in arrays.items():
            assert back[key].dtype == value.dtype and back[key].shape == value.shape
            assert back[key].tobytes() == value.tobytes()
    assert loaded.group("adapter")["lora_A"].tolist() == [[0.5, -1.25]]  # not adapter2's [7, 8, 9]
    assert loaded.state == {
        "round": 2,
        "run_id": "cycle-1",
        "strategy": {"round_log": {"2": {"sampled": 3}}},
        "gauss": None,
        "random": [3, [1, 2, 3], 0.25],
        "sites": {"a": {"epsilon": 1.5}},
    }
    assert sorted(p.name for p in path.iterdir()) == ["SHA256SUMS", "state.json", "tensors.safetensors"]


def test_only_the_last_three_checkpoints_are_kept(tmp_path):
    # Execute: rounds 1..5.
    write_rounds(tmp_path, range(1, 6))

    # Assert: KEEP = 3, so rounds 3, 4, 5 remain and the newest is round 5.
    assert KEEP == 3
    assert entries(tmp_path) == ["round-0003", "round-0004", "round-0005"]
    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.server_round == 5
    assert loaded.state["value"] == 5
    assert loaded.group("adapter")["lora_A"].tolist() == [[5.0, 5.0]]


def test_no_checkpoint_directory_loads_as_none(tmp_path):
    assert load_latest(tmp_path) is None


# --- damage ---------------------------------------------------------------------------


def flip_a_tensor_byte(path: Path) -> None:
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor's data
    (path / "tensors.safetensors").write_bytes(bytes(data))


def truncate_state(path: Path) -> None:
    text = (path / "state.json").read_bytes()
    (path / "state.json").write_bytes(text[: len(text) // 2])


def remove_sums(path: Path) -> None:
    (path / "SHA256SUMS").unlink()


def copy_of_the_round_before(path: Path) -> None:
    # round-0003 holds round 2's files: every hash matches, but state.json says round 2.
    shutil.rmtree(path)
    shutil.copytree(path.parent / "round-0002", path)


@pytest.mark.parametrize(
    "damage",
    [flip_a_tensor_byte, truncate_state, remove_sums, copy_of_the_round_before],
    ids=["flipped-tensor-byte", "truncated-state", "missing-sums", "round-mismatch"],
)
def test_a_damaged_newest_checkpoint_is_passed_over_for_the_one_before(
    tmp_path, caplog, damage: Callable[[Path], None]
):
    # Prepare: rounds 1..3; round 3 damaged.
    write_rounds(tmp_path, range(1, 4))
    newest = checkpoint_dir(tmp_path) / "round-0003"
    damage(newest)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedretrain.server"):
        loaded = load_latest(tmp_path)

    # Assert: round 2, as written; one warning, naming round 3's directory.
    assert loaded is not None
    assert loaded.server_round == 2 and loaded.path.name == "round-0002"
    assert loaded.state["value"] == 2
    assert loaded.group("adapter")["lora_B"].tolist() == [[-2.0], [-2.0]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(newest) in warnings[0] and "damaged" in warnings[0]


def test_a_flipped_byte_is_caught_by_its_hash(tmp_path, caplog):
    write_rounds(tmp_path, range(1, 3))
    flip_a_tensor_byte(checkpoint_dir(tmp_path) / "round-0002")

    with caplog.at_level(logging.WARNING, logger="fedretrain.server"):
        load_latest(tmp_path)

    assert "sha256 of tensors.safetensors does not match" in caplog.text


def test_all_checkpoints_damaged_loads_as_none(tmp_path, caplog):
    # Prepare: both rounds damaged, in two different ways.
    write_rounds(tmp_path, range(1, 3))
    flip_a_tensor_byte(checkpoint_dir(tmp_path) / "round-0001")
    truncate_state(checkpoint_dir(tmp_path) / "round-0002")

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedretrain.server"):
        loaded = load_latest(tmp_path)

    # Assert: nothing to load; each damaged checkpoint warned about, newest first.
    assert loaded is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "round-0002" in warnings[0] and "round-0001" in warnings[1]


def test_a_staging_directory_left_by_a_crash_is_ignored(tmp_path):
    # Prepare: rounds 1, 2; then a complete round 3 that was never renamed into place
    # (the crash came between writing it and the rename).
    write_rounds(tmp_path, range(1, 3))
    other = tmp_path / "elsewhere"
    staged = write_checkpoint(other, 3, tensors_for(3.0), {"run_id": "cycle-1", "value": 3})
    leftover = checkpoint_dir(tmp_path) / ".round-0003.k2j4h1"
    shutil.move(str(staged), str(leftover))

    # Execute
    loaded = load_latest(tmp_path)

    # Assert: round 2 is the newest checkpoint; the leftover is neither loaded nor removed.
    assert loaded is not None and loaded.server_round == 2
    assert leftover.is_dir()


# --- rewriting, refusing ----------------------------------------------------------------


def test_rewriting_a_round_replaces_its_checkpoint(tmp_path):
    # Prepare: round 2 written once (value 1.0)
    write_checkpoint(tmp_path, 2, tensors_for(1.0), {"value": "first"})

    # Execute: round 2 again, redone after a resume (value 4.0)
    write_checkpoint(tmp_path, 2, tensors_for(4.0), {"value": "second"})

    # Assert: one round-0002, no staging directory left, holding the second write.
    assert entries(tmp_path) == ["round-0002"]
    loaded = load_latest(tmp_path)
    assert loaded is not None
    assert loaded.state == {"round": 2, "value": "second"}
    assert loaded.group("adapter")["lora_A"].tolist() == [[4.0, 4.0]]


def test_nan_in_state_is_refused_and_leaves_nothing_behind(tmp_path):
    # Prepare: a good round 1.
    write_checkpoint(tmp_path, 1, tensors_for(1.0), {"loss": 0.5})

    # Execute / Assert: JSON has no NaN, so round 2 is refused.
    with pytest.raises(ValueError):
        write_checkpoint(tmp_path, 2, tensors_for(2.0), {"loss": float("nan")})

    # Assert: no round-0002 and no staging directory; round 1 is still the newest.
    assert entries(tmp_path) == ["round-0001"]
    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.server_round == 1 and loaded.state["loss"] == 0.5

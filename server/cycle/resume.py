"""What a cycle saves after each round, and how a resumed cycle takes it back.

``CheckpointWriter.write`` is the round loop's ``on_round_end``: it saves the global
adapter, the strategy's state (its round log and any server optimiser tensors), the
coordinator's random state, the sites' privacy totals as they reported them, and the
registry pointer (server/cycle/checkpoint.py writes it atomically, with hashes).
``resume_point`` finds the last complete round of a run; ``CheckpointWriter.restore``
puts the strategy and random state back and returns the adapter to go on from.

A resumed cycle keeps its run id, so each site sees the same (run, round) again: a
round the site already trained is answered from its kept reply without a second
privacy spend (client/round/replies.py), and the rounds and the privacy totals line up with
a run that was never interrupted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedretrain.arrays import from_array_record, to_array_record
from fedretrain.config import Job
from fedretrain.errors import ResumeError
from server.cycle.checkpoint import Checkpoint, load_latest, write_checkpoint
from server.cycle.rounds import random_state, restore_random_state

log = logging.getLogger("fedretrain.server")


class CheckpointWriter:
    """Writes one checkpoint per complete round of one cycle."""

    def __init__(
        self, run_dir: Path, strategy: Any, job: Job, num_rounds: int, registry_root: Path, champion: int | None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.strategy = strategy
        self.job = job
        self.num_rounds = num_rounds
        self.registry = {"root": str(Path(registry_root).resolve()), "champion": champion}

    def write(self, server_round: int, arrays: ArrayRecord) -> None:
        strategy_state, strategy_tensors = self.strategy.state_dict()
        rng_state, rng_tensors = random_state()
        state = {
            "run_id": self.job.run_id,
            "num_rounds": self.num_rounds,
            "strategy": strategy_state,
            "random": rng_state,
            "sites": privacy_totals(self.strategy.round_log),
            "registry": self.registry,
        }
        tensors = {"adapter": from_array_record(arrays), "strategy": strategy_tensors, "rng": rng_tensors}
        path = write_checkpoint(self.run_dir, server_round, tensors, state)
        log.info("round %d/%d: checkpoint %s", server_round, self.num_rounds, path)

    def restore(self, checkpoint: Checkpoint) -> ArrayRecord:
        """Put the strategy and the random state back; return the global adapter to go on from."""
        self.strategy.load_state_dict(checkpoint.state["strategy"], checkpoint.group("strategy"))
        restore_random_state(checkpoint.state["random"], checkpoint.group("rng"))
        log.info(
            "resuming run %s after round %d of %d (checkpoint %s)",
            self.job.run_id,
            checkpoint.server_round,
            self.num_rounds,
            checkpoint.path,
        )
        return to_array_record(checkpoint.group("adapter"))


def privacy_totals(round_log: dict[int, Any]) -> dict[str, dict[str, float | int]]:
    """Each site's last reported epsilon (and ceiling, delta) and the rounds it took part in."""
    totals: dict[str, dict[str, float | int]] = {}
    for server_round in sorted(round_log):
        for site, metrics in round_log[server_round].accepted.items():
            seen = totals.setdefault(site, {"rounds": 0})
            seen.update(
                epsilon=float(metrics["epsilon"]),
                epsilon_ceiling=float(metrics["epsilon-ceiling"]),
                delta=float(metrics["delta"]),
                rounds=int(seen["rounds"]) + 1,
            )
    return totals


def resume_point(run_dir: Path) -> Checkpoint:
    """The last complete round of the cycle in ``run_dir``; ResumeError if there is none."""
    checkpoint = load_latest(Path(run_dir))
    if checkpoint is None:
        raise ResumeError(f"{run_dir}: no complete checkpoint to resume from (checkpoints/ is empty or damaged)")
    return checkpoint


def check_registry_pointer(checkpoint: Checkpoint, registry_root: Path, champion: int | None) -> None:
    """ResumeError unless the registry and its champion are what the cycle started from.

    A version published or rolled back since would change the baseline the candidate
    must beat, and its starting point: such a cycle is started afresh, not resumed.
    """
    saved = checkpoint.state["registry"]
    now = {"root": str(Path(registry_root).resolve()), "champion": champion}
    if saved != now:
        raise ResumeError(
            f"{checkpoint.path}: the cycle started from registry {saved['root']} with champion "
            f"{saved['champion']}; it is now {now['root']} with champion {now['champion']}. "
            "Start a new cycle instead"
        )

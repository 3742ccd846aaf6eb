"""The site's last train reply, kept so that a repeated request costs no privacy.

A coordinator that crashed and resumed asks again for the round that was in flight.
The site already trained it and recorded the spend; training again would spend the
budget a second time for the same round. Sending the same update again is
post-processing of an output already released, so it costs nothing more.

    <state-dir>/last_train_reply.safetensors   adapter tensors; metadata: run, round,
                                               global adapter digest, metrics (JSON)

Only the last reply is kept: a resumed run repeats at most its round in flight. The
file is written after the ledger records the spend, never before, so a cached reply
always has its spend on record.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy

from fedretrain.atomic import atomic_write_bytes

log = logging.getLogger("fedretrain.client")

FILENAME = "last_train_reply.safetensors"


@dataclass(frozen=True)
class ReplyKey:
    """What makes two train requests the same: run, round and the global adapter's digest."""

    run_id: str
    server_round: int
    global_hash: str

    def as_metadata(self) -> dict[str, str]:
        return {"run-id": self.run_id, "server-round": str(self.server_round), "global-hash": self.global_hash}


def save_reply(state_dir: Path, key: ReplyKey, adapter: dict[str, np.ndarray], metrics: dict[str, float | int]) -> None:
    """Keep ``adapter`` and ``metrics`` as the reply to ``key`` (replacing the previous one)."""
    metadata = {**key.as_metadata(), "metrics": json.dumps(metrics, sort_keys=True)}
    tensors = {name: np.ascontiguousarray(value) for name, value in adapter.items()}
    atomic_write_bytes(Path(state_dir) / FILENAME, safetensors.numpy.save(tensors, metadata=metadata))


def load_reply(state_dir: Path, key: ReplyKey) -> tuple[dict[str, np.ndarray], dict[str, float | int]] | None:
    """The kept reply if it answers exactly ``key``; None otherwise (or if it is unreadable)."""
    path = Path(state_dir) / FILENAME
    if not path.exists():
        return None
    try:
        data = path.read_bytes()
        metadata = _metadata(data)
        if (
            metadata.get("run-id") != key.run_id
            or metadata.get("server-round") != str(key.server_round)
            or metadata.get("global-hash") != key.global_hash
        ):
            return None
        return dict(safetensors.numpy.load(data)), json.loads(metadata["metrics"])
    except (OSError, ValueError, KeyError) as err:  # a damaged cache is a miss, never a crash
        log.warning("%s: unreadable kept reply (%s); training the round afresh", path, err)
        return None


def _metadata(data: bytes) -> dict[str, str]:
    # The safetensors header: 8-byte little-endian length, then JSON with "__metadata__".
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    return dict(header.get("__metadata__") or {})

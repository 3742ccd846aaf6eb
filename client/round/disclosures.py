"""What a site agreed to score, so that evaluate is not an oracle the coordinator can query.

A site scores a candidate only for a round of a run it trained in, and only one
candidate per such round: the first adapter asked about is bound to the round, a
different one later is refused, and the same one gets the same noised answer again
(post-processing of a release already charged, so it costs nothing more).

    <state-dir>/evaluations.json   {"schema_version": 1,
                                    "trained": ["<run>/<round>", ...],
                                    "evaluated": {"<run>/<round>": {"candidate": sha256, "metrics": {...}}}}

Read and written under the ledger lock (client/round/site.py), atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedretrain.atomic import atomic_write_json
from fedretrain.errors import LedgerError

FILENAME = "evaluations.json"
SCHEMA_VERSION = 1


def adapter_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the adapter's keys, dtypes, shapes and bytes (in key order), computed by the site."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _round_key(run_id: str, server_round: int) -> str:
    return f"{run_id}/{server_round}"


@dataclass
class Disclosures:
    """The rounds a site trained and the one candidate it scored for each."""

    path: Path
    trained: set[str] = field(default_factory=set)
    evaluated: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path) -> Disclosures:
        path = Path(state_dir) / FILENAME
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
            trained = {str(k) for k in data["trained"]}
            evaluated = {
                str(k): {"candidate": str(v["candidate"]), "metrics": dict(v["metrics"])}
                for k, v in data["evaluated"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            # Refusing is safe; guessing could answer a question twice.
            raise LedgerError(f"{path}: unreadable record of evaluations ({err})") from None
        return cls(path, trained, evaluated)

    def mark_trained(self, run_id: str, server_round: int) -> None:
        self.trained.add(_round_key(run_id, server_round))

    def has_trained(self, run_id: str, server_round: int) -> bool:
        return _round_key(run_id, server_round) in self.trained

    def evaluation(self, run_id: str, server_round: int) -> dict[str, Any] | None:
        return self.evaluated.get(_round_key(run_id, server_round))

    def bind(self, run_id: str, server_round: int, candidate: str, metrics: Mapping[str, float | int]) -> None:
        self.evaluated[_round_key(run_id, server_round)] = {"candidate": candidate, "metrics": dict(metrics)}

    def save(self) -> None:
        atomic_write_json(
            self.path, {"schema_version": SCHEMA_VERSION, "trained": sorted(self.trained), "evaluated": self.evaluated}
        )

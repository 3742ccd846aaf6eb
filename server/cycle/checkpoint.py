"""Checkpoints of a retraining cycle, one per complete round, each with its own hash.

Flower never checkpoints a run: a coordinator that dies loses every round it ran. After
each round the driver writes everything a resumed cycle needs to go on as if nothing
had happened:

    <run>/checkpoints/round-0002/tensors.safetensors  the global adapter ("adapter/<key>"),
                                                     strategy tensors ("strategy/<key>", e.g.
                                                     server optimiser moments) and the torch
                                                     random state ("rng/torch")
    <run>/checkpoints/round-0002/state.json          round, run id, strategy state, Python and
                                                     NumPy random state, the sites' privacy
                                                     totals as reported, the registry pointer
    <run>/checkpoints/round-0002/SHA256SUMS          sha256 of both files

A checkpoint is staged under a temporary name and renamed into place whole (a rename
of a directory is atomic), so a reader never sees half of one. Loading checks every
hash; a damaged last checkpoint is passed over, with a warning, for the one before it.
The last ``KEEP`` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from fedretrain.atomic import fsync_dir

log = logging.getLogger("fedretrain.server")

KEEP = 3
_NAME = re.compile(r"^round-(\d{4,})$")
_FILES = ("tensors.safetensors", "state.json")


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: the round it closes, its tensors by prefix, its JSON state."""

    server_round: int
    tensors: dict[str, np.ndarray]
    state: dict[str, Any]
    path: Path

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        """The tensors saved under ``<prefix>/``, keyed without the prefix."""
        head = prefix + "/"
        return {k[len(head) :]: v for k, v in self.tensors.items() if k.startswith(head)}


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def write_checkpoint(
    run_dir: Path, server_round: int, tensors: dict[str, dict[str, np.ndarray]], state: dict[str, Any]
) -> Path:
    """Write round ``server_round``'s checkpoint atomically; return its directory.

    ``tensors`` maps a group name ("adapter", "strategy", "rng") to arrays; ``state``
    must be JSON (no NaN). Older checkpoints beyond the last ``KEEP`` are removed.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    flat = {
        f"{group}/{key}": np.ascontiguousarray(value)
        for group, arrays in tensors.items()
        for key, value in arrays.items()
    }
    blobs = {
        "tensors.safetensors": safetensors.numpy.save(flat),
        "state.json": json.dumps({"round": server_round, **state}, sort_keys=True, allow_nan=False).encode(),
    }
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in blobs.items())
    staging = Path(tempfile.mkdtemp(prefix=f".round-{server_round:04d}.", dir=root))
    try:
        for name, data in {**blobs, "SHA256SUMS": sums.encode()}.items():
            with open(staging / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        fsync_dir(staging)
        target = root / f"round-{server_round:04d}"
        if target.exists():  # a round redone after a resume replaces its old checkpoint
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(root)
    for old in _rounds(root)[KEEP:]:
        shutil.rmtree(old[1], ignore_errors=True)
    return target


def load_latest(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint whose hashes verify, or None if there is none.

    A checkpoint that fails (missing file, hash mismatch, unreadable) is logged and
    skipped for the one before it.
    """
    for server_round, path in _rounds(checkpoint_dir(run_dir)):
        try:
            return _load(path, server_round)
        except (OSError, ValueError, KeyError) as err:
            log.warning("checkpoint %s is damaged (%s); trying the one before it", path, err)
    return None


def _load(path: Path, server_round: int) -> Checkpoint:
    expected = {}
    for line in (path / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        expected[name] = digest
    if sorted(expected) != sorted(_FILES):
        raise ValueError(f"SHA256SUMS lists {sorted(expected)}, expected {sorted(_FILES)}")
    blobs = {name: (path / name).read_bytes() for name in _FILES}
    for name, data in blobs.items():
        if hashlib.sha256(data).hexdigest() != expected[name]:
            raise ValueError(f"sha256 of {name} does not match SHA256SUMS")
    state = json.loads(blobs["state.json"])
    if state.get("round") != server_round:
        raise ValueError(f"state.json says round {state.get('round')!r}, the directory round {server_round}")
    return Checkpoint(
        server_round=server_round,
        tensors=dict(safetensors.numpy.load(blobs["tensors.safetensors"])),
        state=state,
        path=path,
    )


def _rounds(root: Path) -> list[tuple[int, Path]]:
    """(round, directory) of every checkpoint below ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)

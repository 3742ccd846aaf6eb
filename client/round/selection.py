"""Which of its window's records a site trains on in a round (``train.selection``).

``all``          every record of the window (the default)
``uncertainty``  the records the installed version is least sure of: those whose loss under it
                 (the bare base model before any version) is at least ``train.selection_threshold``
                 nats, plus each other record with probability ``train.selection_share``
``random``       each record with probability ``train.selection_share`` (the baseline at equal size)
``newest``       the newest ``ceil(selection_share * n)`` records (the baseline of recency)

**Differential privacy.** ``uncertainty`` and ``random`` decide each record by itself: its own
score under the installed version (a released, already-private model, so scoring is
post-processing) and its own coin. Adding or removing one record adds or removes at most that
record from the selection, so neighbouring data sets stay neighbouring and DP-SGD's guarantee,
with its fixed sample rate, holds unchanged: no extra accounting. ``newest`` ranks the whole
window by arrival, like ``train.window``: one record added can push another out, so under
add/remove adjacency a record's change can touch two selected records; it is a baseline for
the benchmark, said so in the README, and not for a site that wants the per-record guarantee.
A rank by score over the whole set (top-k) would do the same by content and is not offered.

The coins come from a key drawn once from the site's operating system and kept at the site
(``selection.key``, 0600): a record's coin is HMAC(key, run id, record text), the same in
every round of a cycle, different across cycles, and no one else can predict or steer it.
**Curriculum** (``train.curriculum_start``, ``train.curriculum_end``, nats): each round trains on
the records the bare base model finds easy enough, a loss ceiling rising linearly from the start
in round 1 to the end in the cycle's last round. A per-record rule too: DP-SGD's Poisson sampling
at the job's fixed rate runs within the round's pool, and the accountant stays exact.

**Replay** (``train.replay``, a share): each record of the previous cycle's training window joins
this cycle's records with that probability, by its own coin, against forgetting what the site's
data held before a drift. A per-record rule too: no extra accounting.

Nothing about the selection leaves the site, not its size nor which records, except that a
round with nothing selected is refused (before any spend, naming the setting).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from fedretrain.config import Job
from fedretrain.errors import ConfigError

log = logging.getLogger("fedretrain.client")

KEY_FILE = "selection.key"


def selection_key(state_dir: Path) -> bytes:
    """The site's secret for its selection coins, made on first use (32 bytes, mode 0600)."""
    path = Path(state_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
    key = path.read_bytes()
    if len(key) != 32:
        raise ConfigError(f"{path}: not a selection key (32 bytes); move it aside to make a new one")
    return key


def coin(key: bytes, run_id: str, text: str) -> float:
    """A record's coin in [0, 1) for this cycle: HMAC-SHA256 of the run id and its text."""
    digest = hmac.new(key, f"{run_id}\0{text}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def select(
    texts: Sequence[str],
    job: Job,
    key: bytes,
    scores: Callable[[Sequence[str]], Sequence[float]],
) -> list[int]:
    """Indices of ``texts`` (oldest first) to train on under ``job.train.selection``.

    ``scores(texts)`` gives each record's loss under the installed version; it is only called
    for ``uncertainty``.

    Raises
    ------
    ConfigError
        Nothing selected: the round is refused before any spend, naming the setting.
    """
    train = job.train
    n = len(texts)
    if train.selection == "all":
        chosen = list(range(n))
    elif train.selection == "newest":
        chosen = list(range(n - min(n, math.ceil(train.selection_share * n)), n))
    elif train.selection == "random":
        chosen = [i for i, t in enumerate(texts) if coin(key, job.run_id, t) < train.selection_share]
    else:  # uncertainty
        assert train.selection_threshold is not None  # the config requires it
        losses = scores(texts)
        chosen = [
            i
            for i, (t, loss) in enumerate(zip(texts, losses, strict=True))
            if loss >= train.selection_threshold or coin(key, job.run_id, t) < train.selection_share
        ]
    if not chosen:
        raise ConfigError(
            f"train.selection={train.selection} kept none of this site's {n} records in the window; "
            "lower train.selection_threshold or raise train.selection_share"
        )
    return chosen


REPLAY_FILE = "replay.json"


def replay_window(state_dir: Path, run_id: str, last: tuple[str, int, int] | None) -> tuple[int, int] | None:
    """The previous cycle's training window, ``[start, end)`` of ``train.jsonl``, kept for the cycle.

    ``last`` is the site's reference (run id, start, end): at a cycle's first round it is the
    previous cycle's window; later rounds of the cycle find it in ``replay.json``.
    """
    from fedretrain.atomic import atomic_write_json

    path = Path(state_dir) / REPLAY_FILE
    if path.is_file():
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
            if kept["run_id"] == run_id:
                return None if kept["window"] is None else (int(kept["window"][0]), int(kept["window"][1]))
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ConfigError(f"{path}: not a replay record ({err}); move it aside") from None
    window = None if last is None or last[0] == run_id else (last[1], last[2])
    atomic_write_json(path, {"run_id": run_id, "window": None if window is None else list(window)})
    return window


def replayed(texts: Sequence[str], current: Sequence[str], job: Job, key: bytes) -> list[str]:
    """The share ``job.train.replay`` of the previous window's ``texts`` to mix into this cycle, each
    record by its own coin (so, like ``random``, without extra accounting), none already in ``current``."""
    if not job.train.replay:
        return []
    present = set(current)
    return [t for t in texts if t not in present and coin(key, f"replay\0{job.run_id}", t) < job.train.replay]


def curriculum_threshold(job: Job, server_round: int) -> float | None:
    """This round's loss ceiling under ``train.curriculum_start``/``_end`` (None: no curriculum):
    linear from the start in round 1 to the end in the cycle's last round."""
    train = job.train
    if train.curriculum_start is None or train.curriculum_end is None:
        return None
    step = (server_round - 1) / max(1, job.rounds - 1)
    return train.curriculum_start + (train.curriculum_end - train.curriculum_start) * min(max(step, 0.0), 1.0)


def paced(
    texts: Sequence[str], job: Job, server_round: int, base_scores: Callable[[Sequence[str]], Sequence[float]]
) -> list[int]:
    """Indices of ``texts`` in this round's curriculum pool: records whose loss under the bare base
    model is at most the round's threshold (easy first, harder ones joining round by round).

    A per-record rule, like ``uncertainty``: DP-SGD then samples the pool by Poisson sampling at
    the job's fixed rate, and the accountant stays exact.

    Raises
    ------
    ConfigError
        The pool is empty: the round is refused before any spend.
    """
    threshold = curriculum_threshold(job, server_round)
    if threshold is None:
        return list(range(len(texts)))
    pool = [i for i, loss in enumerate(base_scores(texts)) if loss <= threshold]
    if not pool:
        raise ConfigError(
            f"train.curriculum_start: round {server_round}'s pool (base-model loss <= {threshold:.3f} nats) holds none "
            f"of this site's {len(texts)} records; raise train.curriculum_start"
        )
    return pool

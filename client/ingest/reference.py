"""The reference window: which of a site's records it trained on in its last cycle.

A site's store is append-only (``fedretrain site ingest`` adds records at the end of
``train.jsonl`` and ``heldout.jsonl``), so a window is a range of record positions.
After every successful training round the site writes where its training window ran
and how many held-out records it had; the status reply (client/status.py) compares
what arrived after that against it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from fedretrain.atomic import atomic_write_json
from fedretrain.config import SiteConfig
from fedretrain.errors import DataValidationError


@dataclass(frozen=True)
class Reference:
    """Where the last cycle's data ended, as record positions in the site's store.

    Attributes
    ----------
    run_id : str
        The run (cycle) the site last trained in.
    trained_at : str
        ISO 8601 UTC time of that training round.
    train_start, train_end : int
        The training window: records ``[train_start, train_end)`` of ``train.jsonl``.
    heldout_end : int
        How many held-out records the site had then.
    """

    run_id: str
    trained_at: str
    train_start: int
    train_end: int
    heldout_end: int


def load_reference(site: SiteConfig) -> Reference | None:
    """The site's reference window, or None when it has never trained."""
    path = site.reference_path
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        ref = Reference(
            run_id=str(raw["run_id"]),
            trained_at=str(raw["trained_at"]),
            train_start=int(raw["train_start"]),
            train_end=int(raw["train_end"]),
            heldout_end=int(raw["heldout_end"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataValidationError(str(path), None, None, f"is not a valid reference window ({err})") from None
    if not 0 <= ref.train_start <= ref.train_end or ref.heldout_end < 0:
        raise DataValidationError(str(path), None, "train_start", "window positions are out of order")
    return ref


def save_reference(
    site: SiteConfig, run_id: str, train_start: int, train_end: int, heldout_end: int, now: datetime | None = None
) -> Reference:
    """Record the window a training round used (atomically)."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    ref = Reference(
        run_id=run_id,
        trained_at=moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        train_start=train_start,
        train_end=train_end,
        heldout_end=heldout_end,
    )
    atomic_write_json(site.reference_path, asdict(ref))
    return ref

"""The site's human review queue: its people accept, correct or reject training records.

``fedretrain site review list`` shows the training records nobody has reviewed yet, the ones the
installed version is least sure of first (its per-record loss: client/round/selection.py's
score). ``accept``, ``reject`` and ``correct`` record a decision per record id in
``<state-dir>/review/decisions.jsonl`` (append-only, one whole line per decision under a lock,
like the serving journal; the last decision on a record counts). A correction is a new training
record through the site's own ingestion (schema, redaction, quarantine, the held-out split), with
id ``<id>.corrected``, accepted, and the original rejected.

With ``train.require_review=true`` a round trains only on accepted records (client/round/site.py);
one with none is refused before any spend. The queue and its decisions never leave the site.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.serve.journal import append_line, read_lines
from fedretrain.config import SiteConfig
from fedretrain.data.notes import Record, read_records
from fedretrain.errors import ConfigError, DataValidationError

DECISIONS = ("accept", "reject")


class UnknownRecord(ConfigError):
    """A decision names a record id that is not among the site's training records."""


@dataclass(frozen=True)
class ReviewQueue:
    root: Path

    @classmethod
    def at(cls, state_dir: Path) -> ReviewQueue:
        root = Path(state_dir) / "review"
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls(root)

    @property
    def path(self) -> Path:
        return self.root / "decisions.jsonl"

    def decisions(self) -> dict[str, str]:
        """Record id -> its last decision."""
        return {str(e["id"]): str(e["decision"]) for e in read_lines(self.path) if e.get("decision") in DECISIONS}

    def decide(self, record_id: str, decision: str, *, by: str, note: str | None = None) -> dict[str, Any]:
        if decision not in DECISIONS:
            raise ConfigError(f"review: decision must be accept or reject, got {decision!r}")
        entry = {
            "id": record_id,
            "decision": decision,
            "by": by,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if note:
            entry["note"] = note
        append_line(self.path, entry)
        return entry


def training_records(site: SiteConfig) -> list[Record]:
    return read_records(site.train_path)


def pending(site: SiteConfig, records: Sequence[Record] | None = None) -> list[Record]:
    """The training records with an id and no decision yet, oldest first."""
    decided = ReviewQueue.at(site.state_path).decisions()
    records = training_records(site) if records is None else records
    return [r for r in records if r.id and r.id not in decided]


def decide(site: SiteConfig, record_ids: Sequence[str], decision: str, *, by: str) -> list[dict[str, Any]]:
    """Accept or reject each of ``record_ids`` (UnknownRecord, nothing recorded, if one is unknown)."""
    known = {r.id for r in training_records(site) if r.id}
    unknown = [i for i in record_ids if i not in known]
    if unknown:
        raise UnknownRecord(f"review: no training record {', '.join(map(repr, unknown[:5]))} at site {site.site_id}")
    queue = ReviewQueue.at(site.state_path)
    return [queue.decide(i, decision, by=by) for i in record_ids]


def correct(site: SiteConfig, record_id: str, text: str, *, by: str) -> dict[str, Any]:
    """Ingest ``text`` as the corrected record (accepted) and reject the original."""
    from client.ingest.pipeline import ingest_records
    from fedretrain.data.notes import validate_record

    if record_id not in {r.id for r in training_records(site) if r.id}:
        raise UnknownRecord(f"review: no training record {record_id!r} at site {site.site_id}")
    corrected = {"text": text, "id": f"{record_id}.corrected"}
    validate_record(corrected, "correction", 1)  # the field and the reason, before anything is stored
    report = ingest_records(site, [corrected], source=f"review correction of {record_id}")
    if report.quarantined:
        raise DataValidationError("correction", 1, "text", "refused by the site's ingestion; see its quarantine file")
    queue = ReviewQueue.at(site.state_path)
    queue.decide(record_id, "reject", by=by, note="corrected")
    return queue.decide(corrected["id"], "accept", by=by, note=f"correction of {record_id}")


def accepted_only(site: SiteConfig, records: Sequence[Record]) -> list[Record]:
    """The records a reviewer accepted (``train.require_review``)."""
    decided = ReviewQueue.at(site.state_path).decisions()
    return [r for r in records if r.id and decided.get(r.id) == "accept"]


def as_rows(records: Sequence[Record], losses: Sequence[float]) -> list[dict[str, Any]]:
    """``review list`` rows, least sure first."""
    rows = [
        {"id": r.id, "loss": round(float(loss), 4), "text": r.text} for r, loss in zip(records, losses, strict=True)
    ]
    return sorted(rows, key=lambda row: -row["loss"])


def dumps(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False)

"""Ingestion: new records join a site's store, checked, masked, deduplicated, split.

The store is the site's ``train.jsonl`` and ``heldout.jsonl`` (append-only: other code
reads record positions as arrival order) plus ``<state-dir>/quarantine.jsonl`` for
records that were refused. For each incoming record, in input order:

1. a record that breaks the schema (bad JSON or UTF-8, missing or empty text, an id
   or timestamp of the wrong type...) goes to quarantine with the field and reason;
   its raw line stays on the site's premises, masked like any text when the site
   redacts;
2. with ``redact=true`` the text is masked (``client.ingest.redact``) before it is hashed
   or stored;
3. a duplicate is dropped: a record with an id whose id is already stored (train or
   held-out) or earlier in the batch; one without an id whose text (after masking)
   has the sha256 of any stored or earlier record;
4. the rest is stored as ``{"id"?, "text", "timestamp"?, "arrived"}``, in held-out
   when ``int(sha256(id or text)[:8], 16) / 2**32 < heldout-fraction``, else in
   train; the hash makes a record land on the same side every time.

Atomicity: under the store lock (``<state-dir>/store.lock``) the new full contents
of each changed file are written beside it, then one journal commits them all
(``client.ingest.journal``): a crash leaves the store as it was before the ingest or as
it is after it, never in between. Every ingest first finishes or discards what an
interrupted one left (``recover_store``). Logs carry counts only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.ingest import journal
from client.ingest.batch import Batch
from client.ingest.incoming import Incoming, from_mappings, read_incoming
from client.ingest.redact import KINDS, Redactor
from fedretrain.atomic import file_lock, fsync_dir
from fedretrain.config import SiteConfig
from fedretrain.errors import ConfigError, DataValidationError

log = logging.getLogger("fedretrain.client")

_KIND_NAMES = {"email": "e-mail", "phone": "phone", "record_number": "record number"}


@dataclass(frozen=True)
class IngestReport:
    """What one ingest did with one source.

    Attributes
    ----------
    source : str
        The file name, or the name given for records handed over in memory.
    accepted : int
        Records stored: ``to_train + to_heldout``.
    to_train, to_heldout : int
    duplicates : int
        Records dropped as duplicates of stored ones or of earlier ones in the batch.
    quarantined : int
        Records refused by the schema, written to the quarantine file.
    redactions : dict[str, int]
        Per kind (``email``, ``phone``, ``record_number``), what was masked in what this
        ingest wrote (stored records and quarantined lines).
    error : str | None
        Inbox only: why the file could not be read at all (it was moved to ``failed/``).
    """

    source: str
    accepted: int = 0
    to_train: int = 0
    to_heldout: int = 0
    duplicates: int = 0
    quarantined: int = 0
    redactions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    error: str | None = None

    def summary(self) -> str:
        """One line for the operator, e.g. ``new.jsonl: 38 stored (31 train, 7 held-out), ...``."""
        if self.error is not None:
            return f"{self.source}: not ingested, moved to failed/ ({self.error})"
        dropped = "duplicate" if self.duplicates == 1 else "duplicates"
        line = (
            f"{self.source}: {self.accepted} stored ({self.to_train} train, {self.to_heldout} held-out), "
            f"{self.duplicates} {dropped} dropped, {self.quarantined} quarantined"
        )
        masked = [f"{n} {_KIND_NAMES.get(k, k)}" for k, n in self.redactions.items() if n]
        return line + ("; redacted " + ", ".join(masked) if masked else "")


def ingest_file(site: SiteConfig, path: str | Path, *, now: datetime | None = None) -> IngestReport:
    """Ingest a JSONL or CSV file (by suffix) into the site's store.

    Raises
    ------
    DataValidationError
        The file cannot be read at all (bad lines are quarantined instead), or the
        site's store is not JSONL or is damaged.
    """
    path = Path(path)
    return _ingest(site, read_incoming(path), path.name, now)


def ingest_records(
    site: SiteConfig, records: Iterable[Mapping[str, Any]], *, source: str, now: datetime | None = None
) -> IngestReport:
    """Ingest records already in memory (same checks as a file; line = position from 1)."""
    return _ingest(site, from_mappings(records, source), source, now)


def ingest_inbox(
    site: SiteConfig, inbox: str | Path | None = None, *, now: datetime | None = None
) -> list[IngestReport]:
    """Ingest every ``*.jsonl`` and ``*.csv`` file of an inbox directory, in name order.

    Each file is moved to ``<inbox>/done/`` once ingested, or to ``<inbox>/failed/``
    when it cannot be read at all (its report then has ``error`` set). Names starting
    with ``.`` are skipped: a sender writes under such a name and renames when done.
    A crash between an ingest and the move re-ingests the file next time; its records
    are then dropped as duplicates.

    Raises
    ------
    ConfigError
        Neither ``inbox`` nor the site's ``inbox-dir`` is set.
    DataValidationError
        The inbox is not a directory, or the store cannot be written.
    """
    folder = _inbox_dir(site, inbox)
    reports = []
    for path in sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (".jsonl", ".csv")
    ):
        try:
            items = read_incoming(path)
        except DataValidationError as err:
            _move_into(path, folder / "failed")
            log.warning("ingest: a file in the inbox could not be read; moved to failed/")
            reports.append(IngestReport(path.name, error=str(err)))
            continue
        reports.append(_ingest(site, items, path.name, now))
        _move_into(path, folder / "done")
    return reports


def recover_store(site: SiteConfig) -> bool:
    """Finish or discard an interrupted ingest; return whether there was one.

    Cheap when nothing is pending (a few ``stat`` calls, no lock): call it before
    reading the store.
    """
    targets = _targets(site)
    if not journal.pending(_journal_path(site), targets):
        return False
    with store_lock(site):
        return journal.recover(_journal_path(site), targets)


@contextmanager
def store_lock(site: SiteConfig) -> Iterator[None]:
    """Hold the site's store lock: one ingest (or recovery) at a time."""
    with file_lock(site.state_path / "store"):
        yield


def _ingest(site: SiteConfig, items: Iterable[Incoming], source: str, now: datetime | None) -> IngestReport:
    targets = _targets(site)
    for path in targets[:2]:
        if path.suffix.lower() != ".jsonl":
            raise DataValidationError(
                str(path),
                None,
                None,
                f"is a CSV store; ingestion appends to JSONL stores (convert it to {path.with_suffix('.jsonl').name})",
            )
    redactor = Redactor(site.record_number_pattern) if site.redact else None
    with store_lock(site):
        journal.recover(_journal_path(site), targets)
        old = {path: path.read_bytes() if path.exists() else b"" for path in targets}
        batch = Batch(source, _utc_stamp(now), redactor, site.heldout_fraction)
        for path in targets[:2]:
            batch.know(path, old[path])
        for item in items:
            batch.add(item)
        added = dict(zip(targets, (batch.train, batch.heldout, batch.quarantine), strict=True))
        changes = {path: _appended(old[path], lines) for path, lines in added.items() if lines}
        if changes:
            journal.commit(_journal_path(site), changes)
    report = IngestReport(
        source,
        len(batch.train) + len(batch.heldout),
        len(batch.train),
        len(batch.heldout),
        batch.duplicates,
        len(batch.quarantine),
        dict(batch.redactions),
    )
    log.info(
        "ingest: %d stored (%d train, %d held-out), %d duplicates dropped, %d quarantined",
        report.accepted,
        report.to_train,
        report.to_heldout,
        report.duplicates,
        report.quarantined,
    )
    return report


def _appended(old: bytes, lines: list[str]) -> bytes:
    separator = b"\n" if old and not old.endswith(b"\n") else b""
    # backslashreplace: a lone surrogate in a quarantined raw line is written as its JSON escape.
    return old + separator + "".join(lines).encode("utf-8", errors="backslashreplace")


def _targets(site: SiteConfig) -> list[Path]:
    """The store's files, in a fixed order: train, held-out, quarantine."""
    return [site.train_path, site.heldout_path, site.quarantine_path]


def _journal_path(site: SiteConfig) -> Path:
    return site.state_path / "ingest.journal"


def _utc_stamp(now: datetime | None) -> str:
    moment = now or datetime.now(UTC)
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)  # naive: UTC
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _inbox_dir(site: SiteConfig, inbox: str | Path | None) -> Path:
    chosen = inbox if inbox is not None else site.inbox_dir
    if chosen is None:
        raise ConfigError("inbox-dir: not set in the site's config; name an inbox directory (--inbox DIR)")
    folder = Path(chosen)
    if not folder.is_dir():
        raise DataValidationError(str(folder), None, None, "the inbox is not a directory")
    return folder


def _move_into(path: Path, folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    target, n = folder / path.name, 1
    while target.exists():  # never overwrite an earlier file of the same name
        target, n = folder / f"{path.stem}.{n}{path.suffix}", n + 1
    os.replace(path, target)
    fsync_dir(folder)
    fsync_dir(path.parent)

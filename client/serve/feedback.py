"""Feedback on an answer: a rating becomes part of its version's live score, a correction a
training record through the site's own ingestion (schema, redaction, quarantine, the split
into training and held-out records), like any record the site ingests."""

from __future__ import annotations

from typing import Any

from client.ingest.pipeline import ingest_records
from client.serve.journal import RATINGS, Journal, now_iso
from fedretrain.config import SiteConfig
from fedretrain.data.notes import validate_record
from fedretrain.errors import ConfigError, DataValidationError

MAX_CORRECTION = 20_000  # characters: a note, not a file


class AlreadyCorrected(ConfigError):
    """A second correction of one answer: the first is already a training record."""


def give_feedback(
    site: SiteConfig,
    journal: Journal,
    request_id: str,
    *,
    rating: str | None = None,
    correction: str | None = None,
    source: str = "service",
) -> dict[str, Any]:
    """Record a rating or a correction of the answer ``request_id``; the entry written.

    Raises
    ------
    ConfigError
        Neither or both given, or a rating other than good/bad.
    UnknownRequest
        No such answer was given at this site.
    DataValidationError
        The correction fails the schema (naming the field): nothing is recorded.
    """
    if (rating is None) == (correction is None):
        raise ConfigError("feedback: give a rating (good or bad) or a correction, one of the two")
    if rating is not None and rating not in RATINGS:
        raise ConfigError(f"feedback: rating must be 'good' or 'bad', got {rating[:40]!r}")
    answered = journal.request(request_id)
    entry: dict[str, Any] = {"id": request_id, "at": now_iso(), "version": answered["version"], "source": source}
    if rating is not None:
        journal.record_feedback(entry | {"rating": rating})
        return entry | {"rating": rating}
    assert correction is not None
    if len(correction) > MAX_CORRECTION:
        raise DataValidationError("correction", 1, "text", f"longer than {MAX_CORRECTION} characters")
    # What the answer should have been, after the prompt the user gave: one training record.
    record = {"text": answered["prompt"] + correction, "id": f"correction-{request_id}"}
    validate_record(record, "correction", 1)  # before anything is stored: the field and the reason
    if any("correction" in f for f in journal.feedback_for(request_id)):
        raise AlreadyCorrected(f"feedback: {request_id} already has a correction; it is in the site's data")
    report = ingest_records(site, [record], source=f"correction of {request_id}")
    ingested = {"to_train": report.to_train, "to_heldout": report.to_heldout, "duplicates": report.duplicates}
    if report.quarantined:
        raise DataValidationError("correction", 1, "text", "refused by the site's ingestion; see its quarantine file")
    entry |= {"correction": correction, "ingested": ingested}
    journal.record_feedback(entry)
    return entry

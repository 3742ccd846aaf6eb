"""One ingest batch sorted record by record: quarantine, mask, drop duplicates, split.

``client.ingest.pipeline`` owns the store and its transaction; this module only decides, for
each incoming record, which line (if any) it becomes in which file. The rules are
stated in ``client.ingest.pipeline``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from client.ingest.incoming import Incoming
from client.ingest.redact import KINDS, Redactor
from fedretrain.data.notes import Record, validate_record
from fedretrain.errors import DataValidationError

_SURROGATE = re.compile("[\ud800-\udfff]")


class Batch:
    """Sorts one batch into train, held-out and quarantine lines, counting as it goes.

    Parameters
    ----------
    source : str
        Named in quarantine entries and error reasons.
    stamp : str
        ISO 8601 UTC time written as ``arrived`` and ``quarantined_at``.
    redactor : Redactor | None
        Masks every text before it is hashed or kept; None: nothing is masked.
    heldout_fraction : float
        Share of records (by hash) that go to held-out.

    Attributes
    ----------
    train, heldout, quarantine : list[str]
        The JSON lines (with their newline) to append to each file, in input order.
    duplicates : int
    redactions : dict[str, int]
        Masked per kind in the lines kept (duplicates are not counted).
    """

    def __init__(self, source: str, stamp: str, redactor: Redactor | None, heldout_fraction: float) -> None:
        self.source, self.stamp, self.redactor, self.fraction = source, stamp, redactor, heldout_fraction
        self.ids: set[str] = set()
        self.digests: set[str] = set()
        self.train: list[str] = []
        self.heldout: list[str] = []
        self.quarantine: list[str] = []
        self.duplicates = 0
        self.redactions = dict.fromkeys(KINDS, 0)

    def know(self, store: Path, content: bytes) -> None:
        """Remember the ids and text hashes already in a store file."""
        for obj in _stored_records(store, content):
            if obj.get("id") is not None:
                self.ids.add(str(obj["id"]))
            self.digests.add(_sha256(obj["text"]))

    def add(self, item: Incoming) -> None:
        record = _validated(item, self.source)
        if isinstance(record, DataValidationError):
            self._quarantine(item, record)
            return
        text, counts = self._mask(record.text)
        digest = _sha256(text)
        if (record.id in self.ids) if record.id is not None else (digest in self.digests):
            self.duplicates += 1
            return
        self._count(counts)
        if record.id is not None:
            self.ids.add(record.id)
        self.digests.add(digest)
        stored = {"id": record.id, "text": text, "timestamp": record.timestamp, "arrived": self.stamp}
        side = self.heldout if _heldout_share(record.id or text) < self.fraction else self.train
        side.append(_json_line({k: v for k, v in stored.items() if v is not None}))

    def _quarantine(self, item: Incoming, err: DataValidationError) -> None:
        raw, counts = self._mask(item.raw)
        self._count(counts)
        entry = {
            "source": self.source,
            "line": item.line,
            "field": err.field,
            "reason": err.reason,
            "record": raw,
            "quarantined_at": self.stamp,
        }
        self.quarantine.append(_json_line(entry))

    def _mask(self, text: str) -> tuple[str, dict[str, int]]:
        return (text, {}) if self.redactor is None else self.redactor.redact(text)

    def _count(self, counts: dict[str, int]) -> None:
        for kind, count in counts.items():
            self.redactions[kind] += count


def _stored_records(store: Path, content: bytes) -> Iterator[dict[str, Any]]:
    # The store was written by ingestion or the site itself; a damaged line is not guessed around.
    for number, line in enumerate(content.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:  # JSON and UTF-8 errors alike
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataValidationError(
                str(store),
                number,
                None,
                "the store holds a line that is not a record; fix it (fedretrain data validate) before ingesting",
            )
        yield obj


def _validated(item: Incoming, source: str) -> Record | DataValidationError:
    if item.error is not None or item.fields is None:
        return item.error or DataValidationError(source, item.line, None, "could not be parsed")
    try:
        record = validate_record(item.fields, source, item.line)
    except DataValidationError as err:
        return err
    # JSON escapes can smuggle in lone surrogates ("\ud800"): not text, and not storable as UTF-8.
    for name, value in (("text", record.text), ("id", record.id)):
        if value is not None and _SURROGATE.search(value):
            return DataValidationError(source, item.line, name, "is not valid Unicode (it holds a lone surrogate)")
    return record


def _heldout_share(key: str) -> float:
    return int(_sha256(key)[:8], 16) / 2**32


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _json_line(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"

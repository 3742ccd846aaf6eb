"""The schema of a site's data: one record per line, ``{"text": ..., "id"?: ..., "timestamp"?: ...}``.

Every file is checked whole before any training starts: the first problem raises
``DataValidationError`` naming the file, the line and the field, and nothing is sent.
Messages never quote a record's values (ids, dates): a site's refusal reaches the
coordinator as an error reply.
JSONL is the native format; CSV with a header that has a ``text`` column is accepted too.
Keys other than text, id and timestamp (such as ``arrived``, written by ingestion) are ignored.

``read_records`` checks a whole file; ``validate_record`` checks one record, for callers
(ingestion) that set a bad record aside and go on with the rest.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fedretrain.errors import DataValidationError

MAX_TEXT_CHARS = 100_000  # a record longer than this is almost surely a broken export


@dataclass(frozen=True)
class Record:
    text: str
    id: str | None = None
    timestamp: str | None = None


def read_records(path: str | Path) -> list[Record]:
    """Read and validate every record of a JSONL or CSV file (by suffix)."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(str(path), None, None, "no such file")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataValidationError(str(path), line, None, "is not valid UTF-8") from None
    if path.suffix.lower() == ".csv":
        records = _read_csv(path, content)
    else:
        records = _read_jsonl(path, content)
    if not records:
        raise DataValidationError(str(path), None, None, "has no records (the file is empty)")
    return records


def optional_texts(path: str | Path) -> list[str]:
    """The texts of a data file that may be missing or empty (zero records, not an error)."""
    path = Path(path)
    if not path.is_file() or not path.read_bytes().strip():
        return []
    return [r.text for r in read_records(path)]


def _read_jsonl(path: Path, content: str) -> list[Record]:
    records: list[Record] = []
    seen: dict[str, int] = {}
    for number, line in jsonl_lines(content):
        records.append(validate_record(parse_jsonl_line(path, number, line), path, number, seen))
    return records


def _read_csv(path: Path, content: str) -> list[Record]:
    records: list[Record] = []
    seen: dict[str, int] = {}
    for _first, last, obj in csv_rows(path, content):
        records.append(validate_record(obj, path, last, seen))
    return records


def jsonl_lines(content: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line)`` for every non-blank line of a JSONL text (1-based numbers)."""
    # Split on "\n" only (JSON Lines): str.splitlines() also breaks at U+2028, U+2029 and
    # U+0085, which JSON allows raw inside strings, and would refuse a valid file.
    for number, line in enumerate(content.split("\n"), start=1):
        if line.strip():
            yield number, line


def parse_jsonl_line(path: str | Path, line: int, text: str) -> dict[str, Any]:
    """Parse one JSONL line into an object.

    Raises
    ------
    DataValidationError
        The line is not valid JSON, or not a JSON object.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataValidationError(str(path), line, None, f"is not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise DataValidationError(str(path), line, None, f"must be a JSON object, got {type(obj).__name__}")
    return obj


def csv_rows(path: str | Path, content: str) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Yield ``(first line, last line, fields)`` for every row of a CSV text with a ``text`` column.

    Line numbers are physical and 1-based: a quoted newline makes a row span several
    lines. Empty fields are left out, except ``text`` (kept so that an empty text is
    reported as empty rather than missing).

    Raises
    ------
    DataValidationError
        The header has no ``text`` column (raised before the first row).
    """
    reader = csv.DictReader(io.StringIO(content, newline=""))
    if reader.fieldnames is None or "text" not in reader.fieldnames:
        raise DataValidationError(str(path), 1, "text", "the CSV header has no 'text' column")
    previous = reader.line_num
    for row in reader:
        obj = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
        if "text" not in obj:
            obj["text"] = row.get("text")
        yield previous + 1, reader.line_num, obj
        previous = reader.line_num


def validate_record(obj: Mapping[str, Any], path: str | Path, line: int, seen: dict[str, int] | None = None) -> Record:
    """Check one record against the schema; keys other than text, id and timestamp are ignored.

    Parameters
    ----------
    obj : Mapping[str, Any]
        The record as parsed (a JSON object or a CSV row).
    path, line : str | Path, int
        Where it came from, for the error message.
    seen : dict[str, int] | None
        Ids met so far in the same file, mapped to their line; updated in place. A
        repeated id is an error. None: ids are not checked for repeats.

    Raises
    ------
    DataValidationError
        Naming the field and the reason, never quoting the record's values.
    """
    where = (str(path), line)
    if "text" not in obj:
        raise DataValidationError(*where, "text", "is missing")
    text = obj["text"]
    if not isinstance(text, str):
        raise DataValidationError(*where, "text", f"must be a string, got {_kind(text)}")
    if not text.strip():
        raise DataValidationError(*where, "text", "is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise DataValidationError(*where, "text", f"is longer than {MAX_TEXT_CHARS} characters")
    record_id = obj.get("id")
    if record_id is not None:
        if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
            raise DataValidationError(*where, "id", f"must be a string or an integer, got {_kind(record_id)}")
        record_id = str(record_id)
        if seen is not None:
            if record_id in seen:
                raise DataValidationError(*where, "id", f"duplicates the id on line {seen[record_id]}")
            seen[record_id] = line
    timestamp = obj.get("timestamp")
    if timestamp is not None:
        if not isinstance(timestamp, str) or not _is_iso8601(timestamp):
            # The value is not echoed: this message travels to the coordinator in the error reply.
            got = "a string that is not a date" if isinstance(timestamp, str) else _kind(timestamp)
            raise DataValidationError(*where, "timestamp", f"must be an ISO 8601 string, got {got}")
    return Record(text=text, id=record_id, timestamp=timestamp)


def _is_iso8601(value: str) -> bool:
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__

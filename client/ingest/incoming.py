"""New data as it arrives at a site, one item per record, bad lines included.

``fedretrain data validate`` and training refuse a whole file at its first bad line.
Ingestion must not: a bad line is set aside (quarantined) and the rest goes on. So
this module parses a JSONL or CSV file line by line and keeps, for each record, the
raw text as received and either the parsed fields or the reason they could not be
parsed. Checking the fields against the schema is the caller's (``validate_record``).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedretrain.data.notes import csv_rows, jsonl_lines, parse_jsonl_line
from fedretrain.errors import DataValidationError

# Bytes that are not UTF-8 survive decoding as lone surrogates U+DC80..U+DCFF ("surrogateescape").
_UNDECODABLE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class Incoming:
    """One record as received.

    Attributes
    ----------
    line : int
        Its 1-based line in the source (the last line of a CSV row that spans several;
        the position for records handed over in memory).
    raw : str
        The text as received; bytes that are not UTF-8 are written as ``\\xNN``.
    fields : Mapping[str, Any] | None
        The parsed record, or None when ``error`` says why it could not be parsed.
    error : DataValidationError | None
    """

    line: int
    raw: str
    fields: Mapping[str, Any] | None
    error: DataValidationError | None = None


def read_incoming(path: Path) -> list[Incoming]:
    """Parse a JSONL or CSV file (by suffix) into one ``Incoming`` per record.

    Raises
    ------
    DataValidationError
        Only when the file as a whole cannot be read: missing, unreadable, or a CSV
        header without a ``text`` column. Problems of single lines are in the items.
    """
    if not path.is_file():
        raise DataValidationError(str(path), None, None, "no such file")
    try:
        content = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as err:
        raise DataValidationError(str(path), None, None, f"cannot be read ({err.strerror})") from None
    if path.suffix.lower() == ".csv":
        return list(_csv_items(path, content))
    return [_jsonl_item(path, number, line) for number, line in jsonl_lines(content)]


def from_mappings(records: Iterable[Any], source: str) -> Iterator[Incoming]:
    """Wrap records already in memory; the raw text of each is its JSON form."""
    for position, record in enumerate(records, start=1):
        if not isinstance(record, Mapping):
            error = DataValidationError(
                source, position, None, f"must be a mapping (JSON object), got {type(record).__name__}"
            )
            yield Incoming(position, _as_json(record), None, error)
        else:
            yield Incoming(position, _as_json(dict(record)), record)


def _jsonl_item(path: Path, number: int, line: str) -> Incoming:
    raw = _printable(line)
    if _UNDECODABLE.search(line):
        return Incoming(number, raw, None, DataValidationError(str(path), number, None, "is not valid UTF-8"))
    try:
        return Incoming(number, raw, parse_jsonl_line(path, number, line))
    except DataValidationError as err:
        return Incoming(number, raw, None, err)


def _csv_items(path: Path, content: str) -> Iterator[Incoming]:
    # Physical lines as csv reads them (newline="" keeps "\r\n" and quoted newlines intact),
    # so each row's raw text is exactly the lines it spans.
    lines = io.StringIO(content, newline="").readlines()
    for first, last, fields in csv_rows(path, content):
        text = "".join(lines[first - 1 : last]).rstrip("\r\n")
        if _UNDECODABLE.search(text):
            yield Incoming(
                last, _printable(text), None, DataValidationError(str(path), last, None, "is not valid UTF-8")
            )
        else:
            yield Incoming(last, text, fields)


def _printable(text: str) -> str:
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def _as_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)

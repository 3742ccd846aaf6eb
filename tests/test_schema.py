"""Data schema: each bad file is named with its line and field; nothing trains on it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedretrain.data.notes import Record, read_records
from fedretrain.errors import DataValidationError


def _write(tmp_path, name, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_good_jsonl_reads_every_record(tmp_path):
    path = _write(
        tmp_path,
        "ok.jsonl",
        '{"text": "Pt seen.", "id": "a1", "timestamp": "2026-01-02T08:00:00Z"}\n\n{"text": "Second.", "id": 7}\n',
    )
    assert read_records(path) == [Record("Pt seen.", "a1", "2026-01-02T08:00:00Z"), Record("Second.", "7")]


def test_good_csv_reads_the_text_column(tmp_path):
    path = _write(tmp_path, "ok.csv", 'id,text\n1,"Chief complaint: cough, fever"\n2,Plan: rest\n')
    assert [r.text for r in read_records(path)] == ["Chief complaint: cough, fever", "Plan: rest"]


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    # JSON allows U+2028, U+2029 and U+0085 raw inside a string; only "\n" ends a record.
    texts = ["Hx:\u2028cough", "Plan\u2029rest", "BP\x85120/80"]
    content = "".join('{"text": "' + t + '"}\r\n' for t in texts)
    path = _write(tmp_path, "seps.jsonl", content + '{"text": 1}\n')
    with pytest.raises(DataValidationError) as err:
        read_records(path)
    assert (err.value.line, err.value.field) == (4, "text")  # physical line numbers still hold
    path.write_text(content, encoding="utf-8", newline="")
    assert [r.text for r in read_records(path)] == texts


@pytest.mark.parametrize(
    ("content", "line", "field", "words"),
    [
        ('{"text": "ok"}\n{"text": "broken"\n', 2, None, "not valid JSON"),
        ('{"text": "ok"}\n{"id": "x"}\n', 2, "text", "missing"),
        ('{"text": 42}\n', 1, "text", "must be a string, got int"),
        ('{"text": null}\n', 1, "text", "got null"),
        ('{"text": "  "}\n', 1, "text", "empty"),
        ('["text"]\n', 1, None, "JSON object"),
        ('{"text": "a", "id": true}\n', 1, "id", "string or an integer"),
        ('{"text": "a", "id": "x"}\n{"text": "b", "id": "x"}\n', 2, "id", "duplicates the id on line 1"),
        ('{"text": "a", "timestamp": "yesterday"}\n', 1, "timestamp", "ISO 8601"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path, content, line, field, words):
    path = _write(tmp_path, "bad.jsonl", content)
    with pytest.raises(DataValidationError) as err:
        read_records(path)
    assert (err.value.line, err.value.field) == (line, field)
    assert str(path) in str(err.value) and words in str(err.value)


@pytest.mark.parametrize(
    "content",
    [
        '{"text": "a", "id": "MRN-4711"}\n{"text": "b", "id": "MRN-4711"}\n',
        '{"text": "a", "timestamp": "MRN-4711 on 3rd May"}\n',
    ],
    ids=["duplicate id", "bad timestamp"],
)
def test_errors_do_not_quote_record_values(tmp_path, content):
    # The message becomes the error reply a coordinator sees: no patient identifiers in it.
    path = _write(tmp_path, "ids.jsonl", content)
    with pytest.raises(DataValidationError) as err:
        read_records(path)
    assert "MRN-4711" not in str(err.value)


def test_empty_file_is_refused(tmp_path):
    path = _write(tmp_path, "empty.jsonl", "\n\n")
    with pytest.raises(DataValidationError, match="no records"):
        read_records(path)


def test_bad_utf8_names_the_line(tmp_path):
    path = _write(tmp_path, "latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataValidationError) as err:
        read_records(path)
    assert err.value.line == 2 and "UTF-8" in str(err.value)


def test_csv_without_text_column_is_refused(tmp_path):
    path = _write(tmp_path, "bad.csv", "id,note\n1,hello\n")
    with pytest.raises(DataValidationError, match="no 'text' column"):
        read_records(path)


def test_cli_validate_exits_nonzero_on_a_bad_file_and_names_it(tmp_path):
    good = _write(tmp_path, "good.jsonl", '{"text": "fine"}\n')
    bad = _write(tmp_path, "bad.jsonl", '{"text": "fine"}\n{"txt": "typo"}\n')
    ok = subprocess.run(
        [sys.executable, "-m", "cli.main", "data", "validate", str(good)], capture_output=True, text=True
    )
    fail = subprocess.run(
        [sys.executable, "-m", "cli.main", "data", "validate", str(good), str(bad)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "1 records" in ok.stdout
    assert fail.returncode == 1
    assert f"{bad}:2: field 'text' is missing" in fail.stderr

"""Ingestion: good records are stored, bad ones quarantined, duplicates dropped, all or nothing."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli.main import main
from client.ingest.pipeline import IngestReport, ingest_file, ingest_inbox, ingest_records, recover_store
from fedretrain.config import SiteConfig
from fedretrain.data.notes import read_records
from fedretrain.errors import ConfigError, DataValidationError

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STAMP = "2026-03-01T12:00:00Z"


def _site(tmp_path: Path, **overrides) -> SiteConfig:
    values = {
        "site_id": "h1",
        "data_dir": str(tmp_path / "data"),
        "epsilon_ceiling": 8.0,
        "delta": 1e-5,
        "heldout_fraction": 0.0,
    } | overrides
    return SiteConfig(**values)


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _jsonl(*objs: dict) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _heldout(key: str, fraction: float) -> bool:
    # The rule as the spec states it: int(sha256(id or text)[:8], 16) / 2**32 < heldout-fraction.
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def test_good_bad_and_duplicate_records_land_where_they_should(tmp_path):
    # Prepare: a store with one train and one held-out record; a batch with 2 new records,
    # 4 duplicates (by id and by text, against the store and within the batch) and 5 bad lines.
    site = _site(tmp_path)
    _write(site.train_path, _jsonl({"id": "a", "text": "Old note."}))
    _write(site.heldout_path, _jsonl({"text": "Held note."}))
    batch = _write(
        tmp_path / "new.jsonl",
        _jsonl(
            {"id": "a", "text": "Other text."},  # 1 dup id (store)
            {"text": "Held note."},  # 2 dup text (store)
            {"id": "n1", "text": "New one.", "timestamp": "2026-01-02T08:00:00Z"},  # 3 stored
            {"id": "n1", "text": "Again."},  # 4 dup id (batch)
            {"text": "Fresh."},  # 5 stored
            {"text": "Fresh."},  # 6 dup text (batch)
            {"text": "  "},  # 7 bad
            {"text": "x", "id": True},  # 8 bad
            {"text": "y", "timestamp": "yesterday"},  # 9 bad
        ).encode()
        + b'{"text": "broken"\n\n{"text": "caf\xe9"}\n',
    )  # 10 bad, 11 blank, 12 bad

    # Execute
    report = ingest_file(site, batch, now=NOW)

    # Assert
    assert report == IngestReport(
        "new.jsonl",
        accepted=2,
        to_train=2,
        to_heldout=0,
        duplicates=4,
        quarantined=5,
        redactions={"email": 0, "phone": 0, "record_number": 0},
    )
    assert _lines(site.train_path) == [
        {"id": "a", "text": "Old note."},
        {"id": "n1", "text": "New one.", "timestamp": "2026-01-02T08:00:00Z", "arrived": STAMP},
        {"text": "Fresh.", "arrived": STAMP},
    ]
    assert _lines(site.heldout_path) == [{"text": "Held note."}]
    quarantined = _lines(site.quarantine_path)
    assert [(q["line"], q["field"]) for q in quarantined] == [
        (7, "text"),
        (8, "id"),
        (9, "timestamp"),
        (10, None),
        (12, None),
    ]
    assert [q["reason"] for q in quarantined] == [
        "is empty",
        "must be a string or an integer, got bool",
        "must be an ISO 8601 string, got a string that is not a date",
        "is not valid JSON (Expecting ',' delimiter)",
        "is not valid UTF-8",
    ]
    assert quarantined[0] == {
        "source": "new.jsonl",
        "line": 7,
        "field": "text",
        "reason": "is empty",
        "record": '{"text": "  "}',
        "quarantined_at": STAMP,
    }
    assert quarantined[4]["record"] == '{"text": "caf\\xe9"}'


def test_held_out_share_follows_the_hash_of_id_or_text(tmp_path):
    # Prepare: 12 records with ids and 4 without, half of them expected on each side.
    site = _site(tmp_path, heldout_fraction=0.5)
    records = [{"id": f"r{i}", "text": f"Note {i}."} for i in range(12)] + [{"text": f"No id {i}."} for i in range(4)]
    keys = [r.get("id") or r["text"] for r in records]
    expected_heldout = [k for k in keys if _heldout(k, 0.5)]

    # Execute
    report = ingest_records(site, records, source="sim", now=NOW)

    # Assert
    assert 0 < len(expected_heldout) < len(records)  # both sides are exercised
    assert report.to_heldout == len(expected_heldout) and report.to_train == len(records) - len(expected_heldout)
    assert [r.get("id") or r["text"] for r in _lines(site.heldout_path)] == expected_heldout
    assert [r.get("id") or r["text"] for r in _lines(site.train_path)] == [k for k in keys if k not in expected_heldout]
    assert len(read_records(site.train_path)) == report.to_train  # the schema accepts "arrived"


def test_records_in_memory_get_the_same_checks(tmp_path):
    # Prepare
    site = _site(tmp_path)
    records = [{"id": 7, "text": "Int id."}, ["not", "a", "record"], {"text": "a\ud800b"}, {"id": "7", "text": "x"}]

    # Execute
    report = ingest_records(site, records, source="generated", now=NOW)

    # Assert: the int id is stored as "7", so the string "7" is a duplicate of it.
    assert (report.accepted, report.duplicates, report.quarantined) == (1, 1, 2)
    assert _lines(site.train_path) == [{"id": "7", "text": "Int id.", "arrived": STAMP}]
    assert [(q["line"], q["field"], q["reason"]) for q in _lines(site.quarantine_path)] == [
        (2, None, "must be a mapping (JSON object), got list"),
        (3, "text", "is not valid Unicode (it holds a lone surrogate)"),
    ]


def test_csv_input_is_ingested_and_bad_rows_keep_their_raw_lines(tmp_path):
    # Prepare: the second row spans lines 3-4 (a quoted newline); line 5 has an empty text.
    site = _site(tmp_path)
    batch = _write(
        tmp_path / "export.csv",
        'id,text,timestamp\r\n1,Cough,2026-01-05T09:00:00Z\r\n2,"Line one\nline two",\r\n3,,\r\n',
    )

    # Execute
    report = ingest_file(site, batch, now=NOW)

    # Assert
    assert (report.source, report.accepted, report.quarantined) == ("export.csv", 2, 1)
    assert _lines(site.train_path) == [
        {"id": "1", "text": "Cough", "timestamp": "2026-01-05T09:00:00Z", "arrived": STAMP},
        {"id": "2", "text": "Line one\nline two", "arrived": STAMP},
    ]
    [bad] = _lines(site.quarantine_path)
    assert (bad["line"], bad["field"], bad["reason"], bad["record"]) == (5, "text", "is empty", "3,,")


def test_a_csv_store_is_refused_naming_the_file(tmp_path):
    site = _site(tmp_path)
    store = _write(Path(site.data_dir) / "train.csv", "text\nold\n")
    batch = _write(tmp_path / "new.jsonl", _jsonl({"text": "new"}))
    with pytest.raises(DataValidationError, match="JSONL") as err:
        ingest_file(site, batch)
    assert err.value.path == str(store)
    assert store.read_text() == "text\nold\n"


def test_a_redacting_site_stores_no_contact_details_or_record_numbers(tmp_path):
    # Prepare: the two id-less notes differ only in the e-mail address: after masking they are one.
    site = _site(tmp_path, redact=True, record_number_pattern=r"MRN-?[0-9]{6}")
    batch = _write(
        tmp_path / "new.jsonl",
        _jsonl(
            {"id": "1", "text": "MRN-123456: call (555) 123-4567, aspirin 81 mg."},
            {"text": "Reply to a@example.org. BP 120/80."},
            {"text": "Reply to b@example.org. BP 120/80."},
            {"text": "", "note": "from jane@example.org"},
        ),
    )

    # Execute
    report = ingest_file(site, batch, now=NOW)

    # Assert
    assert (report.accepted, report.duplicates, report.quarantined) == (2, 1, 1)
    assert report.redactions == {"email": 2, "phone": 1, "record_number": 1}  # duplicates are not written
    assert [r["text"] for r in _lines(site.train_path)] == [
        "[RECORD]: call [PHONE], aspirin 81 mg.",
        "Reply to [EMAIL]. BP 120/80.",
    ]
    stored = site.train_path.read_text() + site.quarantine_path.read_text()
    assert "@" not in stored and "555" not in stored and "123456" not in stored
    assert report.summary() == (
        "new.jsonl: 2 stored (2 train, 0 held-out), 1 duplicate dropped, 1 quarantined; "
        "redacted 2 e-mail, 1 phone, 1 record number"
    )


def test_summary_is_one_line():
    report = IngestReport("new.jsonl", 38, 31, 7, 2, 1, {"email": 3, "phone": 1, "record_number": 0})
    assert report.summary() == (
        "new.jsonl: 38 stored (31 train, 7 held-out), 2 duplicates dropped, 1 quarantined; redacted 3 e-mail, 1 phone"
    )


def test_logs_carry_counts_only(tmp_path):
    # Prepare: a handler on the logger itself (the CLI may have turned propagation off).
    site = _site(tmp_path)
    batch = _write(tmp_path / "new.jsonl", _jsonl({"id": "MRN-4711", "text": "Secret note."}, {"text": ""}))
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("fedretrain.client")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)

    # Execute
    try:
        ingest_file(site, batch)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    # Assert
    assert seen == ["ingest: 1 stored (1 train, 0 held-out), 0 duplicates dropped, 1 quarantined"]


_CRASH = """
import json, os, signal, sys
import client.ingest.journal as journal
from client.ingest.pipeline import ingest_file
from fedretrain.config import SiteConfig
from fedretrain.data.notes import read_records

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

seam = sys.argv[1]
if seam == "before-journal":
    journal.write_journal = die
elif seam == "before-renames":
    journal.apply_journal = die
elif seam == "between-renames":
    # os.replace: 1st call writes the journal, 2nd renames train, 3rd would rename quarantine.
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            die()
        real(src, dst)
    os.replace = replace
ingest_file(SiteConfig(**json.loads(sys.argv[2])), sys.argv[3])
"""


def _crash_ingest(site: SiteConfig, batch: Path, seam: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CRASH, seam, json.dumps(site.__dict__), str(batch)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr


def _store_with_batch(tmp_path: Path) -> tuple[SiteConfig, Path, list[Path]]:
    site = _site(tmp_path)
    _write(site.train_path, _jsonl({"id": "old", "text": "Old note."}))
    _write(site.quarantine_path, '{"source": "x", "line": 1}\n')
    batch = _write(
        tmp_path / "new.jsonl", _jsonl({"id": "n1", "text": "One."}, {"id": "n2", "text": "Two."}, {"text": ""})
    )
    return site, batch, [site.train_path, site.heldout_path, site.quarantine_path]


def _snapshot(paths: list[Path]) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.exists() else None for p in paths}


def test_a_crash_before_the_journal_leaves_the_store_as_it_was(tmp_path):
    # Prepare
    site, batch, files = _store_with_batch(tmp_path)
    before = _snapshot(files)

    # Execute
    _crash_ingest(site, batch, "before-journal")
    temps = sorted(p.name for p in tmp_path.rglob("*.ingest-tmp"))
    after_crash = _snapshot(files)
    recovered = recover_store(site)
    report = ingest_file(site, batch)

    # Assert
    assert temps == [".quarantine.jsonl.ingest-tmp", ".train.jsonl.ingest-tmp"]  # the crash came after staging
    assert after_crash == before
    assert recovered is True and not list(tmp_path.rglob("*.ingest-tmp"))
    assert (report.accepted, report.quarantined) == (2, 1)
    assert [r["id"] for r in _lines(site.train_path)] == ["old", "n1", "n2"]


@pytest.mark.parametrize("seam", ["before-renames", "between-renames"])
def test_a_crash_after_the_journal_is_completed_by_recovery(tmp_path, seam):
    # Prepare
    site, batch, files = _store_with_batch(tmp_path)
    before = _snapshot(files)
    journal = site.state_path / "ingest.journal"

    # Execute
    _crash_ingest(site, batch, seam)
    journal_after_crash = journal.exists()
    train_after_crash = site.train_path.read_bytes()
    recovered, again = recover_store(site), recover_store(site)
    rerun = ingest_file(site, batch)

    # Assert
    assert journal_after_crash
    assert (train_after_crash == before[site.train_path]) == (seam == "before-renames")
    assert (recovered, again) == (True, False) and not journal.exists()
    assert [r["id"] for r in _lines(site.train_path)] == ["old", "n1", "n2"]  # the batch, exactly once
    assert len(_lines(site.quarantine_path)) == 1 + 1 + 1  # the old line, the batch's, the rerun's
    assert (rerun.accepted, rerun.duplicates) == (0, 2)
    assert not site.heldout_path.exists()


def test_recover_store_is_a_no_op_when_nothing_is_pending(tmp_path):
    site = _site(tmp_path)
    assert recover_store(site) is False
    assert not Path(site.data_dir).exists()  # not even the lock file was created


def test_inbox_files_are_ingested_in_name_order_and_moved(tmp_path):
    # Prepare
    inbox = tmp_path / "inbox"
    site = _site(tmp_path, inbox_dir=str(inbox))
    _write(inbox / "b.csv", "id,text\n2,Second.\n")
    _write(inbox / "a.jsonl", _jsonl({"id": "1", "text": "First."}))
    _write(inbox / "c.csv", "id,note\n3,no text column\n")
    _write(inbox / "notes.txt", "ignored")
    _write(inbox / ".d.jsonl", _jsonl({"text": "still being written"}))

    # Execute
    reports = ingest_inbox(site, now=NOW)

    # Assert
    assert [(r.source, r.accepted, r.error is None) for r in reports] == [
        ("a.jsonl", 1, True),
        ("b.csv", 1, True),
        ("c.csv", 0, False),
    ]
    assert "no 'text' column" in reports[2].summary()
    assert [r["id"] for r in _lines(site.train_path)] == ["1", "2"]
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.jsonl", "b.csv"]
    assert [p.name for p in (inbox / "failed").iterdir()] == ["c.csv"]
    assert sorted(p.name for p in inbox.iterdir()) == [".d.jsonl", "done", "failed", "notes.txt"]


def test_inbox_without_a_directory_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="inbox-dir"):
        ingest_inbox(_site(tmp_path))


def _site_json(tmp_path: Path, site: SiteConfig) -> Path:
    return _write(tmp_path / "site.json", json.dumps(site.to_node_config()))


def test_cli_ingests_a_file_and_prints_the_summary(tmp_path, capsys):
    # Prepare
    site = _site(tmp_path)
    batch = _write(tmp_path / "new.jsonl", _jsonl({"text": "One."}, {"text": "One."}, {"id": 1}))

    # Execute
    code = main(["site", "ingest", str(batch), "--site-config", str(_site_json(tmp_path, site))])

    # Assert
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out == [
        "new.jsonl: 1 stored (1 train, 0 held-out), 1 duplicate dropped, 1 quarantined",
        f"quarantined records (reasons included) are in {site.quarantine_path}",
    ]


def test_cli_inbox_watch_moves_files_to_done(tmp_path, capsys):
    # Prepare
    inbox = tmp_path / "inbox"
    site = _site(tmp_path, inbox_dir=str(inbox))
    _write(inbox / "a.jsonl", _jsonl({"text": "First."}))
    args = ["site", "ingest", "--site-config", str(_site_json(tmp_path, site)), "--inbox"]

    # Execute
    code = main(args + ["--watch", "0.01", "--max-polls", "2"])

    # Assert
    assert code == 0
    assert capsys.readouterr().out == "a.jsonl: 1 stored (1 train, 0 held-out), 0 duplicates dropped, 0 quarantined\n"
    assert [p.name for p in (inbox / "done").iterdir()] == ["a.jsonl"] and not (inbox / "a.jsonl").exists()


def test_cli_errors_exit_2(tmp_path, capsys):
    site_json = _site_json(tmp_path, _site(tmp_path))
    assert main(["site", "ingest", str(tmp_path / "missing.jsonl"), "--site-config", str(site_json)]) == 2
    assert main(["site", "ingest", "--site-config", str(tmp_path / "nope.json"), "--inbox", str(tmp_path)]) == 2
    assert main(["site", "ingest", "--site-config", str(site_json), "--inbox"]) == 2  # no inbox-dir set
    err = capsys.readouterr().err
    assert "missing.jsonl: no such file" in err and "nope.json: cannot read" in err and "inbox-dir" in err


def test_a_journal_naming_files_outside_the_store_is_refused(tmp_path):
    # Prepare: a journal (and a temp file) that would rename over a file the store does not own.
    site = _site(tmp_path)
    outsider = _write(tmp_path / "other.txt", "keep me")
    _write(tmp_path / ".other.txt.ingest-tmp", "overwrite")
    _write(site.state_path / "ingest.journal", json.dumps({"replace": [str(outsider)]}))

    # Execute / Assert
    with pytest.raises(DataValidationError, match="outside the store"):
        recover_store(site)
    assert outsider.read_text() == "keep me"

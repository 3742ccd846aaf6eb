"""The synthetic text generator: deterministic, non-IID across sites, and a clean general corpus."""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime

from simulation import notes
from simulation.notes import (
    HEADER_SETS,
    SPECIALTIES,
    general_corpus,
    render_general_corpus,
    site_notes,
    site_style,
    specialty_mix_for_site,
    validation_notes,
)
from simulation.specialties import VOCABULARY


def _words(record: dict) -> int:
    return len(record["text"].split())


def test_same_arguments_give_the_same_text_and_another_seed_changes_it():
    # Prepare
    mix = specialty_mix_for_site(1, dirichlet_alpha=0.5, seed=3)

    # Execute
    first = site_notes(1, 50, mix, 3, site_style(1, 3))
    again = site_notes(1, 50, dict(reversed(list(mix.items()))), 3, site_style(1, 3))
    other_seed = site_notes(1, 50, mix, 4, site_style(1, 3))

    # Assert: insertion order of the mix does not matter; the seed does.
    assert first == again
    assert [r["text"] for r in first] != [r["text"] for r in other_seed]
    assert validation_notes(20, 3) == validation_notes(20, 3) != validation_notes(20, 4)
    assert general_corpus(0) == general_corpus(0) != general_corpus(1)


def test_output_does_not_depend_on_the_process_hash_seed():
    # Prepare: str hashing is randomised per process; a generator that iterated a set of
    # strings would give different text under different PYTHONHASHSEED values.
    code = (
        "import hashlib, json; from simulation.notes import *; "
        "m = specialty_mix_for_site(2, dirichlet_alpha=0.3, seed=9); "
        "out = [m, site_notes(2, 30, m, 9, site_style(2, 9)), validation_notes(30, 9), general_corpus(9)[:50]]; "
        "print(hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest())"
    )

    # Execute
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        ).stdout.strip()
        for hash_seed in ("1", "2")
    }

    # Assert
    assert len(digests) == 1


def test_records_have_ids_increasing_timestamps_and_30_to_120_words():
    # Prepare
    style = site_style(2, 0)

    # Execute
    records = site_notes(2, 200, {"neurology": 1.0, "oncology": 2.0}, 0, style)

    # Assert
    assert [r["id"] for r in records[:3]] == ["site2-0", "site2-1", "site2-2"]
    stamps = [datetime.strptime(r["timestamp"], "%Y-%m-%dT%H:%M:%SZ") for r in records]
    assert stamps == sorted(stamps) and stamps[0] > datetime(2026, 1, 1, 8, 0)
    assert all(30 <= _words(r) <= 120 for r in records)


def test_specialty_mix_is_a_dirichlet_draw_whose_spread_follows_alpha():
    # Execute
    mixes = [specialty_mix_for_site(i, dirichlet_alpha=0.5, seed=0) for i in range(4)]
    peaked = [max(specialty_mix_for_site(i, dirichlet_alpha=0.05, seed=0).values()) for i in range(4)]
    flat = [max(specialty_mix_for_site(i, dirichlet_alpha=1000.0, seed=0).values()) for i in range(4)]

    # Assert: each mix is a distribution over SPECIALTIES, and sites differ (non-IID).
    for mix in mixes:
        assert list(mix) == list(SPECIALTIES)
        assert abs(sum(mix.values()) - 1.0) < 1e-12
    assert mixes[0] != mixes[1]
    # Tiny alpha puts most mass on one specialty; huge alpha is close to uniform (1/8 each).
    assert min(peaked) > 0.5
    assert max(flat) < 1 / len(SPECIALTIES) + 0.03


def test_notes_use_only_the_specialties_in_the_mix():
    # Prepare
    cardiology, oncology = VOCABULARY["cardiology"], VOCABULARY["oncology"]

    # Execute
    records = site_notes(0, 100, {"cardiology": 1.0}, 0, site_style(1, 0))

    # Assert: the assessment names one of the specialty's conditions, capitalised (so never abbreviated).
    for record in records:
        text = record["text"]
        assert any(c[0].upper() + c[1:] in text for c in cardiology.conditions)
        assert not any(m in text for m in oncology.medications)


def test_sites_write_in_different_styles_and_lengths():
    # Prepare: sites 0..3 under one seed take different options of each style table.
    styles = [site_style(i, 5) for i in range(4)]
    terse = min(range(4), key=lambda i: styles[i].history_sentences)
    verbose = max(range(4), key=lambda i: styles[i].history_sentences)
    mix = {"pulmonology": 1.0}

    # Execute
    short_notes = site_notes(terse, 200, mix, 5, styles[terse])
    long_notes = site_notes(verbose, 200, mix, 5, styles[verbose])

    # Assert: the terse style has 1 history sentence and 1-2 plan items, the verbose one 3-4 and 3-4,
    # about 2.5 more sentences of ~8 words and 2 more plan items of ~4: roughly 25 more words.
    assert len({s.headers for s in styles}) == 4 and len({s.patient for s in styles}) == 4
    gap = statistics.mean(map(_words, long_notes)) - statistics.mean(map(_words, short_notes))
    assert 15 < gap < 45
    assert all(r["text"].startswith(styles[terse].headers[0]) for r in short_notes)


def test_validation_notes_cover_every_specialty_and_site_style():
    # Execute
    records = validation_notes(400, 0, num_sites=4)

    # Assert
    texts = [r["text"] for r in records]
    assert records[0]["id"] == "val-0"
    for i in range(4):
        label = site_style(i, 0).headers[0]
        assert any(t.startswith(label) for t in texts), label
    for name, vocab in VOCABULARY.items():
        assert any(any(m in t for m in vocab.medications) for t in texts), name


def test_general_corpus_is_plain_text_without_clinical_note_structure():
    # Execute
    started = time.perf_counter()
    text = render_general_corpus()
    seconds = time.perf_counter() - started

    # Assert: big enough to pretrain a tiny LM, quick to make, and none of the notes' headers
    # or shorthand, so notes are new to a model pretrained on it.
    assert 400_000 <= len(text.encode("utf-8")) <= 800_000
    assert seconds < 2.0
    for label in {label for headers in HEADER_SETS for label in headers}:
        assert f"{label}:" not in text and f"{label} -" not in text, label
    for shorthand in ("Pt ", " BID", " PRN", " HTN", " hx of", " yo "):
        assert shorthand not in text, shorthand


def test_bundled_general_corpus_matches_a_fresh_regeneration():
    # Prepare
    bundled = notes.GENERAL_CORPUS_PATH.read_bytes()

    # Execute
    fresh = render_general_corpus().encode("utf-8")

    # Assert: byte for byte (run `python -m simulation.notes --write-general-corpus` after changing the generator).
    assert hashlib.sha256(bundled).hexdigest() == hashlib.sha256(fresh).hexdigest()
    assert bundled.endswith(b".\n") and b"\n\n" in bundled


def test_cli_writes_the_corpus_atomically(tmp_path, monkeypatch):
    # Prepare
    target = tmp_path / "assets" / "general_corpus.md"
    monkeypatch.setattr(notes, "GENERAL_CORPUS_PATH", target)

    # Execute
    notes.main(["--write-general-corpus"])

    # Assert
    assert target.read_text(encoding="utf-8") == render_general_corpus()
    assert [p.name for p in target.parent.iterdir()] == ["general_corpus.md"]  # no temp file left behind

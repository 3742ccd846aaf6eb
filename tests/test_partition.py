"""``fedretrain data partition``: one data set into site folders, by a column or with Dirichlet skew."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from fedretrain.config import compose_config
from fedretrain.errors import ConfigError, DataValidationError
from simulation.federation import build_federation
from simulation.partition import partition

ALL_NOTES = Path(__file__).resolve().parents[1] / "examples" / "all-notes.jsonl"


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_by_a_column_each_value_is_a_site_and_every_record_keeps_its_fields(tmp_path):
    # Prepare
    before = hashlib.sha256(ALL_NOTES.read_bytes()).hexdigest()
    originals = [json.loads(line) for line in ALL_NOTES.read_text().splitlines()]

    # Execute
    counts = partition(ALL_NOTES, tmp_path / "out", by="hospital", heldout_fraction=0.2)

    # Assert: one folder per hospital, holding exactly its records, a fifth of them held out.
    assert counts == {"hospital-a": (58, 14), "hospital-b": (58, 14)}
    for site in counts:
        got = records(tmp_path / "out" / site)
        assert sorted(r["id"] for r in got) == sorted(r["id"] for r in originals if r["hospital"] == site)
        assert all(r == next(o for o in originals if o["id"] == r["id"]) for r in got)
    assert hashlib.sha256(ALL_NOTES.read_bytes()).hexdigest() == before
    # ... and the folders are sites a simulation takes as they are.
    cfg = compose_config([f"simulation.sites_dir={tmp_path / 'out'}", f"validation_path={ALL_NOTES}"])
    assert [s.site_id for s in build_federation(cfg, tmp_path / "fed").sites] == ["hospital-a", "hospital-b"]


def test_dirichlet_skew_uses_every_record_once_repeats_by_seed_and_skews_more_with_a_smaller_alpha(tmp_path):
    def spread(alpha: float, out: str, seed: int = 0) -> list[Counter]:
        partition(ALL_NOTES, tmp_path / out, sites=2, alpha=alpha, label="hospital", seed=seed)
        return [Counter(r["hospital"] for r in records(tmp_path / out / f"site-0{k}")) for k in range(2)]

    skewed, even, again = spread(0.3, "a"), spread(100.0, "b"), spread(0.3, "c")

    # Every record in exactly one site; the same seed, the same split.
    for split in (skewed, even):
        assert sum(sum(c.values()) for c in split) == 144
    assert skewed == again

    # The share of hospital-a in each site: far apart with alpha 0.3, close with alpha 100.
    def gap(split: list[Counter]) -> float:
        shares = [c["hospital-a"] / sum(c.values()) for c in split]
        return abs(shares[0] - shares[1])

    assert gap(skewed) > 0.3 > 0.15 > gap(even)


def test_length_skew_needs_no_label_column(tmp_path):
    counts = partition(ALL_NOTES, tmp_path / "out", sites=3, alpha=1.0)
    assert sorted(counts) == ["site-00", "site-01", "site-02"] and sum(a + b for a, b in counts.values()) == 144


def test_partition_refuses_what_it_cannot_do_well_and_writes_nothing(tmp_path):
    # A record without the column, named by its line.
    broken = tmp_path / "notes.jsonl"
    lines = ALL_NOTES.read_text().splitlines()
    lines[6] = json.dumps({"id": "x", "text": "a note"})
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError, match=r"notes.jsonl:7: field 'hospital' is missing"):
        partition(broken, tmp_path / "a", by="hospital")
    # A folder with something in it; a site left with too few records; neither or both ways.
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        partition(ALL_NOTES, tmp_path / "full", by="hospital")
    with pytest.raises(ConfigError, match="fewer than 2 records"):
        partition(ALL_NOTES, tmp_path / "b", sites=40, alpha=0.05, label="hospital")
    with pytest.raises(ConfigError, match="not both"):
        partition(ALL_NOTES, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"

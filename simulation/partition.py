"""One data set split into sites, for a researcher who has a single file: ``fedretrain data partition``.

Two ways, both the usual ones in federated-learning research:

- **by a column** (``by="hospital"``): one site per distinct value of that column, the
  natural split when the data says where each record came from;
- **Dirichlet skew** (``sites=N, alpha=A``): for every class, the share of its records
  each site gets is drawn from Dir(A, ..., A) (Hsu et al. 2019): a small A gives each site
  a few classes, a large A nearly the same mix everywhere. The class is a column's value
  (``label="specialty"``), or without one the record's length quartile (length skew).

Each site gets a folder with ``train.jsonl`` and ``heldout.jsonl`` (the last
``heldout_fraction`` of its records after a seeded shuffle), every record as it was in the
file (all its fields). The output folder must be new or empty; the input is only read.
``fedretrain simulate simulation.sites_dir=OUT validation_path=...`` then runs on it.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedretrain.atomic import atomic_write_text
from fedretrain.data.notes import csv_rows, jsonl_lines, parse_jsonl_line, read_records, validate_record
from fedretrain.errors import ConfigError, DataValidationError

MIN_RECORDS = 2  # a site needs at least one training and one held-out record
_SITE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Every record of a JSONL or CSV file with its line, checked as ``data validate`` checks it."""
    read_records(path)  # the whole file's checks first (encoding, ids, empty file): named with the line
    content = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows = [(last, obj) for _first, last, obj in csv_rows(path, content)]
    else:
        rows = [(number, parse_jsonl_line(path, number, line)) for number, line in jsonl_lines(content)]
    for number, obj in rows:
        validate_record(obj, path, number)
    return rows


def partition(
    path: Path,
    out: Path,
    *,
    by: str | None = None,
    sites: int | None = None,
    alpha: float = 0.5,
    label: str | None = None,
    heldout_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, tuple[int, int]]:
    """Split ``path`` into site folders below ``out``; return ``{site: (train, heldout) counts}``."""
    path, out = Path(path), Path(out)
    if (by is None) == (sites is None):
        raise ConfigError("data partition: give --by COLUMN, or --sites N (Dirichlet skew), not both")
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"--heldout: a fraction between 0 and 1, got {heldout_fraction}")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: not empty; partition writes only into a new or empty folder")
    rows = read_rows(path)
    rng = np.random.default_rng(seed)
    if by is not None:
        groups = _by_column(path, rows, by)
    else:
        assert sites is not None
        if sites < 1 or not alpha > 0:
            raise ConfigError(f"--sites must be >= 1 and --alpha > 0, got {sites} and {alpha}")
        groups = _dirichlet(path, rows, sites, alpha, label, rng)
    small = {site: len(members) for site, members in groups.items() if len(members) < MIN_RECORDS}
    if small:
        raise ConfigError(
            f"data partition: site(s) {', '.join(f'{s} ({n} records)' for s, n in sorted(small.items()))} would have "
            f"fewer than {MIN_RECORDS} records; use fewer sites or a larger alpha"
        )
    counts = {}
    for site, members in sorted(groups.items()):
        order = rng.permutation(len(members))
        shuffled = [members[i] for i in order]
        n_heldout = min(len(shuffled) - 1, max(1, round(len(shuffled) * heldout_fraction)))
        train, heldout = shuffled[:-n_heldout], shuffled[-n_heldout:]
        for name, records in (("train", train), ("heldout", heldout)):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            atomic_write_text(out / site / f"{name}.jsonl", text)
        counts[site] = (len(train), len(heldout))
    return counts


def _by_column(path: Path, rows: list[tuple[int, dict[str, Any]]], column: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    names: dict[str, str] = {}
    for number, obj in rows:
        value = obj.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataValidationError(str(path), number, column, "is missing (every record needs its site)")
        site = _SITE_NAME.sub("-", str(value)).strip("-.") or "site"
        if names.setdefault(site, str(value)) != str(value):
            raise DataValidationError(
                str(path), number, column, f"two values make the same folder name {site!r}; rename one"
            )
        groups[site].append(obj)
    return dict(groups)


def _dirichlet(
    path: Path,
    rows: list[tuple[int, dict[str, Any]]],
    sites: int,
    alpha: float,
    label: str | None,
    rng: np.random.Generator,
) -> dict[str, list[dict]]:
    if label is not None:
        for number, obj in rows:
            if obj.get(label) is None:
                raise DataValidationError(str(path), number, label, "is missing (the class to skew by)")
        classes = [str(obj[label]) for _, obj in rows]
    else:  # length skew: the quartile of the text's length is the class
        lengths = np.array([len(obj["text"]) for _, obj in rows])
        edges = np.quantile(lengths, [0.25, 0.5, 0.75])
        classes = [str(int(np.searchsorted(edges, n, side="right"))) for n in lengths]
    by_class: dict[str, list[int]] = defaultdict(list)
    for index, cls in enumerate(classes):
        by_class[cls].append(index)
    names = [f"site-{k:02d}" for k in range(sites)]
    groups: dict[str, list[dict]] = {name: [] for name in names}
    for cls in sorted(by_class):
        members = rng.permutation(by_class[cls])
        shares = rng.dirichlet([alpha] * sites)
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for name, part in zip(names, np.split(members, cuts), strict=True):
            groups[name].extend(rows[i][1] for i in part)
    return groups

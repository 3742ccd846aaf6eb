"""Replace several files as one: all of them change, or none does.

``atomic_write_bytes`` keeps one file whole; ingestion changes up to three at once
(train, held-out, quarantine), and a crash between two renames would leave a batch
half stored. So the renames go through a journal:

1. each new file is written in full to a temp file beside its target
   (``.<name>.ingest-tmp``) and fsynced, and so are their directories;
2. the journal, naming the targets, is written atomically: **the commit point**;
3. each temp file is renamed over its target, the directories are fsynced, and the
   journal is deleted.

A crash before step 2 leaves the targets untouched and some stray temp files;
``recover`` deletes them. A crash after step 2 leaves a journal whose temp files
still exist for the renames not yet done; ``recover`` does them. The caller holds a
lock around ``commit`` and ``recover`` (one writer at a time).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedretrain.atomic import atomic_write_json, fsync_dir
from fedretrain.errors import DataValidationError


def temp_path(target: Path) -> Path:
    """The fixed temp name beside ``target`` (fixed, so recovery finds strays without listing)."""
    return target.with_name(f".{target.name}.ingest-tmp")


def pending(journal: Path, targets: Sequence[Path]) -> bool:
    """Whether a journal or a temp file exists: a few ``stat`` calls, no lock, no reads."""
    return journal.exists() or any(temp_path(t).exists() for t in targets)


def commit(journal: Path, contents: Mapping[Path, bytes]) -> None:
    """Replace every file in ``contents`` with its new bytes, all or none (see the module docstring)."""
    for target, data in contents.items():
        _write_synced(temp_path(target), data)
    # The temp files' directory entries must be durable before the commit point: after a
    # power loss, recovery reads a missing temp file as "already renamed".
    for directory in sorted({t.parent for t in contents}):
        fsync_dir(directory)
    write_journal(journal, list(contents))
    apply_journal(journal, list(contents))


def write_journal(journal: Path, targets: Sequence[Path]) -> None:
    """Step 2, the commit point: from here on the new contents win."""
    atomic_write_json(journal, {"replace": [str(t) for t in targets]})


def apply_journal(journal: Path, targets: Sequence[Path]) -> None:
    """Step 3: rename each temp file still present over its target, then delete the journal."""
    for target in targets:
        tmp = temp_path(target)
        if tmp.exists():  # absent: renamed before a crash
            os.replace(tmp, target)
    for directory in sorted({t.parent for t in targets}):
        fsync_dir(directory)
    journal.unlink()
    fsync_dir(journal.parent)


def recover(journal: Path, targets: Sequence[Path]) -> bool:
    """Finish a committed change or discard an uncommitted one; return whether there was one.

    Parameters
    ----------
    journal : Path
        The journal file.
    targets : Sequence[Path]
        Every file this journal may replace. A journal naming anything else is refused.

    Raises
    ------
    DataValidationError
        The journal cannot be read or names a file outside ``targets``; nothing is touched.
    """
    if journal.exists():
        apply_journal(journal, _read_journal(journal, targets))
        return True
    strays = [temp_path(t) for t in targets if temp_path(t).exists()]
    for stray in strays:
        stray.unlink()
    for directory in sorted({s.parent for s in strays}):
        fsync_dir(directory)
    return bool(strays)


def _read_journal(journal: Path, targets: Sequence[Path]) -> list[Path]:
    try:
        named = [Path(p) for p in json.loads(journal.read_text(encoding="utf-8"))["replace"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataValidationError(
            str(journal), None, None, f"is not a readable ingest journal ({err}); the store was left as it is"
        ) from None
    outside = [str(p) for p in named if p not in targets]
    if outside:
        raise DataValidationError(
            str(journal),
            None,
            None,
            f"names files outside the store ({', '.join(outside)}); the store was left as it is",
        )
    return named


def _write_synced(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())

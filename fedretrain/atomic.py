"""Atomic file writes: write a temporary file beside the target, fsync, rename.

A reader sees either the old file or the new one, never half of either, and a
crash mid-write leaves the old file in place.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (same-directory temp file + ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, mode: int | None = None) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", mode=mode)


@contextmanager
def file_lock(path: str | os.PathLike[str], *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock guarding ``path``; yields whether it is held.

    Atomic writes keep a file whole, but a read-modify-write needs a lock too. The
    lock is ``<path>.lock`` (flock), released when the block ends or the process dies.
    With ``wait=False`` it does not block: the block runs with False when another
    process holds the lock.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def lock_held(path: str | os.PathLike[str]) -> bool:
    """Whether another open file holds an flock on ``path`` (False if it does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a shared lock taken here
    return False


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort where the OS refuses)."""
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def install_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a directory whole: ``write`` fills a staging directory beside ``target``, which is then
    renamed into place (an existing ``target`` is moved aside first and removed: a directory cannot
    be renamed over; if the second rename fails, it is moved back). An error leaves the old
    directory or the new one, never a mix, and no staging directory; a crash between the two
    renames leaves the old one in a ``.retired-*`` directory beside it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        write(staging)
        if target.is_dir():
            retired = Path(tempfile.mkdtemp(prefix=".retired-", dir=target.parent))
            target.rename(retired / target.name)
            try:
                staging.rename(target)
            except BaseException:
                (retired / target.name).rename(target)  # the old copy back where it was
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # The directory entry must be on disk before anything points at it.
    fsync_dir(target.parent)

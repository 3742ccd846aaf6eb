"""Private directories and files whatever the process's umask.

``mkdir`` and ``open`` apply the umask, and some tools ignore it the other way: under
umask 000 ``Path.mkdir`` makes a key directory 0777 (anyone may swap ``ca.pem`` for
their own), and SQLite creates Flower's ``state.db`` 0644 under any umask, its
``-wal`` and ``-shm`` files taking the database file's mode. So the deployment's
directories and the SuperLink's database are created here with an explicit mode and
then ``chmod``-ed to it, which the umask cannot touch.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger("fedretrain")

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and any missing parents as 0700 (owner only); return it.

    ``path`` itself is made 0700 even when it exists already (a directory made by an
    earlier run under umask 000); existing parents are left as they are, since they
    may be shared ones such as a home directory.

    Raises
    ------
    OSError
        ``path`` exists and is not a directory, or cannot be created or changed.
    """
    target = Path(path)
    missing = []
    for parent in [target, *target.parents]:
        if parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):  # outermost first
        try:
            directory.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:  # created meanwhile by another process: made private below
            pass
        os.chmod(directory, PRIVATE_DIR)
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    mode = stat.S_IMODE(target.stat().st_mode)
    if mode != PRIVATE_DIR:
        logger.warning("%s had mode %o; made it %o (owner only)", target, mode, PRIVATE_DIR)
        os.chmod(target, PRIVATE_DIR)
    return target


def private_file(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` empty if it is missing, and make it 0600 either way; return it.

    Raises
    ------
    OSError
        ``path`` cannot be opened for writing or its mode cannot be changed.

    The content of an existing file is left as it is. SQLite opens an empty file as an
    empty database and gives its journal files the database file's mode, so a
    ``state.db`` made here before ``flower-superlink --database`` starts stays private
    with everything SQLite writes beside it.
    """
    target = Path(path)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return target

"""What an error reply may say of a site's disks: file names, not where they live."""

from __future__ import annotations

import re

# An absolute path tells the coordinator how the site's disks are laid out; the file's name
# is all it needs to say what failed. Not after a word, a dot, a colon or a slash, so
# ratios (120/80), relative paths and URLs stay as they are.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~])(?:/[^\s/'\"(),;]+)+/?")


def without_paths(reason: str) -> str:
    """``reason`` with every absolute path cut to its last part (``/srv/site/data/a.jsonl`` -> ``a.jsonl``)."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", reason)

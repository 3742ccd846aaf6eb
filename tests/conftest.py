"""Shared fixtures. Tests build their own tiny models and data; nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The embedded base model is built once per machine into the repo's .cache (ignored by
# git) and reused by every test and test run, instead of the user's ~/.cache.
os.environ.setdefault("FEDRETRAIN_CACHE", str(REPO / ".cache" / "fedretrain"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def repo() -> Path:
    return REPO

"""Where ``conf/`` is, and what it declares beyond the schema: the strategies and their options.

Each strategy has its own ``conf/strategy/<name>.yaml`` listing its algorithm's options
with their defaults; that folder is the list of valid ``strategy.name`` values, read
here so a config is checked when it is parsed (strategies/registry.py holds the
algorithms, and tests/test_strategies.py checks the two agree).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from fedretrain.errors import ConfigError

CONF_DIR_ENV = "FEDRETRAIN_CONF"


def conf_dir() -> Path:
    """The ``conf/`` directory: ``$FEDRETRAIN_CONF`` or the one beside this package."""
    env = os.environ.get(CONF_DIR_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{CONF_DIR_ENV}: no config.yaml in {path}")
    return path


def strategy_declarations() -> dict[str, dict[str, Any]]:
    """Strategy name -> its options and their defaults, from ``conf/strategy/*.yaml``."""
    return _declarations(conf_dir() / "strategy")


@functools.cache
def _declarations(folder: Path) -> dict[str, dict[str, Any]]:
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        options = data.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{path}: options: expected a mapping, got {options!r}")
        out[path.stem] = dict(options)
    return out

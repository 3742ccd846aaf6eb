"""Hydra composition: the single source of truth for run-wide settings.

``compose_config(overrides)`` composes ``conf/config.yaml`` with command-line style
overrides and parses the result once into a frozen ``Config``. Flower's run_config is
a thin front over the same thing (``overrides_from_run_config``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedretrain.config.declared import conf_dir
from fedretrain.config.parse import build
from fedretrain.config.schema import Config
from fedretrain.errors import ConfigError


def compose_raw(overrides: Sequence[str] = (), directory: Path | None = None) -> dict[str, Any]:
    """Compose the Hydra config and return it as plain containers (interpolations resolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    directory = directory or conf_dir()
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(_hydra_message(err)) from None
    assert isinstance(raw, dict)  # a config.yaml mapping always composes to a dict
    return {str(key): value for key, value in raw.items()}


def compose_config(overrides: Sequence[str] = (), directory: Path | None = None) -> Config:
    """Compose and parse: the one call the edges make."""
    return build(Config, compose_raw(overrides, directory))


def to_yaml(raw: Mapping[str, Any]) -> str:
    """The composed config as YAML, as written to a run's ``config.yaml``."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(dict(raw)))


RUN_CONFIG_KEYS = ("experiment", "overrides", "run-dir", "resume", "sites-file", "mode", "poll-file", "train-nodes")


def overrides_from_run_config(run_config: Mapping[str, Any]) -> list[str]:
    """Map Flower's run_config (``experiment``, ``overrides``) onto Hydra overrides.

    ``run-dir``, ``resume`` and ``sites-file`` are not overrides: the ServerApp reads them itself.
    """
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"run_config: unknown key(s) {', '.join(unknown)}; use {', '.join(RUN_CONFIG_KEYS)}")
    out = []
    experiment = str(run_config.get("experiment", "") or "").strip()
    if experiment:
        out.append(f"experiment={experiment}")
    out.extend(shlex.split(str(run_config.get("overrides", "") or "")))
    return out


def _hydra_message(err: Exception) -> str:
    text = str(err).strip()
    full_key = getattr(err, "full_key", None)
    if full_key and "Missing mandatory value" in text:
        return f"{full_key}: missing required value (set it on the command line)"
    # Hydra says "Could not override 'privacy.foo'. ... Key 'foo' is not in struct";
    # lead with the dotted key so it reads like every other config error.
    match = re.search(r"override '([^']+)'", text)
    if match:
        first = text.splitlines()[0]
        return f"{match.group(1)}: unknown key or bad override ({first})"
    choice = re.search(r"Could not find '([\w-]+)/([^']+)'", text)
    if choice:  # a config group option that does not exist: name the ones that do
        group, name = choice.groups()
        folder = conf_dir() / group
        options = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        return f"{group}: no option {name!r}; choose one of {', '.join(options)} (conf/{group}/)"
    missing = re.search(r"Missing mandatory value: (\S+)", text)
    if missing:
        return f"{missing.group(1)}: missing required value (set it on the command line)"
    return f"config: {text.splitlines()[0] if text else type(err).__name__}"

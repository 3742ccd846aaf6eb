"""Build the frozen config dataclasses from plain mappings, checking every key and type.

One walker serves the composed Hydra config, the job a coordinator sends to its sites
(a flat ConfigRecord) and a site's node_config, so all three fail the same way: an
unknown key, a wrong type or a bad value raises ``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from fedretrain.errors import ConfigError

T = TypeVar("T")


def build(cls: type[T], node: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Return ``cls(**node)`` after checking keys, types and values recursively.

    Missing keys take the dataclass default; a key without a default must be present.
    """
    node = {} if node is None else node
    if not isinstance(node, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(node).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(node) - set(fields))
    if unknown:
        names = ", ".join(_join(prefix, k) for k in unknown)
        raise ConfigError(f"{names}: unknown key; valid keys here: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in node:
            kwargs[name] = _convert(hints[name], node[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: missing required key")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # Validators name the field; add the group so the user reads the dotted key.
        raise ConfigError(_join(prefix, str(err))) from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key)
        # Several kinds (a list of sites or a share): the first that takes the value.
        for alternative in inner:
            try:
                return _convert(alternative, value, key)
            except ConfigError:
                continue
        kinds = " or ".join("a list" if typing.get_origin(a) is tuple else a.__name__ for a in inner)
        raise ConfigError(f"{key}: expected {kinds}, got {_show(value)}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)  # type: ignore[arg-type]
    if origin is dict:  # a mapping of names to scalars (a strategy's options)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        for name, item in value.items():
            if not isinstance(name, str) or not isinstance(item, bool | int | float | str):
                raise ConfigError(f"{_join(key, str(name))}: expected a number, a bool or a string, got {_show(item)}")
        return dict(value)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    return _scalar(hint, value, key)


def _scalar(hint: Any, value: Any, key: str) -> Any:
    # bool is a subclass of int: refuse it where a number is meant, and vice versa.
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema type this walker does not know
        raise TypeError(f"unsupported config type {hint!r} at {key}")
    raise ConfigError(f"{key}: expected {hint.__name__}, got {_show(value)}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config dataclass into ``{"group.key": value}``; None values are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key))
        elif value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten``: ``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: '{part}' is both a value and a group")
        node[leaf] = value
    return tree

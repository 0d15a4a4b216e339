"""Typed configs at the YAML edge: dataclasses built from plain dicts, with errors naming the key.

Used by every CLI that reads YAML (``modular train``, ``modular merge``): the file is parsed
once into dataclasses, and a wrong key, a missing required key or a wrong type gets one error
line that says where (``recipe.yaml: lisa.interval_step``) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigError", "from_dict", "read_yaml", "unknown_keys_error"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or section that does not match its schema."""


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is dataclasses.MISSING:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_type(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        items = [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; expected one of {', '.join(map(repr, allowed))}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not allowed; expected a finite number")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    return value


def unknown_keys_error(given, allowed, where: str, *, list_allowed: bool = True) -> ConfigError:
    """The error for the keys of ``given`` not in ``allowed``, with close matches (typos) named."""
    allowed = list(allowed)
    unknown = sorted(set(given) - set(allowed), key=str)
    close = {key: difflib.get_close_matches(str(key), allowed, n=2) for key in unknown}
    hints = [f"{key} -> {' or '.join(found)}" for key, found in close.items() if found]
    message = f"{where}: unknown key(s) {', '.join(map(str, unknown))}"
    message += f"; allowed: {', '.join(allowed)}" if list_allowed else ""
    return ConfigError(message + (f"; did you mean {', '.join(hints)}?" if hints else ""))


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from ``data``; ``where`` prefixes error messages (e.g. ``"recipe.yaml: lisa"``).

    Unknown keys and missing required keys are errors; values are checked against the field
    annotations (nested dataclasses, lists, ``Literal`` choices, optionals). The dataclass's own
    ``__post_init__`` validation then runs; its ``ValueError`` is re-raised with ``where``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if set(data) - set(fields):
        raise unknown_keys_error(data, fields, where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _check_type(data[name], hints.get(name, Any), f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None

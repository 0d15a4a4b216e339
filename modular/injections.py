"""The injection registry: every kind of model change a recipe can ask for, by name.

One entry per kind — its settings dataclass, how to apply it and how to rebuild it on load — read
by the loader (``modular.load_model`` rebuilds what a checkpoint records), the recipe runner
(``injections:`` in ``modular train`` recipes, validated against ``config_class``) and the CLI.

A part registers its kinds when it is imported (``register_injection(InjectionKind(...))``);
kinds of other packages are found through the ``modular.injections`` entry-point group, whose
entries name an :class:`InjectionKind` object (``mykind = mypackage.module:MY_KIND``), so a
recipe or a checkpoint can use a kind whose package nobody imported yet. See
``docs/extending.md`` for a worked example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from typing import Any

from torch import nn

from .plugins import load_entry_points

__all__ = ["InjectionError", "InjectionKind", "get_injection", "injection_kinds", "rebuild_injection", "register_injection"]

ENTRY_POINT_GROUP = "modular.injections"
INJECTION_FORMAT_VERSION = 1
_KINDS: dict[str, InjectionKind] = {}


class InjectionError(ValueError):
    """A target selection, an injection kind or an injection record that cannot be honoured."""


@dataclass(frozen=True)
class InjectionKind:
    """One kind of injection.

    Attributes:
        name: the key in recipes (``injections: [{name: {...}}]``) and in injection records.
        config_class: dataclass of the kind's settings; recipes are checked against its fields.
        apply: ``apply(model, config, calibration_data) -> model`` — does the injection (in place
            or on a new model, which it returns). ``calibration_data`` is a list of batches
            (dicts of model inputs) for kinds that need data (``needs_calibration``), else ``None``.
        rebuild: ``rebuild(model, config_dict)`` recreates the injected structure on a freshly
            loaded base model (weights need not be right: the loader fills them from the
            checkpoint afterwards) and records it as ``apply`` did. ``None`` for kinds that leave
            a plain transformers model behind (e.g. upcycling into an HF MoE family).
        needs_calibration: whether ``apply`` reads ``calibration_data``.
    """

    name: str
    config_class: type
    apply: Callable[[nn.Module, Any, list | None], nn.Module]
    rebuild: Callable[[nn.Module, dict], None] | None = None
    needs_calibration: bool = False

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.config_class):
            raise TypeError(f"InjectionKind {self.name!r}: config_class must be a dataclass, got {self.config_class!r}")

    def config(self, settings: dict | Any | None) -> Any:
        """``settings`` as this kind's config (a dict of fields, an instance, or ``None`` for the defaults)."""
        if isinstance(settings, self.config_class):
            return settings
        return self.config_class(**(settings or {}))


def register_injection(kind: InjectionKind, *, overwrite: bool = False) -> InjectionKind:
    """Make ``kind`` usable from recipes and rebuildable by ``modular.load_model``; returns it."""
    if not isinstance(kind, InjectionKind):
        raise TypeError(f"register_injection: expected an InjectionKind, got {type(kind).__name__}")
    known = _KINDS.get(kind.name)
    if known is not None and known != kind and not overwrite:
        raise ValueError(f"register_injection: kind {kind.name!r} is already registered; pass overwrite=True to replace it")
    _KINDS[kind.name] = kind
    return kind


def _register_entry_point(ep: EntryPoint) -> None:
    kind = ep.load()
    if not isinstance(kind, InjectionKind) or kind.name != ep.name:
        raise InjectionError(
            f"entry point {ep.name} = {ep.value} in group {ENTRY_POINT_GROUP!r} must name an InjectionKind "
            f"called {ep.name!r}, got {kind!r}"
        )
    register_injection(kind)


def injection_kinds() -> list[str]:
    """Names of every registered kind, entry points included."""
    load_entry_points(ENTRY_POINT_GROUP, _KINDS, _register_entry_point)
    return sorted(_KINDS)


def get_injection(name: str) -> InjectionKind:
    if name not in _KINDS:
        load_entry_points(ENTRY_POINT_GROUP, _KINDS, _register_entry_point, [name])
    if name not in _KINDS:
        raise InjectionError(
            f"injection kind {name!r} is not registered (known: {', '.join(injection_kinds())}); import the package "
            f"that provides it, or call modular.register_injection(InjectionKind({name!r}, ...))"
        )
    return _KINDS[name]


def rebuild_injection(model: nn.Module, record: dict) -> None:
    """Replay one injection record (from a checkpoint's ``config.json``) on ``model``."""
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str) or not isinstance(record.get("config"), dict):
        raise InjectionError(f"injection record {record!r}: expected a mapping with a `kind` name and a `config` mapping")
    version = record.get("format_version", 0)
    if version > INJECTION_FORMAT_VERSION:
        raise InjectionError(
            f"injection record {record['kind']!r} has format_version {version}, newer than this "
            f"modular-llm understands ({INJECTION_FORMAT_VERSION}); upgrade modular-llm"
        )
    kind = get_injection(record["kind"])
    if kind.rebuild is None:
        raise InjectionError(f"injection kind {kind.name!r} records nothing to rebuild, yet a checkpoint records it")
    kind.rebuild(model, record["config"])

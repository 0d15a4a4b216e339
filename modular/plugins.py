"""Entry points of installed packages, read lazily: how a registry (injection kinds, merge methods)
finds what a package it has not imported yet provides."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from importlib.metadata import EntryPoint, entry_points

__all__ = ["load_entry_points"]


def load_entry_points(group: str, registered: Container[str], load: Callable[[EntryPoint], None],
                      names: Iterable[str] | None = None) -> None:
    """``load(ep)`` for each entry point of ``group`` that is named in ``names`` (all when ``None``)
    and not ``registered`` yet; ``load`` registers what the entry point provides."""
    wanted = None if names is None else set(names)
    for ep in entry_points(group=group):
        if (wanted is None or ep.name in wanted) and ep.name not in registered:
            load(ep)

"""modular-llm core: the architecture registry, module surgery and the loader.

Heavy imports (torch, transformers) happen on first use of a name, so that the ``modular``
command starts fast.
"""

from __future__ import annotations

import importlib

__all__ = [
    "ACMConfig",
    "ArchitectureSpec",
    "InjectionKind",
    "acmize",
    "architecture_of",
    "find_modules",
    "load_model",
    "record_injection",
    "register_architecture",
    "register_injection",
    "replace_module",
]

_EXPORTS = {
    "ArchitectureSpec": "registry",
    "architecture_of": "registry",
    "register_architecture": "registry",
    "find_modules": "surgery",
    "record_injection": "surgery",
    "InjectionKind": "injections",
    "register_injection": "injections",
    "replace_module": "surgery",
    "load_model": "loading",
    "ACMConfig": "acm",
    "acmize": "acm",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'modular' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

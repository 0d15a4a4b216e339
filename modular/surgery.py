"""Module surgery: find modules by role or name, replace them, and record what was injected.

Every injection (AdaMoE routers, ACM modules, …) goes through the same three steps:

1. ``find_modules(model, role=..., pattern=...)`` picks the targets through the registry;
2. ``replace_module(model, name, new)`` swaps each one in;
3. ``record_injection(model, kind, config, targets)`` writes what was done into
   ``model.config.modular_injections`` so that ``save_pretrained`` carries it and
   ``modular.load_model`` can rebuild the same structure before loading the weights.

Each kind is described once in the injection registry (``modular.injections``), which the
loader reads to rebuild what a checkpoint records.

Injected checkpoints are saved with a marked ``model_type`` (see ``INJECTED_MARK``): plain
``AutoModel.from_pretrained`` then stops with an error naming ``modular.load_model`` instead of
silently dropping the injected weights.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from torch import nn

from .injections import INJECTION_FORMAT_VERSION, InjectionError
from .registry import architecture_of

__all__ = [
    "INJECTIONS_KEY",
    "InjectionError",
    "base_model_type",
    "find_modules",
    "injection_records",
    "record_injection",
    "replace_module",
    "update_injection_records",
]

INJECTIONS_KEY = "modular_injections"
INJECTED_MARK = " (injected by modular-llm: load with modular.load_model)"

ROLES = ("layer", "mlp", "mlp_output", "moe", "router", "experts", "embeddings", "head")

# --------------------------------------------------------------------------- finding


def _modules_by_role(model: nn.Module, role: str) -> list[tuple[str, nn.Module]]:
    arch = architecture_of(model)
    if role == "layer":
        return list(zip(arch.layer_names, arch.layers))
    if role == "embeddings":
        emb = arch.input_embeddings
        return [(n, m) for n, m in model.named_modules() if m is emb]
    if role == "head":
        head = arch.output_head
        return [(n, m) for n, m in model.named_modules() if head is not None and m is head]
    by_role = {
        "mlp": arch.mlps,
        "mlp_output": arch.mlp_outputs,
        "moe": arch.moe_blocks,
        "router": arch.routers,
        "experts": arch.experts,
    }
    return by_role[role]()


def find_modules(
    model: nn.Module, *, role: str | None = None, pattern: str | None = None
) -> list[tuple[str, nn.Module]]:
    """Modules selected by registry role and/or a regular expression on their qualified name.

    With both, a module must have the role and its name must match ``pattern`` (``re.search``,
    e.g. ``r"layers\\.(0|1)\\."``). A selection that matches nothing is an error, never a no-op.
    """
    if role is None and pattern is None:
        raise InjectionError("find_modules: give a role, a name pattern, or both")
    if role is not None and role not in ROLES:
        raise InjectionError(f"find_modules: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    candidates = _modules_by_role(model, role) if role is not None else list(model.named_modules())
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise InjectionError(f"find_modules: pattern {pattern!r} is not a valid regular expression ({err})") from None
        candidates = [(n, m) for n, m in candidates if regex.search(n)]
    if not candidates:
        what = " and ".join(x for x in (role and f"role {role!r}", pattern and f"pattern {pattern!r}") if x)
        sample = ", ".join(n for n, _ in list(model.named_modules())[1:6])
        raise InjectionError(
            f"find_modules: {what} matches no module of this {getattr(model.config, 'model_type', '?')} model "
            f"(module names look like: {sample}, …)"
        )
    return candidates


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` is; return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    if not isinstance(old, nn.Module):
        raise InjectionError(f"replace_module: {name!r} is not a submodule of {type(model).__name__}")
    setattr(parent, child, new)  # nn.ModuleList accepts setattr with a numeric name too
    return old


# --------------------------------------------------------------------------- records


def injection_records(model_or_config: Any) -> list[dict]:
    config = getattr(model_or_config, "config", model_or_config)
    return list(getattr(config, INJECTIONS_KEY, None) or [])


def base_model_type(config_or_type: Any) -> str:
    """The HF ``model_type`` behind a possibly marked (injected) config or string."""
    model_type = config_or_type if isinstance(config_or_type, str) else config_or_type.model_type
    return model_type.removesuffix(INJECTED_MARK)


def record_injection(model: nn.Module, kind: str, config: dict, targets: list[str]) -> None:
    """Append an injection record to ``model.config`` (JSON-serialisable ``config``).

    The first record also marks the config class so that the saved ``config.json`` carries a
    ``model_type`` that plain transformers refuses with a pointer to ``modular.load_model``.
    """
    records = injection_records(model)
    records.append(
        {"kind": kind, "format_version": INJECTION_FORMAT_VERSION, "config": dict(config), "targets": list(targets)}
    )
    setattr(model.config, INJECTIONS_KEY, records)
    _mark_config(model.config)


def update_injection_records(model: nn.Module, kind: str, **settings) -> None:
    """Change settings of every ``kind`` record in ``model.config`` (a run-time knob changed after
    injection, e.g. the ACM threshold, so that a saved and re-loaded model behaves the same)."""
    records = injection_records(model)
    if not any(r["kind"] == kind for r in records):
        raise InjectionError(f"update_injection_records: the model records no {kind!r} injection")
    updated = [{**r, "config": {**r["config"], **settings}} if r["kind"] == kind else r for r in records]
    setattr(model.config, INJECTIONS_KEY, updated)


def clear_injection_records(model: nn.Module) -> list[dict]:
    """Remove and return the records (used when rebuilding, or when unwrapping to a plain HF model)."""
    records = injection_records(model)
    if hasattr(model.config, INJECTIONS_KEY):
        delattr(model.config, INJECTIONS_KEY)
    _unmark_config(model.config)
    return records


def _marked_config_class(base: type) -> type:
    """A subclass of ``base`` that serialises its model_type with ``INJECTED_MARK``.

    At run time ``config.model_type`` stays the HF one (modeling code compares it); only
    ``to_dict`` (hence config.json) carries the mark. Classes are module attributes so that
    configs still pickle.
    """
    name = f"Injected{base.__name__}"
    module = sys.modules[__name__]
    cls = getattr(module, name, None)
    if cls is None:

        def to_dict(self) -> dict:
            out = base.to_dict(self)
            out["model_type"] = base.model_type + INJECTED_MARK
            return out

        cls = type(name, (base,), {"to_dict": to_dict, "__module__": __name__, "_modular_base_class": base})
        setattr(module, name, cls)
    return cls


def _mark_config(config: Any) -> None:
    if not hasattr(type(config), "_modular_base_class"):
        config.__class__ = _marked_config_class(type(config))


def _unmark_config(config: Any) -> None:
    base = getattr(type(config), "_modular_base_class", None)
    if base is not None:
        config.__class__ = base

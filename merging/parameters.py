"""Per-tensor parameter values, as mergekit resolves them: gradients over layers, filters, scopes.

A parameter *setting* is what a config writes for one key (mergekit 0.1.5, ``config.py``):

* a scalar (``0.5``, ``true``, ``"mean"``);
* a **gradient**: a list of scalars, interpolated over the layers. Layer ``i`` of ``L`` sits at
  ``t = i / (L − 1)``; every tensor outside the layers (embeddings, final norm, ``lm_head``)
  sits at ``t = 0``, so it takes the first value. Numbers interpolate linearly between
  neighbouring values; booleans and strings are picked (``values[int(t · (m − 1))]``);
* a **filtered** list ``[{filter: F, value: V}, ..., {value: V}]``: the first item whose ``filter``
  is absent, ``"*"`` or a plain substring of the tensor name gives the value (a scalar or a
  gradient). When no item matches, the next scope is asked.

Scopes, first that has a value wins: a model's own ``parameters`` (per-model parameters only),
then the slice's, then the top-level ``parameters``, then the method's default. A YAML list is
always a gradient, never one value per model (the Python API takes per-model lists; it wraps
them as model scopes before they get here).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Filtered", "Gradient", "LayerPositions", "Setting", "evaluate", "literals", "parse_setting", "plain", "resolve_setting",
]

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Gradient:
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Filtered:
    items: tuple[tuple[str | None, Scalar | Gradient], ...]  # (filter or None for "every tensor", value)


Setting = Scalar | Gradient | Filtered


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _parse_value(raw: Any, where: str) -> Scalar | Gradient:
    if _is_scalar(raw):
        return raw
    if isinstance(raw, list) and raw and all(_is_scalar(v) for v in raw):
        return Gradient(tuple(raw))
    raise ValueError(f"{where}: {raw!r} is not allowed; expected a value or a list of values (a gradient over layers)")


def _parse_item(raw: Any, where: str) -> tuple[str | None, Scalar | Gradient]:
    if not isinstance(raw, dict) or "value" not in raw:
        raise ValueError(f"{where}: {raw!r} is not allowed; expected {{filter: NAME_PART, value: VALUE}}")
    extra = sorted(set(raw) - {"filter", "value"})
    if extra == ["pattern"]:
        # mergekit 0.1.5 ignores `pattern:` (an older spelling): the item then matches every tensor.
        warnings.warn(f"{where}: `pattern:` is ignored, as mergekit 0.1.5 ignores it, so this item applies to every "
                      "tensor; write `filter:` to select tensors", stacklevel=4)
    elif extra:
        raise ValueError(f"{where}: unknown key(s) {', '.join(extra)}; a filtered value has `filter` and `value`")
    flt = raw.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ValueError(f"{where}.filter: {flt!r} is not allowed; expected part of a tensor name (a string)")
    return (None if flt in (None, "*") else flt), _parse_value(raw["value"], f"{where}.value")


def parse_setting(raw: Any, where: str) -> Setting:
    """One YAML value of a parameter as a :data:`Setting`; a ValueError names ``where``."""
    if isinstance(raw, dict):
        return Filtered((_parse_item(raw, where),))
    if isinstance(raw, list) and raw and all(isinstance(v, dict) for v in raw):
        return Filtered(tuple(_parse_item(v, f"{where}[{i}]") for i, v in enumerate(raw)))
    return _parse_value(raw, where)


def literals(setting: Setting) -> list[Scalar]:
    """Every value written in ``setting`` (to check each before any work)."""
    if isinstance(setting, Filtered):
        return [v for _, value in setting.items for v in literals(value)]
    if isinstance(setting, Gradient):
        return list(setting.values)
    return [setting]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _at(value: Scalar | Gradient, t: float) -> Scalar:
    if not isinstance(value, Gradient):
        return value
    values, last = value.values, len(value.values) - 1
    if not all(_is_number(v) for v in values):
        return values[int(t * last)]
    scaled = t * last
    i0 = int(scaled)
    i1 = min(last, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * float(values[i0]) + frac * float(values[i1])


def evaluate(setting: Setting, tensor: str, t: float) -> Scalar | None:
    """The value of ``setting`` for tensor ``tensor`` at layer position ``t``; None if no filter matches."""
    if isinstance(setting, Filtered):
        for flt, value in setting.items:
            if flt is None or flt in tensor:
                return _at(value, t)
        return None
    return _at(setting, t)


def resolve_setting(name: str, scopes: Sequence[Mapping[str, Setting]], tensor: str, t: float) -> Scalar | None:
    """The first scope's value of parameter ``name`` for ``tensor`` (None: no scope has one)."""
    for scope in scopes:
        if name in scope:
            value = evaluate(scope[name], tensor, t)
            if value is not None:
                return value
    return None


class LayerPositions:
    """``t`` of each tensor: ``i / (L − 1)`` for tensors of layer ``i`` of ``L``, 0 elsewhere.

    Layers are found by the architecture registry's layer path (``model.layers.<i>.`` for llama,
    ``transformer.h.<i>.`` for gpt2, ...) or, for families the registry does not know, by
    ``.layers.<i>.``; ``L`` is the number of distinct layer indices among the tensor names.
    """

    def __init__(self, names: Sequence[str], model_type: str | None = None):
        from modular.registry import UnknownArchitectureError, get_architecture_spec

        try:
            layers = get_architecture_spec(model_type).layers if model_type else "layers"
        except UnknownArchitectureError:
            layers = "layers"
        self.pattern = re.compile(rf"(?:^|\.){re.escape(layers)}\.(\d+)\.")
        indices = {int(m.group(1)) for n in names if (m := self.pattern.search(n))}
        self.num_layers = max(indices) + 1 if indices else 0

    def __call__(self, name: str) -> float:
        match = self.pattern.search(name)
        if match is None:
            return 0.0
        return int(match.group(1)) / (self.num_layers - 1) if self.num_layers > 1 else 1.0


def plain(setting: Setting) -> Any:
    """``setting`` as YAML/JSON data again (for model cards and ``merge.json``)."""
    if isinstance(setting, Filtered):
        return [{**({"filter": flt} if flt is not None else {}), "value": plain(value)} for flt, value in setting.items]
    if isinstance(setting, Gradient):
        return list(setting.values)
    return setting

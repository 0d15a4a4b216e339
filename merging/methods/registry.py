"""The merge-method registry: each method's function and its parameters, declared once.

Everything that needs to know a method reads it from here: ``merging.merge`` (argument
checking), the ``modular merge`` YAML schema (which keys a config may set, per model or
globally), the model card (which values were used) and the docs. A method registered in a
user's own module is usable from YAML with no other edit::

    from merging.methods import Parameter, register_merge_method

    @register_merge_method("scaled_sum", parameters=[Parameter("scale", 1.0, check=finite)])
    def scaled_sum(base, deltas, *, weights, scale):
        return base + scale * sum(w * d for w, d in zip(weights, deltas))

An installed package can also declare its methods in the ``modular.merge_methods`` entry-point
group (``name = package.module``, the module that registers them): a config naming such a
method imports it on first use.

A method function sees ONE parameter tensor: ``base`` (any shape S) and ``deltas``, a sequence
of K task-vector slices of shape S (θ_k − θ_0); it never sees a model, so the streaming merge
calls it tensor by tensor. Every method takes ``weights`` (the per-model ``weight``, a
sequence of K floats); per-model parameters arrive as sequences of K values, global ones as
scalars; a method that declares ``seed`` gets a seed derived per tensor.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from typing import Any

import torch

from modular.plugins import load_entry_points

__all__ = [
    "MergeMethod", "Parameter", "finite", "get_merge_method", "in_range", "is_bool", "merge_method_names", "one_of",
    "register_merge_method",
]

ENTRY_POINT_GROUP = "modular.merge_methods"
MergeFn = Callable[..., torch.Tensor]
Check = Callable[[Any], str | None]  # returns what was expected when the value is not allowed


def finite(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return None if ok else "a finite number"


def in_range(low: float, high: float, *, low_open: bool = False) -> Check:
    """A check for numbers in [low, high] (or (low, high] with ``low_open``)."""
    bracket = "(" if low_open else "["

    def check(value: Any) -> str | None:
        if finite(value) is not None or value < low or value > high or (low_open and value == low):
            return f"a number in {bracket}{low:g}, {high:g}]"
        return None

    return check


def one_of(*allowed: Any) -> Check:
    def check(value: Any) -> str | None:
        return None if value in allowed else "one of " + ", ".join(map(repr, allowed))

    return check


def is_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


@dataclass(frozen=True)
class Parameter:
    """One parameter of a merge method.

    Attributes:
        name: the key in mergekit-style YAML (``density``, ``lambda``, ``normalize``...).
        default: used when neither the model entry nor the global ``parameters:`` sets it.
        per_model: set per model entry (then the method gets a list of K values); a global value
            is the default of every model, as in mergekit.
        check: validates one value before any work starts (``None``: any value).
        doc: one line for the docs and ``--help``.
    """

    name: str
    default: Any
    per_model: bool = False
    check: Check | None = None
    doc: str = ""

    @property
    def keyword(self) -> str:
        """The method function's keyword argument: ``weights`` for ``weight``, ``lambda_`` for ``lambda``."""
        return {"weight": "weights", "lambda": "lambda_"}.get(self.name, self.name)

    def validate(self, value: Any, where: str) -> Any:
        """``value`` if allowed (per-model: one value or a list of them), else a ValueError naming ``where``."""
        values = value if self.per_model and isinstance(value, (list, tuple)) else [value]
        for v in values:
            problem = self.check(v) if self.check is not None else None
            if problem is not None:
                raise ValueError(f"{where}: {v!r} is not allowed for {self.name!r}; expected {problem}")
        return value


WEIGHT = Parameter("weight", 1.0, per_model=True, check=finite, doc="weight w_k of model k's task vector")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    parameters: tuple[Parameter, ...] = field(default_factory=tuple)
    doc: str = ""

    def parameter(self, name: str) -> Parameter:
        by_name = {p.name: p for p in self.parameters}
        if name not in by_name:
            raise KeyError(f"merge method {self.name!r} has no parameter {name!r}; allowed: {', '.join(by_name)}")
        return by_name[name]

    @property
    def takes_seed(self) -> bool:
        return any(p.name == "seed" for p in self.parameters)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.parameters}

    def resolve(self, params: dict[str, Any], k: int, where: str = "parameters") -> dict[str, Any]:
        """Keyword arguments for ``fn`` from ``params`` (YAML names; unknown or disallowed values
        raise, naming the key): defaults filled in, per-model values expanded to K."""
        kwargs = {}
        for p in self.parameters:
            value = p.validate(params[p.name], f"{where}.{p.name}") if p.name in params else p.default
            if p.per_model:
                value = list(value) if isinstance(value, (list, tuple)) else [value] * k
                if len(value) != k:
                    raise ValueError(f"{where}.{p.name}: {len(value)} values for {k} models")
            kwargs[p.keyword] = value
        unknown = sorted(set(params) - {p.name for p in self.parameters})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} for merge method {self.name!r}; "
                             f"allowed: {', '.join(p.name for p in self.parameters)}")
        return kwargs


_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(name: str, *, parameters: Sequence[Parameter] = (), doc: str = "",
                          overwrite: bool = False) -> Callable[[MergeFn], MergeFn]:
    """Decorator registering ``fn(base, deltas, *, weights, **parameters) -> tensor`` as ``name``.

    ``weight`` (per model, default 1.0) is declared for every method; list the others.
    """
    def decorate(fn: MergeFn) -> MergeFn:
        if name in _METHODS and not overwrite and _METHODS[name].fn is not fn:
            raise ValueError(f"register_merge_method: {name!r} is already registered; pass overwrite=True to replace it")
        declared = (WEIGHT, *[p for p in parameters if p.name != "weight"])
        _METHODS[name] = MergeMethod(name, fn, declared, doc or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return decorate


def _import_entry_point(ep: EntryPoint) -> None:
    """Import the module an entry point names; it registers its methods on import."""
    importlib.import_module(ep.value)
    if ep.name not in _METHODS:
        raise KeyError(f"entry point {ep.name} = {ep.value} (group {ENTRY_POINT_GROUP!r}) registered no method {ep.name!r}")


def merge_method_names() -> list[str]:
    """Every registered method, entry points included."""
    load_entry_points(ENTRY_POINT_GROUP, _METHODS, _import_entry_point)
    return sorted(_METHODS)


def get_merge_method(name: str) -> MergeMethod:
    if name not in _METHODS:
        load_entry_points(ENTRY_POINT_GROUP, _METHODS, _import_entry_point, [name])
    if name not in _METHODS:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(merge_method_names())}")
    return _METHODS[name]

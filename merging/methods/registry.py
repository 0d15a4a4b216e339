"""The merge-method registry: each method's function and its parameters, declared once.

Everything that needs to know a method reads it from here: ``merging.merge`` (argument
checking), the ``modular merge`` YAML schema (which keys a config may set, per model or
globally, and their defaults), the model card and the docs. A method registered in a user's
own module is usable from YAML with no other edit::

    from merging.methods import Parameter, finite, register_merge_method

    @register_merge_method("scaled_sum", parameters=[Parameter("scale", 1.0, check=finite)])
    def scaled_sum(base, deltas, *, weights, scale):
        return base + scale * sum(w * d for w, d in zip(weights, deltas))

An installed package can also declare its methods in the ``modular.merge_methods`` entry-point
group (``name = package.module``, the module that registers them): a config naming such a
method imports it on first use.

A method function sees ONE tensor and never a model, so the streaming merge calls it tensor by
tensor, with the parameter values resolved for that tensor (gradients over layers and filters
are resolved before the call: :mod:`merging.parameters`). Two kinds of functions:

* ``inputs="deltas"`` (the task-arithmetic family): ``fn(base, deltas, *, weights, ...)`` with
  ``deltas`` the K task-vector slices θ_k − θ_0 of the non-base models, all in the computation
  dtype; returns the merged tensor in ``base``'s dtype.
* ``inputs="models"`` (``linear``, ``slerp``, ``model_stock``): ``fn(base, models, *, ...)``
  with ``models`` the K input tensors θ_k themselves (``base`` may be None when the method does
  not need one). With ``base_is_input`` (``linear``) the base, when given, is one of the models,
  as in mergekit.

Per-model parameters arrive as lists of K values, global ones as scalars; a ``random`` method
also gets ``generator`` (one ``torch.Generator`` for the whole merge, tensors visited in
sorted-name order: mergekit's order, so seeded DARE masks are mergekit's).

Defaults: ``default`` is the library's (``merging.merge`` in Python); ``mergekit_default`` is
mergekit 0.1.5's, used for YAML configs so that a mergekit config gives mergekit's result. The two
differ only where mergekit's default turns the method's own step off (``density`` 1.0) or where
its defaults disagree across the sign-consensus methods (``normalize``); ``docs/merging.md``
lists both.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from typing import Any, Literal

import torch

from modular.plugins import load_entry_points

__all__ = [
    "REQUIRED", "MergeMethod", "Parameter", "finite", "get_merge_method", "in_range", "is_bool", "merge_method_names",
    "one_of", "register_merge_method",
]

ENTRY_POINT_GROUP = "modular.merge_methods"
MergeFn = Callable[..., torch.Tensor]
Check = Callable[[Any], str | None]  # returns what was expected when the value is not allowed


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Marker("REQUIRED")  # a parameter without a default: a config must set it
_SAME = _Marker("SAME")


def finite(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return None if ok else "a finite number"


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A check for numbers in [low, high] (``low_open``/``high_open``: that end excluded)."""
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(value: Any) -> str | None:
        if finite(value) is not None or value < low or value > high or (low_open and value == low) or (high_open and value == high):
            return f"a number in {text}"
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
        default: the library's default (``REQUIRED``: none, the caller must give a value).
        per_model: set per model entry (then the method gets a list of K values); a global value
            is every model's default, as in mergekit.
        check: validates one value before any work starts (``None``: any value).
        doc: one line for the docs and errors.
        mergekit_default: mergekit 0.1.5's default when it differs from ``default``; YAML
            configs use it.
        base_too: a per-model parameter that the base model gets too, when the base is one of
            the method's inputs (``linear``'s ``weight``, as mergekit's INPUT scope).
    """

    name: str
    default: Any
    per_model: bool = False
    check: Check | None = None
    doc: str = ""
    mergekit_default: Any = _SAME
    base_too: bool = False

    @property
    def keyword(self) -> str:
        """The method function's keyword argument: ``weights`` for ``weight``, ``lambda_`` for ``lambda``."""
        return {"weight": "weights", "lambda": "lambda_"}.get(self.name, self.name)

    def default_for(self, mergekit: bool) -> Any:
        return self.default if not mergekit or self.mergekit_default is _SAME else self.mergekit_default

    def validate(self, value: Any, where: str) -> Any:
        """``value`` if allowed, else a ValueError naming ``where``, the value and what is expected.

        A number written as text (``"1e-3"``, which YAML 1.1 reads as a string) is read as a
        number where a number is expected, as mergekit does.
        """
        problem = self.check(value) if self.check is not None else None
        if problem is not None and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and self.check(number) is None:
                return number
        if problem is not None:
            raise ValueError(f"{where}: {value!r} is not allowed for {self.name!r}; expected {problem}")
        return value


# mergekit requires `weight`; 1.0 here runs every config mergekit runs, with mergekit's result.
WEIGHT = Parameter("weight", 1.0, per_model=True, check=finite, doc="weight w_k of model k")


@dataclass(frozen=True)
class MergeMethod:
    """A registered method. ``inputs``: ``"deltas"`` or ``"models"`` (module docstring);
    ``base``: ``"required"`` or ``"optional"``; ``models``: (min, max) number of non-base
    models (max None: any); ``random``: gets ``generator``; ``base_is_input``: with ``inputs
    ="models"``, the base (when given) is passed among ``models`` (mergekit's ``linear``);
    ``check``: a constraint across parameters, on one tensor's keyword arguments (what is wrong, or None)."""

    name: str
    fn: MergeFn
    parameters: tuple[Parameter, ...] = field(default_factory=tuple)
    doc: str = ""
    inputs: Literal["deltas", "models"] = "deltas"
    base: Literal["required", "optional"] = "required"
    models: tuple[int, int | None] = (1, None)
    random: bool = False
    base_is_input: bool = False
    check: Callable[[dict[str, Any]], str | None] | None = None  # on one tensor's resolved values, before any work

    def parameter(self, name: str) -> Parameter:
        by_name = {p.name: p for p in self.parameters}
        if name not in by_name:
            raise KeyError(f"merge method {self.name!r} has no parameter {name!r}; allowed: {', '.join(by_name)}")
        return by_name[name]

    def names(self, *, per_model: bool | None = None) -> list[str]:
        return [p.name for p in self.parameters if per_model is None or p.per_model == per_model]

    def defaults(self, *, mergekit: bool = False) -> dict[str, Any]:
        return {p.name: p.default_for(mergekit) for p in self.parameters}

    def check_models(self, k: int, has_base: bool) -> None:
        """A ValueError unless ``k`` non-base models (and a base, if required) fit this method."""
        low, high = self.models
        if self.base == "required" and not has_base:
            raise ValueError(f"merge method {self.name!r} needs a base model (base_model:)")
        if k < low or (high is not None and k > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ValueError(f"merge method {self.name!r} takes {wanted} model(s) besides the base; got {k}")


_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(
    name: str, *, parameters: Sequence[Parameter] = (), doc: str = "", overwrite: bool = False, weighted: bool = True,
    inputs: Literal["deltas", "models"] = "deltas", base: Literal["required", "optional"] = "required",
    models: tuple[int, int | None] = (1, None), random: bool = False, base_is_input: bool = False,
    check: Callable[[dict[str, Any]], str | None] | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Decorator registering ``fn`` as merge method ``name`` (keywords: see :class:`MergeMethod`).

    ``weight`` (per model, default 1.0) is declared for every method with ``weighted`` (a
    ``weight`` in ``parameters`` replaces it); list the others.
    """
    def decorate(fn: MergeFn) -> MergeFn:
        if name in _METHODS and not overwrite and _METHODS[name].fn is not fn:
            raise ValueError(f"register_merge_method: {name!r} is already registered; pass overwrite=True to replace it")
        own = {p.name for p in parameters}
        declared = (*([WEIGHT] if weighted and "weight" not in own else []), *parameters)
        _METHODS[name] = MergeMethod(name, fn, declared, doc or (fn.__doc__ or "").strip().splitlines()[0], inputs, base,
                                     models, random, base_is_input, check)
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

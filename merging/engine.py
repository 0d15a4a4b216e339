"""``merge()``: run a registered merge method over a base model and its inputs, tensor by tensor.

With ``out=`` the result is written as a model folder by :func:`merging.output.write_model_folder`;
without it the merged tensors are returned as a dict (small models). Each tensor is read, merged
and written before the next is read, so memory stays at about one tensor times the number of
inputs (see ``benchmarks/RESULTS.md``).

Per tensor, every parameter is resolved first (:mod:`merging.parameters`: per-model values,
gradients over layers, filters, defaults) — for all tensors before any is merged, so that a
missing or out-of-range value stops the run before any work. Tensors are visited in sorted-name
order, mergekit's, so that a seeded random method (DARE, DELLA) draws the masks mergekit draws.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from modular.checkpoint import check_output_dir

from .methods import REQUIRED, MergeMethod, get_merge_method
from .output import merge_record, model_card, write_model_folder
from .parameters import LayerPositions, Setting, resolve_setting
from .sources import DEFAULT_SHARD_BYTES, DTYPES, as_source, backbone_view, check_compatible, check_tokenizer_folder
from .task_vector import TaskVector, open_model

__all__ = ["Settings", "merge"]

Weights = float | Sequence[float] | Callable[[str], Sequence[float]]


@dataclass
class Settings:
    """Where each parameter's value comes from, scope by scope (mergekit's resolution).

    ``per_model[k]``: model k's own values (per-model parameters only); ``base``: the base
    entry's own values (used when the base is one of the method's inputs, as ``linear``'s);
    ``shared``: the scopes after that, in order (a slice's ``parameters``, the top-level
    ``parameters``); ``mergekit_defaults``: fall back to mergekit 0.1.5's defaults (YAML) rather
    than the library's.
    """

    per_model: list[Mapping[str, Setting]]
    shared: list[Mapping[str, Setting]] = field(default_factory=list)
    base: Mapping[str, Setting] = field(default_factory=dict)
    mergekit_defaults: bool = False

    @classmethod
    def from_python(cls, method: MergeMethod, k: int, params: Mapping[str, Any], with_base: bool) -> Settings:
        """Keyword values of ``merging.merge``: a list for a per-model parameter gives one value per
        model (the base's last, for methods whose inputs include it); anything else applies to all."""
        shared, per_model, base = {}, [{} for _ in range(k)], {}
        for name, value in params.items():
            p = _declared(method, name)
            if not isinstance(value, (list, tuple)):
                shared[name] = value
                continue
            if not p.per_model:
                raise ValueError(f"{name}: {value!r} is not allowed; {method.name!r} takes one value for {name!r}, not one per model")
            expected = k + 1 if with_base and p.base_too else k
            if len(value) != expected:
                raise ValueError(f"{name}: got {len(value)} values for {expected} models")
            for scope, v in zip(per_model + [base], value):
                scope[name] = v
        return cls(per_model, [shared], base)


def _declared(method: MergeMethod, name: str):
    try:
        return method.parameter(name)
    except KeyError:
        raise ValueError(f"unknown key(s) {name} for merge method {method.name!r}; allowed: {', '.join(method.names())}") from None


def _yaml_names(method: MergeMethod, params: dict) -> dict:
    """Python keywords (``lambda_``, ``weights``) back to the declared (YAML) parameter names."""
    names = {p.keyword: p.name for p in method.parameters}
    return {names.get(k, k): v for k, v in params.items()}


def _value(p, scopes: Sequence[Mapping[str, Setting]], tensor: str, t: float, mergekit: bool, where: str):
    value = resolve_setting(p.name, scopes, tensor, t)
    if value is None:
        value = p.default_for(mergekit)
        if value is REQUIRED:
            raise ValueError(f"{where}: missing required parameter {p.name!r} (tensor {tensor!r}); set it under parameters:")
        return value
    return p.validate(value, f"{where}.{p.name} (tensor {tensor!r})")


class _Plan:
    """The resolved keyword arguments of every tensor, computed before any tensor is read.

    ``model_scopes``: for each model the method sees, in the order it sees them, its label and
    the scopes of its per-model parameters (its own, then the shared ones).
    """

    def __init__(self, method: MergeMethod, settings: Settings,
                 model_scopes: Sequence[tuple[str, Sequence[Mapping[str, Setting]]]], names: Sequence[str], positions: LayerPositions):
        mergekit = settings.mergekit_defaults
        self.kwargs = {}
        for name in names:
            t = positions(name)
            kwargs = {}
            for p in method.parameters:
                if p.per_model:
                    value = [_value(p, scopes, name, t, mergekit, f"model {label!r}") for label, scopes in model_scopes]
                else:
                    value = _value(p, settings.shared, name, t, mergekit, "parameters")
                kwargs[p.keyword] = value
            problem = method.check(kwargs) if method.check is not None else None
            if problem is not None:
                raise ValueError(f"merge method {method.name!r}, tensor {name!r}: {problem}")
            self.kwargs[name] = kwargs


def merge(
    method: str,
    base,
    models: Sequence,
    *,
    weights: Weights = 1.0,
    out: str | os.PathLike | None = None,
    force: bool = False,
    dtype: str | None = None,
    compute_dtype: str = "float32",
    seed: int = 0,
    tokenizer_source: str | os.PathLike | None = None,
    vocabulary=None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    card: dict | None = None,
    write_extra: Callable[[Path], None] | None = None,
    progress: bool = True,
    settings: Settings | None = None,
    base_index: int | None = None,
    **params,
):
    """Merge ``models`` into ``base`` with the registered method ``method``.

    Args:
        method: a name from ``merging.methods.merge_method_names()`` (``task_arithmetic``,
            ``ties``, ``dare_ties``, ``breadcrumbs``, ``linear``, ``slerp``, ...). AdaMerging
            learns its coefficients first (:func:`merging.adamerge`), then merges through this.
        base: θ_0 as a checkpoint folder, a module or a dict of tensors (``None`` for methods
            that need no base, e.g. ``linear``).
        models: the inputs: :class:`merging.TaskVector` objects (deltas over ``base``), or full
            models (modules, dicts of tensors, folders), in any mix. Paths are read as YAML
            ``model:`` entries: a saved task vector or a PEFT adapter folder is a delta over
            ``base``, ``MODEL+ADAPTER`` a model with the adapter merged in.
        weights: per-model weights w_k; a callable ``name -> [w_k]`` gives per-tensor ones.
        out: write a model folder there (refuses a non-empty folder unless ``force``).
        dtype: output dtype (``float32``/``bfloat16``/``float16``); default: the base's.
        compute_dtype: the dtype the method computes in (default float32). mergekit computes in
            its config's ``dtype``: pass that dtype here to get its numbers exactly.
        seed: seeds random methods (DARE, DELLA): one generator for the whole merge, tensors in
            sorted-name order, as mergekit's ``--random-seed``.
        tokenizer_source: folder to copy tokenizer files from (default: ``base`` when a folder).
        vocabulary: a :class:`merging.tokenizer.VocabularyPlan` (the YAML ``tokenizer:``
            section): embedding rows re-indexed to a new vocabulary before merging.
        card: extra sections for the model card (e.g. the YAML config, learned coefficients).
        write_extra: called with the temporary output folder before it is renamed (extra files).
        settings: per-tensor parameter settings (the YAML path); replaces ``weights``/``params``.
        base_index: where the base sits among the inputs of methods whose inputs include it
            (``linear``); default: last.
        params: the method's parameters by their Python keywords (``lambda_``, ``density``,
            ``normalize``, ``combine``...): one value, or one per model for per-model parameters.

    Returns: ``Path(out)``, or a dict name -> merged tensor when ``out`` is None.
    """
    spec = get_merge_method(method)
    for key, value in (("dtype", dtype), ("compute_dtype", compute_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(f"{key} {value!r} is not allowed; expected one of {', '.join(DTYPES)}")
    compute = DTYPES[compute_dtype]
    base_src = _open(base) if base is not None else None
    if isinstance(base_src, TaskVector):
        raise ValueError(f"base model {base_src.label!r} is a task vector (deltas); give the model it was taken from")
    inputs = [_open(m) for m in models]
    spec.check_models(len(inputs), base_src is not None)
    if out is not None:
        _check_inputs_and_output(out, force, [base_src, *inputs], tokenizer_source)
    if base_src is not None:  # classifiers fine-tuned from a saved backbone are merged as that backbone
        inputs = [m if isinstance(m, TaskVector) else backbone_view(base_src, m) for m in inputs]
    reference = base_src if base_src is not None else inputs[0]
    if isinstance(reference, TaskVector):
        raise ValueError(f"merge method {method!r} without a base model needs full models, not task vector {reference.label!r}")
    vocab_tensors = set(vocabulary.tensors) if vocabulary is not None else set()
    for m in inputs:
        full = not isinstance(m, TaskVector)  # a task vector's rows are the base's: no re-indexing
        check_compatible(reference, m, what=f"model {_label(m)!r}", require_same_names=full,
                         vocabulary=vocab_tensors if full else frozenset())
    with_base = spec.base_is_input and base_src is not None
    weights_of = weights if callable(weights) else None
    if settings is None:
        python = _yaml_names(spec, params)
        if "weight" in spec.names():
            if weights_of is None:
                python["weight"] = weights
        elif weights != 1.0:
            raise ValueError(f"merge method {method!r} takes no weights; got weights={weights!r}")
        settings = Settings.from_python(spec, len(inputs), python, with_base)
    names = sorted(reference.names())
    config = reference.config() or {}
    positions = LayerPositions(names, config.get("model_type"))
    floats = [n for n in names if reference.dtype(n).is_floating_point]
    order = _participants(len(inputs), with_base, base_index)
    own = [*settings.per_model, settings.base] if with_base else settings.per_model
    if len(settings.per_model) != len(inputs):
        raise ValueError(f"{method}: parameters for {len(settings.per_model)} models, but {len(inputs)} models to merge")
    labels = [_label(m) for m in inputs] + ([_label(base_src)] if with_base else [])
    plan = _Plan(spec, settings, [(labels[i], [own[i], *settings.shared]) for i in order], floats, positions)
    generator = torch.Generator().manual_seed(seed) if spec.random else None

    def out_dtype_of(name: str) -> torch.dtype:
        return DTYPES[dtype] if dtype and reference.dtype(name).is_floating_point else reference.dtype(name)

    def shape_of(name: str) -> torch.Size:
        return vocabulary.shape(name, reference.shape(name)) if name in vocab_tensors else reference.shape(name)

    def merged_tensors():
        for name in tqdm(names, desc=f"merge ({method})", disable=not progress, unit="tensor"):
            if name not in plan.kwargs:  # integer buffers: copied
                yield name, reference.get(name)
                continue
            kwargs = dict(plan.kwargs[name])
            if weights_of is not None:
                kwargs["weights"] = weights_of(name)
            if generator is not None:
                kwargs["generator"] = generator
            if name not in vocab_tensors and all(isinstance(m, TaskVector) and name not in m for m in inputs):
                yield name, base_src.get(name).to(out_dtype_of(name))  # no input changes it (e.g. LoRA-only merges)
                continue
            tensors = _Tensors(name, base_src, inputs, compute, vocabulary if name in vocab_tensors else None)
            if spec.inputs == "deltas":
                result = spec.fn(tensors.base, tensors.deltas(), **kwargs)
            else:
                thetas = tensors.models()
                if with_base:
                    thetas = [([*thetas, tensors.base])[i] for i in order]
                result = spec.fn(tensors.base, thetas, **kwargs)
            yield name, result.to(out_dtype_of(name))

    if out is None:
        return dict(merged_tensors())
    record = merge_record(method=spec, base=_label(base_src) if base_src is not None else None,
                          models=labels[: len(inputs)], settings=settings, dtype=dtype, compute_dtype=compute_dtype)
    out_config = dict(config) if config else None
    if out_config is not None and vocabulary is not None:
        out_config["vocab_size"] = vocabulary.vocab_size
    tokenizer = tokenizer_source or (getattr(reference, "path", None) if vocabulary is None else None)

    def extra_files(folder: Path) -> None:
        if vocabulary is not None:
            vocabulary.save_tokenizer(folder)
        if write_extra is not None:
            write_extra(folder)

    return write_model_folder(
        out, [(n, shape_of(n), out_dtype_of(n)) for n in names], merged_tensors(), config=out_config, dtype=dtype,
        tokenizer_source=tokenizer, card=model_card(record, extra=card), record=record, max_shard_bytes=max_shard_bytes, force=force,
        write_extra=extra_files,
    )


def _open(model):
    """A model as given: a path is read as ``model:`` entries are (task vectors and adapters as
    deltas, ``BASE+LORA``); modules and dicts of tensors become sources."""
    if isinstance(model, (str, os.PathLike)):
        return open_model(model)
    return model if isinstance(model, TaskVector) else as_source(model)


def _check_inputs_and_output(out, force: bool, sources: Sequence, tokenizer_source) -> None:
    """Before any work: the tokenizer source exists, and ``out`` is none of the folders read."""
    check_tokenizer_folder(tokenizer_source, "tokenizer_source")
    folders = [tokenizer_source, *(f for s in sources if s is not None for f in _folders_read(s))]
    check_output_dir(out, force=force, inputs=folders)


def _folders_read(source) -> tuple:
    """The folders a source reads (a task vector records its own; a checkpoint is its ``path``)."""
    return tuple(getattr(source, "folders", None) or (getattr(source, "path", None),))


def _label(source) -> str:
    return getattr(source, "label", None) or repr(source)


def _participants(k: int, with_base: bool, base_index: int | None) -> list[int]:
    """Order of [models..., base] as the method sees them: the base at ``base_index`` (default last)."""
    order = list(range(k))
    if with_base:
        order.insert(k if base_index is None else base_index, k)
    return order


class _Tensors:
    """One tensor of the base and of every input, in the computation dtype, read on demand."""

    def __init__(self, name: str, base_src, inputs: Sequence, dtype: torch.dtype, vocabulary=None):
        self.name, self.inputs, self.dtype = name, inputs, dtype
        self.base = self._read(base_src, what="base model") if base_src is not None else None
        self.aligned = None
        if vocabulary is not None:  # re-index rows to the output vocabulary, base last
            thetas = [self._theta(k) for k in range(len(inputs))] + ([self.base] if self.base is not None else [])
            self.aligned = vocabulary.align(name, thetas)
            if self.base is not None:
                self.base = self.aligned[-1]

    def _read(self, source, what: str = "model") -> torch.Tensor:
        tensor = source.get(self.name)
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{what} {_label(source)!r}: tensor {self.name!r} contains NaN or inf")
        return tensor.to(self.dtype)

    def _task_delta(self, k: int) -> torch.Tensor:
        model = self.inputs[k]
        return model.get(self.name).to(self.dtype) if self.name in model else torch.zeros_like(self.base)

    def _theta(self, k: int) -> torch.Tensor:
        if isinstance(self.inputs[k], TaskVector):
            return self.base + self._task_delta(k)
        return self._read(self.inputs[k])

    def delta(self, k: int) -> torch.Tensor:
        if self.aligned is not None:
            return self.aligned[k] - self.base
        if isinstance(self.inputs[k], TaskVector):
            return self._task_delta(k)
        return self._read(self.inputs[k]) - self.base

    def models(self) -> list[torch.Tensor]:
        return self.aligned[: len(self.inputs)] if self.aligned is not None else [self._theta(k) for k in range(len(self.inputs))]

    def deltas(self) -> Sequence[torch.Tensor]:
        return _LazyDeltas(self)


class _LazyDeltas(Sequence):
    """The K deltas θ_k − θ_0 of one tensor, each computed when indexed and not kept (bounds peak memory)."""

    def __init__(self, tensors: _Tensors):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors.inputs)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.tensors.delta(k)

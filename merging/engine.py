"""``merge()``: run a registered merge method over a base model and task vectors, tensor by tensor.

With ``out=`` the result is written as a model folder by :func:`merging.output.write_model_folder`;
without it the merged tensors are returned as a dict (small models). Each tensor is read, merged
and written before the next is read, so memory stays at about one tensor times the number of
task vectors (see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modular.checkpoint import check_output_dir

from .methods import MergeMethod, get_merge_method
from .output import model_card, write_model_folder
from .sources import DEFAULT_SHARD_BYTES, DTYPES, as_source, check_compatible

__all__ = ["merge"]

Weights = float | Sequence[float] | Callable[[str], Sequence[float]]


def _yaml_params(method: MergeMethod, params: dict) -> dict:
    """Python keywords (``lambda_``, ``weights``) back to the declared (YAML) parameter names."""
    names = {p.keyword: p.name for p in method.parameters}
    return {names.get(k, k): v for k, v in params.items()}


def merge(
    method: str,
    base,
    task_vectors: Sequence,
    *,
    weights: Weights = 1.0,
    out: str | os.PathLike | None = None,
    force: bool = False,
    dtype: str | None = None,
    seed: int = 0,
    tokenizer_source: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    card: dict | None = None,
    write_extra: Callable[[Path], None] | None = None,
    progress: bool = True,
    **params,
):
    """Merge ``task_vectors`` into ``base`` with the registered method ``method``.

    Args:
        method: a name from ``merging.methods.merge_method_names()`` (``task_arithmetic``,
            ``ties``, ``dare_linear``, ``dare_ties``, ...). AdaMerging learns its coefficients
            first (:func:`merging.adamerge`), then merges through this function.
        base: θ_0 as a checkpoint folder, a module or a dict of tensors.
        task_vectors: :class:`merging.TaskVector` objects (or anything with ``names``, ``shape``,
            ``get``, ``label``).
        weights: per-task-vector weights w_k; a callable ``name -> [w_k]`` gives per-tensor ones.
        out: write a model folder there (refuses a non-empty folder unless ``force``).
        dtype: output dtype (``float32``/``bfloat16``/``float16``); default: the base's.
            Computation is in float32 either way.
        seed: seeds random methods (DARE); each tensor's masks are seeded from (seed, tensor
            name), so results do not depend on tensor order.
        tokenizer_source: folder to copy tokenizer files from (default: ``base`` when a folder).
        card: extra sections for the model card (e.g. the YAML config, learned coefficients).
        write_extra: called with the temporary output folder before it is renamed (extra files).
        params: the method's parameters by their Python keywords (``lambda_``, ``density``,
            ``normalize``, ``combine``...), checked against the method's declaration.

    Returns: ``Path(out)``, or a dict name -> merged tensor when ``out`` is None.
    """
    spec = get_merge_method(method)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not allowed; expected one of {', '.join(DTYPES)}")
    if not task_vectors:
        raise ValueError("merge: give at least one task vector")
    source = as_source(base)
    if out is not None:
        _check_inputs_and_output(out, force, source, task_vectors, tokenizer_source)
    for tv in task_vectors:
        check_compatible(source, tv, what=f"task vector {tv.label!r}", require_same_names=False)
    yaml_params = _yaml_params(spec, params)
    if spec.takes_seed:
        yaml_params.setdefault("seed", seed)
    if not callable(weights):
        yaml_params["weight"] = weights
    kwargs = spec.resolve(yaml_params, len(task_vectors))
    weights_of = weights if callable(weights) else (lambda name: kwargs["weights"])

    def out_dtype_of(name: str) -> torch.dtype:
        return DTYPES[dtype] if dtype and source.dtype(name).is_floating_point else source.dtype(name)

    def merged_tensors():
        for name in tqdm(source.names(), desc=f"merge ({method})", disable=not progress, unit="tensor"):
            tensor = source.get(name)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"base model {source!r}: tensor {name!r} contains NaN or inf")
            if not any(name in tv for tv in task_vectors):
                yield name, tensor.to(out_dtype_of(name))
                continue
            per_tensor = {**kwargs, "weights": weights_of(name)}
            if spec.takes_seed:
                per_tensor["seed"] = kwargs["seed"] ^ zlib.crc32(name.encode())
            merged = spec.fn(tensor.float(), _LazyDeltas(task_vectors, name, tensor.shape), **per_tensor)
            yield name, merged.to(out_dtype_of(name))

    if out is None:
        return dict(merged_tensors())
    shown = {k: v for k, v in yaml_params.items() if k != "weight"}
    text = model_card(method=method, params=shown, task_vectors=[tv.label for tv in task_vectors],
                      weights=None if callable(weights) else weights, extra=card)
    tokenizer = tokenizer_source or (source.path if hasattr(source, "path") else None)
    return write_model_folder(
        out, [(n, source.shape(n), out_dtype_of(n)) for n in source.names()], merged_tensors(), config=source.config(),
        dtype=dtype, tokenizer_source=tokenizer, card=text, max_shard_bytes=max_shard_bytes, force=force,
        write_extra=write_extra,
    )


def _check_inputs_and_output(out, force: bool, source, task_vectors: Sequence, tokenizer_source) -> None:
    """Before any work: the tokenizer source exists, and ``out`` is none of the folders read."""
    if tokenizer_source is not None and not Path(tokenizer_source).is_dir():
        raise FileNotFoundError(f"tokenizer_source {str(tokenizer_source)!r} is not a folder")
    folders = [getattr(source, "path", None), tokenizer_source, *(f for tv in task_vectors for f in getattr(tv, "folders", ()))]
    check_output_dir(out, force=force, inputs=folders)


class _LazyDeltas(Sequence):
    """The K deltas of one tensor, each computed when indexed and not kept (bounds peak memory)."""

    def __init__(self, task_vectors: Sequence, name: str, shape: torch.Size):
        self.task_vectors, self.name, self.shape = task_vectors, name, shape

    def __len__(self) -> int:
        return len(self.task_vectors)

    def __getitem__(self, k: int) -> torch.Tensor:
        tv = self.task_vectors[k]
        return tv.get(self.name) if self.name in tv else torch.zeros(self.shape)

"""``merge()``: run a registered merge method over a base model and task vectors, tensor by tensor.

With ``out=`` the result is written as a model folder (sharded safetensors, the base's
``config.json`` — injection records included, so ``modular.load_model`` rebuilds an injected
model — the tokenizer files and a README.md model card) into a temporary folder renamed at the
end. Without ``out`` the merged tensors are returned as a dict (small models).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modular.checkpoint import atomic_output_dir

from .methods import get_merge_method
from .streaming import DEFAULT_SHARD_BYTES, DTYPES, CheckpointSource, ShardedWriter, as_source
from .task_vector import TaskVector, _first_mismatches

__all__ = ["merge", "write_model_card"]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.txt",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
Weights = float | Sequence[float] | Callable[[str], Sequence[float]]


def _method_params(method: str, fn: Callable, params: dict) -> None:
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("base", "deltas", "weights", "seed")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"merge method {method!r} has no parameter(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def _check_task_vectors(base, task_vectors: Sequence[TaskVector]) -> None:
    if not task_vectors:
        raise ValueError("merge: give at least one task vector")
    names = set(base.names())
    for tv in task_vectors:
        problems = [f"{n!r} not in base" for n in tv.names() if n not in names]
        problems += [f"{n!r} has shape {tuple(s)} in the task vector, {tuple(base.shape(n))} in base" for n, s in tv.shapes.items() if n in names and base.shape(n) != s]
        if problems:
            raise ValueError(f"{tv.label} does not match base {base!r}: {_first_mismatches(problems)}")


def merge(
    method: str,
    base,
    task_vectors: Sequence[TaskVector],
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
    """Merge ``task_vectors`` into ``base`` with method ``method``.

    Args:
        method: a name in ``merging.MERGE_METHODS`` (``task_arithmetic``, ``ties``,
            ``dare_linear``, ``dare_ties``), or ``"adamerging"`` (then see ``merging.adamerge``;
            ``base`` must be a module and ``params`` its arguments; returns an ``AdaMergingResult``).
        base: θ_0 as a checkpoint folder, a module or a dict of tensors.
        weights: per-task-vector weights w_k; a callable ``name -> [w_k]`` gives per-tensor ones.
        out: write a model folder there (refuses a non-empty folder unless ``force``).
        dtype: output dtype (``float32``/``bfloat16``/``float16``); default: the base's.
        seed: DARE seed; each tensor's masks are seeded from (seed, tensor name), so results do
            not depend on tensor order.
        tokenizer_source: folder to copy tokenizer files from (default: ``base`` when a folder).
        card: extra sections for the model card (e.g. the YAML config, learned coefficients).
        write_extra: called with the temporary output folder before it is renamed (extra files).
        params: the method's parameters (``lambda_``, ``density``, ``combine``, ``normalize``).

    Returns: ``Path(out)``, or a dict name -> merged tensor when ``out`` is None.
    """
    if method == "adamerging":
        from .adamerging import adamerge

        return adamerge(base, task_vectors, **params)
    fn = get_merge_method(method)
    _method_params(method, fn, params)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not allowed; expected one of {', '.join(DTYPES)}")
    source = as_source(base)
    _check_task_vectors(source, task_vectors)
    takes_seed = "seed" in inspect.signature(fn).parameters
    weights_of = weights if callable(weights) else (lambda name: weights)

    def out_dtype_of(name: str) -> torch.dtype:
        return DTYPES[dtype] if dtype and source.dtype(name).is_floating_point else source.dtype(name)

    def merged_tensors():
        for name in tqdm(source.names(), desc=f"merge ({method})", disable=not progress, unit="tensor"):
            tensor = source.get(name)
            touching = [tv for tv in task_vectors if name in tv]
            out_dtype = out_dtype_of(name)
            if not touching:
                yield name, tensor.to(out_dtype)
                continue
            deltas = _LazyDeltas(task_vectors, name, tensor.shape)
            extra = {"seed": seed ^ zlib.crc32(name.encode())} if takes_seed else {}
            merged = fn(tensor.float(), deltas, weights=weights_of(name), **params, **extra)
            yield name, merged.to(out_dtype)

    if out is None:
        return dict(merged_tensors())
    with atomic_output_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, [(n, source.shape(n), out_dtype_of(n)) for n in source.names()], max_shard_bytes)
        for name, tensor in merged_tensors():
            writer.add(name, tensor)
        writer.close()
        _write_config(tmp, source, dtype)
        tok = tokenizer_source or (source.path if isinstance(source, CheckpointSource) else None)
        if tok is not None:
            copy_tokenizer(Path(tok), tmp)
        write_model_card(tmp, method=method, params={**params, "seed": seed} if takes_seed else params,
                         task_vectors=[tv.label for tv in task_vectors], weights=None if callable(weights) else weights,
                         extra=card)
        if write_extra is not None:
            write_extra(tmp)
    return Path(out)


class _LazyDeltas(Sequence):
    """The K deltas of one tensor, each computed when indexed and not kept (bounds peak memory)."""

    def __init__(self, task_vectors: Sequence[TaskVector], name: str, shape: torch.Size):
        self.task_vectors, self.name, self.shape = task_vectors, name, shape

    def __len__(self) -> int:
        return len(self.task_vectors)

    def __getitem__(self, k: int) -> torch.Tensor:
        tv = self.task_vectors[k]
        return tv.get(self.name) if self.name in tv else torch.zeros(self.shape)


def _write_config(folder: Path, source, dtype: str | None) -> None:
    config = source.config()
    if config is None:
        return
    if dtype:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def copy_tokenizer(source: Path, folder: Path) -> None:
    if not source.is_dir():
        raise FileNotFoundError(f"tokenizer source {str(source)!r} is not a folder")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def write_model_card(folder: Path, *, method: str, params: dict, task_vectors: list[str], weights=None, extra: dict | None = None) -> None:
    """README.md: what was merged, how, and (for AdaMerging) the learned coefficients."""
    lines = [
        "---", "tags: [merge, modular-llm]", "---", "", f"# Merged model ({method})", "",
        "Made with `modular merge` (modular-llm).", "", "## Method", "", f"- method: `{method}`",
    ]
    lines += [f"- {k}: `{v}`" for k, v in params.items()]
    lines += ["", "## Task vectors", ""]
    for i, label in enumerate(task_vectors):
        w = weights[i] if isinstance(weights, (list, tuple)) else weights
        lines.append(f"- `{label}`" + (f" (weight {w})" if w is not None else ""))
    for title, body in (extra or {}).items():
        lines += ["", f"## {title}", "", body]
    (folder / "README.md").write_text("\n".join(lines) + "\n")

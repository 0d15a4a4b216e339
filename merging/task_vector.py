"""``TaskVector``: τ = θ_ft − θ_0 by parameter name, computed lazily tensor by tensor.

A task vector never holds a model: each ``get(name)`` reads the two tensors it needs (from
safetensors shards, modules or a saved task vector), subtracts them in float32 and checks the
result is finite. Arithmetic (``+``, ``−``, scalar ``×``) composes lazily too, so
``(tv_a + tv_b).save(...)`` streams. A tensor absent from a task vector means a zero delta
(e.g. the weights a LoRA adapter does not touch).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from modular.checkpoint import (
    CheckpointError,
    SafetensorsCheckpoint,
    ShardedWriter,
    atomic_output_dir,
    atomic_write_text,
)

from .methods import ties_process
from .sources import DEFAULT_SHARD_BYTES, as_source, backbone_view, check_compatible, first_mismatches

__all__ = ["FORMAT", "TaskVector", "ties_processed"]

FORMAT = "modular-task-vector"
META_FILE = "task_vector.json"


class TaskVector:
    """Named deltas, computed on demand.

    Args:
        shapes: tensor name -> shape, for every tensor with a (possibly) non-zero delta.
        get: name -> float32 delta tensor of that shape.
        label: shown in error messages and model cards.
    """

    def __init__(self, shapes: Mapping[str, torch.Size], get: Callable[[str], torch.Tensor], label: str = "task vector"):
        self.shapes = dict(shapes)
        self._get = get
        self.label = label

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_models(cls, base, finetuned, *, exclude: str | None = None, label: str | None = None) -> TaskVector:
        """τ = finetuned − base. Each argument is a checkpoint folder, a module or a dict of tensors.

        ``exclude``: regex; matching names are left out (e.g. per-task heads, ``"^classifier\\."``).
        A fine-tuned model that is ``base``'s backbone with a head (a ``*ForSequenceClassification``
        trained from a saved backbone) gives the deltas of its backbone (:func:`merging.sources.backbone_view`).
        """
        base_src = as_source(base)
        ft_src = backbone_view(base_src, as_source(finetuned))
        keep = [n for n in base_src.names() if not (exclude and re.search(exclude, n))]
        ft_keep = [n for n in ft_src.names() if not (exclude and re.search(exclude, n))]
        check_compatible(_Subset(base_src, keep), _Subset(ft_src, ft_keep), what="fine-tuned model")
        return cls(
            {n: base_src.shape(n) for n in keep},
            lambda n: ft_src.get(n).float() - base_src.get(n).float(),
            label=label or repr(ft_src),
        )

    @classmethod
    def from_lora(cls, adapter, *, adapter_name: str = "default", label: str | None = None) -> TaskVector:
        """The dense delta ΔW = scaling · B A of each LoRA layer, under the base weight's name.

        ``adapter``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
        or a ``PeftModel``. Linear LoRA layers only (embedding/conv LoRA, DoRA and
        ``modules_to_save`` raise); ``use_rslora``, ``rank_pattern``, ``alpha_pattern`` and
        ``fan_in_fan_out`` are honoured.
        """
        from .lora import lora_deltas

        deltas = lora_deltas(adapter, adapter_name)
        return cls.from_tensors(deltas, label=label or str(adapter if not isinstance(adapter, torch.nn.Module) else "LoRA"))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], label: str = "task vector") -> TaskVector:
        tensors = {n: t.detach().float() for n, t in tensors.items()}
        return cls({n: t.shape for n, t in tensors.items()}, tensors.__getitem__, label=label)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskVector:
        """A task vector written by ``save`` (lazy: tensors are read when used)."""
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise CheckpointError(f"{path}: no {META_FILE}; not a task vector written by TaskVector.save")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
        src = SafetensorsCheckpoint(path)
        return cls({n: src.shape(n) for n in src.names()}, lambda n: src.get(n).float(), label=meta.get("label", str(path)))

    # -- access -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> torch.Size:
        return self.shapes[name]

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def get(self, name: str) -> torch.Tensor:
        """The delta for ``name`` (zeros if this vector does not touch it); NaN/inf are an error."""
        if name not in self.shapes:
            raise KeyError(f"{self.label}: no tensor named {name!r}")
        delta = self._get(name)
        if not torch.isfinite(delta).all():
            raise ValueError(f"{self.label}: tensor {name!r} of the task vector contains NaN or inf")
        return delta

    def to_dict(self) -> dict[str, torch.Tensor]:
        """All deltas in memory (small models only)."""
        return {n: self.get(n) for n in self.shapes}

    # -- arithmetic ---------------------------------------------------------------------------
    def _zip(self, other: TaskVector, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sym: str) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        clash = [f"{n!r}: {tuple(s)} vs {tuple(other.shapes[n])}" for n, s in self.shapes.items() if n in other.shapes and other.shapes[n] != s]
        if clash:
            raise ValueError(f"task vectors {self.label!r} and {other.label!r} disagree on shapes: {first_mismatches(clash)}")
        shapes = {**self.shapes, **other.shapes}

        def get(n: str) -> torch.Tensor:
            a = self.get(n) if n in self.shapes else torch.zeros(shapes[n])
            b = other.get(n) if n in other.shapes else torch.zeros(shapes[n])
            return op(a, b)

        return TaskVector(shapes, get, label=f"({self.label} {sym} {other.label})")

    def __add__(self, other: TaskVector) -> TaskVector:
        return self._zip(other, torch.add, "+")

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self._zip(other, torch.sub, "-")

    def __mul__(self, scale: float) -> TaskVector:
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return TaskVector(self.shapes, lambda n: self.get(n) * scale, label=f"{scale:g} * {self.label}")

    __rmul__ = __mul__

    def __neg__(self) -> TaskVector:
        return self * -1.0

    # -- output -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
        """Write as (sharded) safetensors + ``task_vector.json``, tensor by tensor, atomically."""
        with atomic_output_dir(path, force=force) as tmp:
            writer = ShardedWriter(tmp, [(n, s, torch.float32) for n, s in self.shapes.items()], max_shard_bytes)
            for name in self.shapes:
                writer.add(name, self.get(name))
            writer.close()
            atomic_write_text(tmp / META_FILE, json.dumps({"format": FORMAT, "version": 1, "label": self.label}, indent=2))
        return Path(path)

    def __repr__(self) -> str:
        return f"TaskVector({self.label!r}, {len(self.shapes)} tensors)"


def ties_processed(task_vectors: Sequence[TaskVector], *, density: float | Sequence[float] = 0.2) -> list[TaskVector]:
    """TIES steps 1–2 applied to each task vector (AdaMerging++'s inputs), lazily per tensor.

    τ̃_k = trim(τ_k) where its sign agrees with the sign elected over all K trimmed vectors
    (weights 1), else 0. Trimming is per tensor (see ``merging.methods``). The K rows of a
    tensor are computed together and the last tensor is cached, so reading τ̃_1..τ̃_K of one
    name costs one TIES pass.
    """
    cache: dict[str, torch.Tensor] = {}
    shapes = {n: s for tv in task_vectors for n, s in tv.shapes.items()}

    def row(k: int, name: str) -> torch.Tensor:
        if name not in cache:
            cache.clear()
            deltas = [tv.get(name) if name in tv else torch.zeros(shapes[name]) for tv in task_vectors]
            weighted, _, agree = ties_process(deltas, density=density)
            cache[name] = weighted.mul_(agree)
        return cache[name][k]

    return [TaskVector(shapes, functools.partial(row, k), label=f"TIES({tv.label})") for k, tv in enumerate(task_vectors)]


class _Subset:
    """A source restricted to some names (for ``exclude``)."""

    def __init__(self, source, names: list[str]):
        self.source, self._names = source, names

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> torch.Size:
        return self.source.shape(name)

    def config(self) -> dict | None:
        return self.source.config()

    def __repr__(self) -> str:
        return repr(self.source)

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
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from modular.checkpoint import (
    TMP_MARK,
    CheckpointError,
    SafetensorsCheckpoint,
    ShardedWriter,
    atomic_output_dir,
    atomic_write_text,
    check_output_dir,
)

from .methods import ties_process
from .sources import DEFAULT_SHARD_BYTES, as_source, backbone_view, check_compatible, first_mismatches

__all__ = ["FORMAT", "TaskVector", "is_task_vector", "open_model", "ties_processed"]

FORMAT = "modular-task-vector"
META_FILE = "task_vector.json"


class TaskVector:
    """Named deltas, computed on demand.

    Args:
        shapes: tensor name -> shape, for every tensor with a (possibly) non-zero delta.
        get: name -> float32 delta tensor of that shape.
        label: shown in error messages and model cards.
        folders: the checkpoint folders it reads (an output must never replace them).
        explain_nonfinite: name -> raises an error naming the input that holds NaN/inf, called
            when a delta is not finite (else the error names the task vector).
    """

    def __init__(self, shapes: Mapping[str, torch.Size], get: Callable[[str], torch.Tensor], label: str = "task vector",
                 folders: Sequence[Path] = (), explain_nonfinite: Callable[[str], None] | None = None):
        self.shapes = dict(shapes)
        self._get = get
        self._explain_nonfinite = explain_nonfinite
        self.label = label
        self.folders = tuple(folders)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_models(cls, base, finetuned, *, exclude: str | None = None, label: str | None = None) -> TaskVector:
        """τ = finetuned − base. Each argument is a checkpoint folder, a module or a dict of tensors.

        ``exclude``: regex; matching names are left out (e.g. per-task heads, ``"^classifier\\."``).
        A fine-tuned model that is ``base``'s backbone with a head (a ``*ForSequenceClassification``
        trained from a saved backbone) gives the deltas of its backbone (:func:`merging.sources.backbone_view`).
        """
        for what, model in (("base", base), ("fine-tuned model", finetuned)):
            if isinstance(model, (str, os.PathLike)) and is_task_vector(model):
                raise ValueError(f"{what} {str(model)!r} is a saved task vector, not a model; use TaskVector.load")
        base_src = as_source(base)
        ft_src = backbone_view(base_src, as_source(finetuned))
        keep = [n for n in base_src.names() if not (exclude and re.search(exclude, n))]
        ft_keep = [n for n in ft_src.names() if not (exclude and re.search(exclude, n))]
        check_compatible(_Subset(base_src, keep), _Subset(ft_src, ft_keep), what="fine-tuned model")
        return cls(
            {n: base_src.shape(n) for n in keep},
            functools.partial(_difference, ft_src, base_src),
            label=label or repr(ft_src),
            folders=_folders(base_src, ft_src),
            explain_nonfinite=functools.partial(_name_nonfinite_model, ft_src, base_src),
        )

    @classmethod
    def from_lora(cls, adapter, *, adapter_name: str = "default", label: str | None = None) -> TaskVector:
        """The dense delta ΔW = scaling · B A of each LoRA layer, under the base weight's name.

        ``adapter``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``;
        each dense delta is computed when read) or a ``PeftModel``. Linear LoRA layers only
        (embedding/conv LoRA, DoRA and ``modules_to_save`` raise); ``use_rslora``,
        ``rank_pattern``, ``alpha_pattern`` and ``fan_in_fan_out`` are honoured.
        """
        from .lora import LoraAdapter, lora_deltas

        if isinstance(adapter, torch.nn.Module):
            return cls.from_tensors(lora_deltas(adapter, adapter_name), label=label or "LoRA")
        lora = LoraAdapter(adapter)
        return cls({n: lora.shape(n) for n in lora.names()}, lora.delta, label=label or str(adapter), folders=(lora.folder,))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], label: str = "task vector") -> TaskVector:
        tensors = {n: t.detach().float() for n, t in tensors.items()}
        return cls({n: t.shape for n, t in tensors.items()}, tensors.__getitem__, label=label)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskVector:
        """A task vector written by ``save``: a folder, or one ``.safetensors`` file (lazy: tensors
        are read when used)."""
        path = Path(path)
        if path.is_file():
            return _load_file(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise CheckpointError(f"{path}: no {META_FILE}; not a task vector written by TaskVector.save")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
        src = SafetensorsCheckpoint(path)
        return cls({n: src.shape(n) for n in src.names()}, lambda n: src.get(n).float(), label=meta.get("label", str(path)),
                   folders=(path,))

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
        if not torch.isfinite(delta).all():  # the one finiteness pass per read
            if self._explain_nonfinite is not None:
                self._explain_nonfinite(name)
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

        return TaskVector(shapes, get, label=f"({self.label} {sym} {other.label})", folders=self.folders + other.folders)

    def __add__(self, other: TaskVector) -> TaskVector:
        return self._zip(other, torch.add, "+")

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self._zip(other, torch.sub, "-")

    def __mul__(self, scale: float) -> TaskVector:
        if not isinstance(scale, (int, float)):
            return NotImplemented
        if not math.isfinite(scale):
            raise ValueError(f"{self.label}: scale {scale!r} is not allowed; expected a finite number")
        return TaskVector(self.shapes, lambda n: self.get(n) * scale, label=f"{scale:g} * {self.label}", folders=self.folders)

    __rmul__ = __mul__

    def __neg__(self) -> TaskVector:
        return self * -1.0

    # -- output -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
        """Write as (sharded) safetensors + ``task_vector.json``, tensor by tensor, atomically; a
        path ending in ``.safetensors`` gets one file instead (the format in its metadata)."""
        path = Path(path)
        layout = [(n, s, torch.float32) for n, s in self.shapes.items()]
        if path.suffix == ".safetensors":
            if any(path.resolve() == Path(f).resolve() for f in self.folders):
                raise ValueError(f"output {str(path)!r} is the input it is read from; write the output elsewhere")
            if path.exists() and not force:
                raise FileExistsError(f"output file {str(path)!r} exists; pass --force (force=True) to replace it")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))
            try:
                self._write(ShardedWriter(tmp, layout, max_shard_bytes=2**62, metadata={"modular": FORMAT, "label": self.label}))
                os.replace(tmp / "model.safetensors", path)  # the file was opened with the user's umask
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return path
        check_output_dir(path, force=force, inputs=self.folders)
        with atomic_output_dir(path, force=force) as tmp:
            self._write(ShardedWriter(tmp, layout, max_shard_bytes))
            atomic_write_text(tmp / META_FILE, json.dumps({"format": FORMAT, "version": 1, "label": self.label}, indent=2))
        return path

    def _write(self, writer: ShardedWriter) -> None:
        for name in self.shapes:
            writer.add(name, self.get(name))
        writer.close()

    def __repr__(self) -> str:
        return f"TaskVector({self.label!r}, {len(self.shapes)} tensors)"


def open_model(spec: str | os.PathLike):
    """A ``model:`` entry: ``BASE+LORA`` (the model with the adapter merged in, mergekit's form), a
    saved task vector or a PEFT adapter folder (deltas over the base model, as :class:`TaskVector`),
    or a checkpoint folder."""
    from .lora import LoraAdapter, LoraMerged, is_lora_adapter

    spec = str(spec)
    parts = spec.split("+")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"model {spec!r}: expected a folder or MODEL+LORA_ADAPTER (one '+')")
    for part in parts:
        if not Path(part).exists():
            raise FileNotFoundError(f"model {spec!r}: {part!r} does not exist (models are local folders; download hub models first)")
    if len(parts) == 2:
        return LoraMerged(SafetensorsCheckpoint(parts[0]), LoraAdapter(parts[1]), label=spec)
    if is_task_vector(spec):
        return TaskVector.load(spec)
    if is_lora_adapter(spec):
        return TaskVector.from_lora(spec, label=spec)
    return SafetensorsCheckpoint(spec)


def is_task_vector(path: str | os.PathLike) -> bool:
    """A task vector written by :meth:`TaskVector.save` (a folder with ``task_vector.json``, or a
    ``.safetensors`` file marked as one): merge inputs use it as a delta, never as a model."""
    path = Path(path)
    if path.is_dir():
        return (path / META_FILE).is_file()
    return path.suffix == ".safetensors" and path.is_file() and _file_metadata(path).get("modular") == FORMAT


def _file_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot be read as safetensors ({err})") from None


def _load_file(path: Path) -> TaskVector:
    meta = _file_metadata(path)
    if meta.get("modular") != FORMAT:
        raise CheckpointError(f"{path}: not a task vector written by TaskVector.save (metadata {meta})")
    with safe_open(str(path), framework="pt") as f:
        shapes = {n: torch.Size(f.get_slice(n).get_shape()) for n in f.keys()}

    def get(name: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name).float()

    return TaskVector(shapes, get, label=meta.get("label", str(path)))


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

    return [TaskVector(shapes, functools.partial(row, k), label=f"TIES({tv.label})", folders=tv.folders)
            for k, tv in enumerate(task_vectors)]


def _folders(*sources) -> tuple[Path, ...]:
    return tuple(src.path for src in sources if isinstance(src, SafetensorsCheckpoint))


def _difference(finetuned, base, name: str) -> torch.Tensor:
    """finetuned − base for ``name`` in float32 (``TaskVector.get`` checks it is finite)."""
    return finetuned.get(name).float() - base.get(name).float()


def _name_nonfinite_model(finetuned, base, name: str) -> None:
    """A non-finite delta: an error naming the model whose tensor ``name`` holds NaN or inf."""
    for role, source in (("base model", base), ("fine-tuned model", finetuned)):
        if not torch.isfinite(source.get(name).float()).all():
            raise ValueError(f"{role} {source!r}: tensor {name!r} contains NaN or inf")


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

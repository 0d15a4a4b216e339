"""Named tensor sources, and the one check that two of them can be merged.

A *source* answers ``names()``, ``shape(name)``, ``dtype(name)``, ``get(name)`` and ``config()``.
Checkpoint folders are read through ``modular.checkpoint.SafetensorsCheckpoint`` one tensor at a
time; modules and dicts are wrapped without copies, so merging never holds a whole model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from modular.checkpoint import SafetensorsCheckpoint

__all__ = ["DTYPES", "DictSource", "as_source", "backbone_view", "check_compatible", "check_tokenizer_folder",
           "first_mismatches", "parse_size"]

DEFAULT_SHARD_BYTES = 500 * 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def check_tokenizer_folder(folder: str | os.PathLike | None, key: str) -> None:
    """A tokenizer to copy from must be a folder; ``key`` names where it was given."""
    if folder is not None and not os.path.isdir(folder):
        raise FileNotFoundError(f"{key}: {str(folder)!r} is not a folder (give a model folder holding the tokenizer)")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size: ``"500MB"``, ``"2GB"``, ``"1GiB"``, or mergekit's ``"5B"``
    / ``"500M"`` / ``"20K"`` (powers of 1000; mergekit compares them with bytes too)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|[KMB])?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"shard size {size!r}: expected bytes or a size like '500MB', '2GB' or mergekit's '5B'")
    unit = (match.group(2) or "").upper()
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


class DictSource:
    """Named tensors already in memory (a ``state_dict`` or a plain dict)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "in-memory tensors", config: dict | None = None):
        self.tensors = tensors
        self.label = label
        self._config = config

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> torch.Size:
        return self.tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach()

    def config(self) -> dict | None:
        return self._config

    def __repr__(self) -> str:
        return self.label


Source = SafetensorsCheckpoint | DictSource


def as_source(obj) -> Source:
    """A folder path, a ``torch.nn.Module``, a dict of tensors, or an existing source (anything
    with ``names``, ``shape``, ``dtype`` and ``get``, e.g. :class:`merging.lora.LoraMerged`)."""
    if isinstance(obj, (SafetensorsCheckpoint, DictSource)) or all(hasattr(obj, a) for a in ("names", "shape", "dtype", "get")):
        return obj
    if isinstance(obj, torch.nn.Module):
        config = getattr(obj, "config", None)
        return DictSource(obj.state_dict(), label=type(obj).__name__, config=config.to_dict() if config is not None else None)
    if isinstance(obj, Mapping):
        return DictSource(obj)
    if isinstance(obj, (str, os.PathLike)):
        return SafetensorsCheckpoint(obj)
    raise TypeError(f"cannot read tensors from {type(obj).__name__}; give a folder, a module or a dict of tensors")


class _Prefixed:
    """``source``'s tensors ``prefix + name``, seen under ``name``."""

    def __init__(self, source, prefix: str, names: list[str]):
        self.source, self.prefix, self._names = source, prefix, names
        self.path, self.label = getattr(source, "path", None), getattr(source, "label", None)

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> torch.Size:
        return self.source.shape(self.prefix + name)

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self.prefix + name)

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(self.prefix + name)

    def config(self) -> dict | None:
        return self.source.config()

    def __repr__(self) -> str:
        return f"{self.source!r} (backbone)"


def backbone_view(base: Source, other: Source):
    """``other`` as ``base`` names its tensors, when ``other`` is ``base``'s backbone with a head
    (e.g. a ``*ForSequenceClassification`` fine-tuned from a saved ``BertModel``: every base
    tensor under one prefix such as ``bert.``, plus head tensors outside that prefix, which are
    left out: heads are not merged). Otherwise ``other`` itself."""
    base_names, other_names = base.names(), set(other.names())
    if not base_names or base_names[0] in other_names:
        return other
    first = base_names[0]
    for prefix in {n[: -len(first)] for n in other_names if n.endswith("." + first)}:
        rest = [n for n in other_names if not n.startswith(prefix)]
        if all(prefix + n in other_names for n in base_names) and len(rest) + len(base_names) == len(other_names):
            return _Prefixed(other, prefix, base_names)
    return other


def first_mismatches(items: list[str], limit: int = 5) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def check_compatible(base: Source, other, *, what: str = "model", require_same_names: bool = True,
                     vocabulary: set[str] | frozenset[str] = frozenset()) -> None:
    """Raise ``ValueError`` if ``other`` (a source or a task vector) cannot be merged into ``base``.

    Checks vocab sizes from the configs first (the usual cause of embedding mismatches), then
    names and shapes; the message lists the first mismatching tensors. ``require_same_names``:
    every base tensor must be in ``other`` (full models); task vectors may cover a subset.
    ``vocabulary``: tensors whose rows are re-indexed to a merged vocabulary (a ``tokenizer:``
    section): their row counts, and the configs' vocab sizes, may differ.
    """
    base_cfg, other_cfg = base.config() or {}, (other.config() if hasattr(other, "config") else None) or {}
    vb, vo = base_cfg.get("vocab_size"), other_cfg.get("vocab_size")
    if vb is not None and vo is not None and vb != vo and not vocabulary:
        raise ValueError(
            f"vocab sizes differ: base {base!r} has vocab_size {vb}, {what} {other!r} has {vo}; "
            "merge the vocabularies (tokenizer: {source: union}) or resize the fine-tuned model's embeddings first"
        )
    base_names, other_names = set(base.names()), set(other.names())
    problems = []
    if require_same_names:
        problems += [f"{n!r} missing from {what}" for n in base.names() if n not in other_names]
    problems += [f"{n!r} not in base" for n in other.names() if n not in base_names]
    problems += [
        f"{n!r} has shape {tuple(other.shape(n))} in {what}, {tuple(base.shape(n))} in base"
        for n in other.names()
        if n in base_names and other.shape(n)[n in vocabulary:] != base.shape(n)[n in vocabulary:]
    ]
    if problems:
        raise ValueError(
            f"{what} {other!r} does not match base {base!r} (different architecture or shapes): {first_mismatches(problems)}"
        )

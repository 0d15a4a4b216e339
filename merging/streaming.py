"""Tensor-by-tensor I/O: named tensor sources and a sharded safetensors writer.

A *source* answers ``names()``, ``shape(name)`` and ``get(name)``. Checkpoint folders are read
through ``modular.checkpoint.SafetensorsCheckpoint`` one tensor at a time (each read opens and
closes its shard, so mapped pages do not pile up in resident memory); modules and dicts are
wrapped without copies. The writer buffers at most one shard (``max_shard_bytes``) before it
writes it, so merging never holds a whole model.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from modular.checkpoint import CheckpointError, SafetensorsCheckpoint

__all__ = ["CheckpointSource", "DictSource", "ShardedWriter", "as_source", "parse_size"]

DEFAULT_SHARD_BYTES = 500 * 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(size: int | str) -> int:
    """``"500MB"``, ``"2GB"``, ``"1GiB"`` or an int -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"shard size {size!r}: expected bytes or a size like '500MB' / '2GB'")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


class CheckpointSource:
    """A HF checkpoint folder (single or sharded safetensors), read tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoint = SafetensorsCheckpoint(self.path)
        self._headers = self._read_headers()

    def _read_headers(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        headers = {}
        for file in self.checkpoint.files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        info = f.get_slice(name)
                        headers[name] = (torch.Size(info.get_shape()), _TORCH_DTYPES[info.get_dtype()])
            except Exception as err:  # safetensors raises its own types for corrupt files
                raise CheckpointError(f"{file}: cannot be read as safetensors ({err})") from None
        return headers

    def names(self) -> list[str]:
        return list(self._headers)

    def shape(self, name: str) -> torch.Size:
        return self._headers[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._headers[name][1]

    def get(self, name: str) -> torch.Tensor:
        return self.checkpoint.get(name)

    def config(self) -> dict | None:
        file = self.path / "config.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def __repr__(self) -> str:
        return str(self.path)


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


Source = CheckpointSource | DictSource


def as_source(obj) -> Source:
    """A folder path, a ``torch.nn.Module``, a dict of tensors, or an existing source."""
    if isinstance(obj, (CheckpointSource, DictSource)):
        return obj
    if isinstance(obj, torch.nn.Module):
        config = getattr(obj, "config", None)
        return DictSource(obj.state_dict(), label=type(obj).__name__, config=config.to_dict() if config is not None else None)
    if isinstance(obj, Mapping):
        return DictSource(obj)
    if isinstance(obj, (str, os.PathLike)):
        return CheckpointSource(obj)
    raise TypeError(f"cannot read tensors from {type(obj).__name__}; give a folder, a module or a dict of tensors")


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class ShardedWriter:
    """Write tensors straight into HF-style sharded safetensors files, with no shard buffer.

    The layout (names, shapes, dtypes, in writing order) is known before the first tensor, so
    each shard's header is written first and every tensor's bytes are appended as it arrives;
    memory stays at one tensor. Files: ``model.safetensors`` when one shard suffices, else
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
    """

    def __init__(self, folder: str | os.PathLike, layout: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = Path(folder)
        self.layout = [(name, list(shape), dtype) for name, shape, dtype in layout]
        self.shards = self._plan(max_shard_bytes)
        self.position = 0
        self.file = None

    def _plan(self, max_shard_bytes: int) -> list[list[int]]:
        shards, size = [[]], 0
        for i, (_, shape, dtype) in enumerate(self.layout):
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nbytes
        return shards

    def _file_name(self, shard: int) -> str:
        n = len(self.shards)
        return "model.safetensors" if n == 1 else f"model-{shard + 1:05d}-of-{n:05d}.safetensors"

    def _open_shard(self, shard: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in self.shards[shard]:
            name, shape, dtype = self.layout[i]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data start to 8 bytes
        self.file = open(self.folder / self._file_name(shard), "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout (same name, shape and dtype, in order)."""
        if self.position >= len(self.layout):
            raise ValueError(f"ShardedWriter: tensor {name!r} is beyond the planned layout")
        expected, shape, dtype = self.layout[self.position]
        if (name, list(tensor.shape), tensor.dtype) != (expected, shape, dtype):
            raise ValueError(f"ShardedWriter: got {name!r} {tuple(tensor.shape)} {tensor.dtype}, expected {expected!r} {tuple(shape)} {dtype}")
        shard = next(s for s, members in enumerate(self.shards) if self.position in members)
        if self.position == self.shards[shard][0]:
            if self.file is not None:
                self.file.close()
            self._open_shard(shard)
        self.file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.position += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.position != len(self.layout):
            raise ValueError(f"ShardedWriter: {len(self.layout) - self.position} planned tensors were not written")
        if len(self.shards) == 1:
            return
        weight_map = {self.layout[i][0]: self._file_name(s) for s, members in enumerate(self.shards) for i in members}
        total = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.layout)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

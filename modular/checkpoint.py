"""Reading HF safetensors checkpoints tensor by tensor, and writing folders atomically.

Shared by the loader (``modular.load_model``) and by ``merging/`` (streaming task vectors):
nothing here loads a whole model. Pickled ``.bin`` checkpoints are refused on purpose.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["CheckpointError", "SafetensorsCheckpoint", "atomic_output_dir"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, or not readable as safetensors."""


class SafetensorsCheckpoint:
    """Index of a HF checkpoint folder (single file or sharded) that reads tensors on demand.

    >>> ckpt = SafetensorsCheckpoint("out/")
    >>> w = ckpt.get("model.embed_tokens.weight")
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {str(self.path)!r} does not exist (expected a save_pretrained folder)")
        self.key_to_file = self._index()

    def _index(self) -> dict[str, Path]:
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({err})") from None
            files = {name: self.path / fname for name, fname in weight_map.items()}
            for f in set(files.values()):
                if not f.is_file():
                    raise CheckpointError(f"{index_path} names shard {f.name!r}, which is missing from {self.path}")
            return files
        single = self.path / SINGLE_FILE
        if single.is_file():
            return {name: single for name in self._keys_of(single)}
        if any(self.path.glob("*.bin")):
            raise CheckpointError(
                f"{self.path} holds only pickled .bin weights; modular-llm loads safetensors only "
                "(re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        raise CheckpointError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        try:
            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: cannot be read as safetensors ({err})") from None

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.key_to_file.values()))

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, name: str) -> bool:
        return name in self.key_to_file

    def get(self, name: str) -> torch.Tensor:
        if name not in self.key_to_file:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return next(iter(self.get_many([name])))[1]

    def get_many(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for ``names``, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.key_to_file:
                raise CheckpointError(f"{self.path}: no tensor named {name!r}")
            by_file.setdefault(self.key_to_file[name], []).append(name)
        for file, file_names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in file_names:
                        yield name, f.get_tensor(name)
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(f"{file}: cannot read tensors ({err})") from None


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    Refuses to replace an existing non-empty ``out`` unless ``force``; on error the
    temporary folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output folder {str(out)!r} is not empty; pass --force (force=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)

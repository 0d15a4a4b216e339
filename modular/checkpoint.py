"""Checkpoint I/O: safetensors folders read tensor by tensor, written shard by shard, atomically.

The one reader (:class:`SafetensorsCheckpoint`), the one writer (:class:`ShardedWriter`) and the
one atomic-output helper (:func:`atomic_output_dir`, :func:`atomic_write_text`) of the project:
the loader, task vectors, every merge and the training outputs use them. Nothing here loads a
whole model. Pickled ``.bin`` checkpoints are refused on purpose (safetensors only, never unpickle).

Temporary outputs are named ``.<name>.tmp-<pid>-<host>-<random>`` beside their target: a later
output to the same place removes those whose process is gone (a writer killed with SIGKILL
cannot clean up after itself). :func:`check_output_dir` keeps an output away from the inputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import socket
import struct
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = [
    "CheckpointError",
    "SafetensorsCheckpoint",
    "ShardedWriter",
    "TMP_MARK",
    "atomic_output_dir",
    "atomic_write_text",
    "check_output_dir",
    "remove_stale_temporaries",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TMP_MARK = ".tmp-"  # temporary outputs are named ``.<name>.tmp-<pid>-<host>-<random>`` beside their target

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, or not readable as safetensors."""


class SafetensorsCheckpoint:
    """A HF checkpoint folder (single file or sharded) whose tensors are read on demand.

    Names, shapes and dtypes come from the safetensors headers, read once; ``get`` opens the
    tensor's shard only for that read, so mapped pages do not pile up in resident memory.

    >>> ckpt = SafetensorsCheckpoint("out/")
    >>> w = ckpt.get("model.embed_tokens.weight")
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {str(self.path)!r} does not exist (expected a save_pretrained folder)")
        self.key_to_file = self._index()
        self._headers = self._read_headers()

    def _index(self) -> dict[str, Path]:
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({err})") from None
            files = {name: self.path / fname for name, fname in weight_map.items()}
            for f in set(files.values()):
                if not f.is_file():
                    raise CheckpointError(f"{index_path} names shard {f.name!r}, which is missing from {self.path}")
            return files
        single = self.path / SINGLE_FILE
        if single.is_file():
            return {name: single for name in _open(single, lambda f: list(f.keys()))}
        if any(self.path.glob("*.bin")):
            raise CheckpointError(
                f"{self.path} holds only pickled .bin weights; modular-llm loads safetensors only "
                "(re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        raise CheckpointError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    def _read_headers(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        headers = {}
        for file in self.files:
            headers.update(_open(file, _shapes_and_dtypes))
        missing = [n for n in self.key_to_file if n not in headers]
        if missing:
            raise CheckpointError(f"{self.path}: the index names tensors its shards do not hold, e.g. {missing[:3]}")
        return {name: headers[name] for name in self.key_to_file}

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.key_to_file.values()))

    def names(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, name: str) -> bool:
        return name in self.key_to_file

    def shape(self, name: str) -> torch.Size:
        return self._headers[self._known(name)][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._headers[self._known(name)][1]

    def config(self) -> dict | None:
        """The folder's ``config.json`` as a dict (``None`` when there is none)."""
        file = self.path / "config.json"
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{file}: not valid JSON ({err})") from None

    def _known(self, name: str) -> str:
        if name not in self.key_to_file:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return name

    def get(self, name: str) -> torch.Tensor:
        return next(iter(self.get_many([name])))[1]

    def get_many(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for ``names``, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.key_to_file[self._known(name)], []).append(name)
        for file, file_names in by_file.items():
            yield from _open(file, lambda f, file_names=file_names: [(n, f.get_tensor(n)) for n in file_names])

    def __repr__(self) -> str:
        return str(self.path)


def _shapes_and_dtypes(handle) -> dict[str, tuple[torch.Size, torch.dtype]]:
    slices = {name: handle.get_slice(name) for name in handle.keys()}
    return {name: (torch.Size(s.get_shape()), _TORCH_DTYPES[s.get_dtype()]) for name, s in slices.items()}


def _open(file: Path, read):
    """``read(handle)`` on an open safetensors file; any safetensors error becomes a CheckpointError."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return read(f)
    except Exception as err:  # safetensors raises its own error types for corrupt headers or data
        raise CheckpointError(f"{file}: cannot be read as safetensors ({err})") from None


class ShardedWriter:
    """Write tensors straight into HF-style sharded safetensors files, with no shard buffer.

    The layout (names, shapes, dtypes, in writing order) is known before the first tensor, so
    each shard's header is written first and every tensor's bytes are appended as it arrives;
    memory stays at one tensor. Files: ``model.safetensors`` when one shard suffices, else
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``. Write into a
    folder from :func:`atomic_output_dir`, so a killed writer leaves nothing half-written.
    """

    def __init__(self, folder: str | os.PathLike, layout: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int = 500 * 2**20, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}  # each shard's ``__metadata__``
        self.layout = [(name, list(shape), dtype) for name, shape, dtype in layout]
        unsupported = sorted({str(dtype) for _, _, dtype in self.layout if dtype not in _ST_DTYPES})
        if unsupported:
            raise ValueError(f"ShardedWriter: dtypes {unsupported} have no safetensors encoding")
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
        return SINGLE_FILE if n == 1 else f"model-{shard + 1:05d}-of-{n:05d}.safetensors"

    def _open_shard(self, shard: int) -> None:
        header, offset = {"__metadata__": self.metadata}, 0
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
        self.file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
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
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _temporary_sibling(out: Path, *, folder: bool) -> Path:
    """A new temporary file or folder beside ``out`` (named after this process), readable as the
    user's umask allows. Stale ones of killed processes are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    prefix = f".{out.name}{TMP_MARK}{os.getpid()}-{_host()}-"
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a normal mkdir would follow the umask
        return tmp
    fd, name = tempfile.mkstemp(prefix=prefix, dir=out.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``out`` left by processes of this host that are gone (a
    killed merge or save); returns them. Ones of other hosts or live processes stay; ones in the
    older pid-less naming are reported (a warning), not removed, since their owner is unknown."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    ours = re.compile(rf"^\.{re.escape(out.name)}{re.escape(TMP_MARK)}(\d+)-(.+)-[a-z0-9_]{{8}}$")
    unknown = re.compile(rf"^\.{re.escape(out.name)}{re.escape(TMP_MARK)}[a-z0-9_]{{8}}$")
    removed = []
    for sibling in out.parent.iterdir():
        match = ours.match(sibling.name)
        if match and match.group(2) == _host() and not _process_alive(int(match.group(1))):
            if sibling.is_dir():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)
            removed.append(sibling)
        elif unknown.match(sibling.name):
            warnings.warn(f"{sibling}: a temporary output of an interrupted run (of an older modular-llm); remove it",
                          stacklevel=3)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary output(s) of killed runs beside {out}: "
                      f"{', '.join(p.name for p in removed)}", stacklevel=3)
    return removed


def check_output_dir(out: str | os.PathLike, *, force: bool = False,
                     inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse, before any work, an output folder that :func:`atomic_output_dir` would refuse, or
    one that is, contains or lies inside one of ``inputs`` (replacing it would destroy an input).
    ``None`` entries (inputs given as modules or tensors) are skipped. Returns ``Path(out)``."""
    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise ValueError(f"output folder {str(out)!r}: give a folder name (e.g. ./merged), not {str(out)!r}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output folder {str(out)!r} is not empty; pass --force (force=True) to replace it")
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            relation = "is" if target == source else "contains" if source.is_relative_to(target) else "lies inside"
            raise ValueError(f"output {str(out)!r} {relation} the input {str(given)!r}; write the output elsewhere")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Give everything written into ``folder`` the modes a plain ``open``/``mkdir`` would: some
    writers create files 0600 whatever the umask (safetensors' ``save_file``, hence
    ``save_pretrained``'s weights)."""
    mask = _umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename,
    its files and folders with the user's umask.

    Refuses to replace an existing non-empty ``out`` unless ``force``; on error (or
    ``KeyboardInterrupt``) the temporary folder is removed and ``out`` is left as it was.
    """
    out = check_output_dir(out, force=force)
    tmp = _temporary_sibling(out, folder=True)
    try:
        yield tmp
        _apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out.exists():
        tmp.rename(out)
    elif _exchange(tmp, out):  # the old folder is now at tmp
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # no atomic exchange here: for a moment neither folder is at `out`
        old = _temporary_sibling(out, folder=True)
        os.replace(out, old / "old")
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so a replaced
    output is never missing, even for a moment; ``False`` where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_write_text(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write ``text`` (or bytes) to ``path`` through a temporary sibling renamed over it (never half-written)."""
    path = Path(path)
    tmp = _temporary_sibling(path, folder=False)
    try:
        tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

"""The one writer of merged models: a HF model folder written tensor by tensor, atomically.

Sharded safetensors (:class:`modular.checkpoint.ShardedWriter`), the base's ``config.json``
(injection records included, so ``modular.load_model`` rebuilds an injected model), the
tokenizer files and a ``README.md`` model card — all into a temporary folder renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from modular.checkpoint import ShardedWriter, atomic_output_dir, atomic_write_text

__all__ = ["TOKENIZER_FILES", "copy_tokenizer", "model_card", "write_model_folder"]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.txt",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def write_model_folder(
    out: str | os.PathLike, layout: list[tuple[str, torch.Size, torch.dtype]], tensors: Iterable[tuple[str, torch.Tensor]],
    *, config: dict | None, dtype: str | None, tokenizer_source: str | os.PathLike | None, card: str,
    max_shard_bytes: int, force: bool = False, write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``tensors`` (in ``layout`` order) with ``config``, tokenizer files and ``card`` to ``out``.

    ``dtype``: the output dtype's name, recorded in the config. ``write_extra(folder)`` adds files
    to the temporary folder before it is renamed.
    """
    with atomic_output_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, layout, max_shard_bytes)
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.close()
        if config is not None:
            config = dict(config)
            if dtype:
                config["dtype"] = dtype
                config.pop("torch_dtype", None)
            atomic_write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True))
        if tokenizer_source is not None:
            copy_tokenizer(Path(tokenizer_source), tmp)
        atomic_write_text(tmp / "README.md", card)
        if write_extra is not None:
            write_extra(tmp)
    return Path(out)


def copy_tokenizer(source: Path, folder: Path) -> None:
    if not source.is_dir():
        raise FileNotFoundError(f"tokenizer source {str(source)!r} is not a folder")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def model_card(*, method: str, params: dict, task_vectors: list[str], weights=None, extra: dict | None = None) -> str:
    """README.md text: what was merged, how, and extra sections (e.g. learned coefficients)."""
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
    return "\n".join(lines) + "\n"

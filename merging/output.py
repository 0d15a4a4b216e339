"""The one writer of merged models: a HF model folder written tensor by tensor, atomically.

Sharded safetensors (:class:`modular.checkpoint.ShardedWriter`), the base's ``config.json``
(injection records included, so ``modular.load_model`` rebuilds an injected model), the
tokenizer files, ``merge.json`` (what was merged and how, read by ``modular report``) and a
``README.md`` model card — all into a temporary folder renamed at the end. Every file gets the
user's umask, as a plain ``open`` would.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from modular.checkpoint import ShardedWriter, atomic_output_dir, atomic_write_text

from .parameters import plain

__all__ = ["MERGE_RECORD", "TOKENIZER_FILES", "copy_tokenizer", "merge_record", "model_card", "write_model_folder"]

MERGE_RECORD = "merge.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.txt",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def write_model_folder(
    out: str | os.PathLike, layout: list[tuple[str, torch.Size, torch.dtype]], tensors: Iterable[tuple[str, torch.Tensor]],
    *, config: dict | None, dtype: str | None, tokenizer_source: str | os.PathLike | None, card: str, record: dict,
    max_shard_bytes: int, force: bool = False, write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``tensors`` (in ``layout`` order) with ``config``, tokenizer files, ``record`` and ``card`` to ``out``.

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
        atomic_write_text(tmp / MERGE_RECORD, json.dumps(record, indent=2))
        atomic_write_text(tmp / "README.md", card)
        if write_extra is not None:
            write_extra(tmp)
    return Path(out)


def copy_tokenizer(source: Path, folder: Path) -> None:
    """Copy ``source``'s tokenizer files (contents only: the copies get the user's umask)."""
    if not source.is_dir():
        raise FileNotFoundError(f"tokenizer source {str(source)!r} is not a folder")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def merge_record(*, method, base: str | None, models: list[str], settings, dtype: str | None, compute_dtype: str) -> dict:
    """What ``merge.json`` holds: the method, the inputs, the parameters as given (per model and
    shared; gradients and filters as written) and the defaults that filled the rest."""
    per_model = list(settings.per_model)
    record = {
        "format": "modular-merge", "version": 1, "method": method.name, "base_model": base,
        "models": [{"model": label, "parameters": {k: plain(v) for k, v in scope.items()}} for label, scope in zip(models, per_model)],
        "parameters": {k: plain(v) for scope in reversed(settings.shared) for k, v in scope.items()},
        "defaults": {k: (None if v is None else v if isinstance(v, (bool, int, float, str)) else repr(v))
                     for k, v in method.defaults(mergekit=settings.mergekit_defaults).items()},
        "defaults_from": "mergekit 0.1.5" if settings.mergekit_defaults else "modular-llm",
        "dtype": dtype, "compute_dtype": compute_dtype,
    }
    return record


def _shown(value) -> str:
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def model_card(record: dict, extra: dict | None = None) -> str:
    """README.md text from a :func:`merge_record`: what was merged, how, and extra sections
    (e.g. the YAML config, learned coefficients)."""
    lines = [
        "---", "tags: [merge, modular-llm]", "---", "", f"# Merged model ({record['method']})", "",
        "Made with `modular merge` (modular-llm).", "", "## Method", "", f"- method: `{record['method']}`",
    ]
    if record["base_model"]:
        lines.append(f"- base model: `{record['base_model']}`")
    lines += [f"- {k}: {_shown(v)}" for k, v in record["parameters"].items()]
    unset = {k: v for k, v in record["defaults"].items() if k not in record["parameters"]}
    if unset:
        lines.append(f"- defaults ({record['defaults_from']}): " + ", ".join(f"{k}: {_shown(v)}" for k, v in unset.items()))
    lines += [f"- computed in {record['compute_dtype']}" + (f", written as {record['dtype']}" if record["dtype"] else ""), ""]
    lines += ["## Models", ""]
    for entry in record["models"]:
        params = ", ".join(f"{k}: {_shown(v)}" for k, v in entry["parameters"].items())
        lines.append(f"- `{entry['model']}`" + (f" ({params})" if params else ""))
    for title, body in (extra or {}).items():
        lines += ["", f"## {title}", "", body]
    return "\n".join(lines) + "\n"

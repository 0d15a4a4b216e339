"""Running one parsed ``modular merge`` config: task vectors from the folders, then the streamed
merge of the registered method, or AdaMerging (coefficients learned on unlabelled prompts)."""

from __future__ import annotations

import os
from pathlib import Path

from modular.checkpoint import SafetensorsCheckpoint, check_output_dir

from .adamerging_yaml import run_adamerging
from .config import ADAMERGING, MergeConfig
from .engine import merge
from .sources import parse_size
from .task_vector import TaskVector

__all__ = ["run_merge"]


def run_merge(config: MergeConfig, out: str | os.PathLike, *, force: bool = False, progress: bool = True,
              config_text: str | None = None) -> Path:
    """Run ``config`` into the folder ``out``; returns it."""
    tokenizer = None if config.tokenizer_source == "base" else config.tokenizer_source
    if tokenizer is not None and not Path(tokenizer).is_dir():  # found before any work, not after the merge
        raise FileNotFoundError(f"tokenizer_source: {tokenizer!r} is not a folder (give `base` or a tokenizer folder)")
    check_output_dir(out, force=force, inputs=[config.base_model, *(m.model for m in config.models),
                                               *(m.data for m in config.models), tokenizer])
    common = dict(
        out=out, force=force, dtype=config.dtype, tokenizer_source=tokenizer, max_shard_bytes=parse_size(config.out_shard_size),
        card={"Configuration": f"```yaml\n{config_text.strip()}\n```"} if config_text else None, progress=progress,
    )
    if config.merge_method == ADAMERGING:
        return run_adamerging(config, common)
    base = SafetensorsCheckpoint(config.base_model)
    task_vectors = [TaskVector.from_models(base, m.model, label=m.model) for m in config.models]  # checks shapes
    params = config.method_parameters()
    weights = params.pop("weight", 1.0)
    return merge(config.merge_method, base, task_vectors, weights=weights, **common, **params)

"""What the quality benchmarks share: a cache of trained models keyed by their settings, the
held-out split of GCIDE paragraphs, and mean ± sd over seeds.

Cached models are safetensors files named after a hash of every setting that produced them
(``<name>-<hash>.safetensors``, the settings beside them as JSON), so a re-run with the same
settings loads them and a changed setting trains afresh. Files are written to a temporary
name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

__all__ = ["LMBlocks", "cache_path", "cached_model", "gcide_splits", "mean_sd", "run_stages", "settings_hash"]


def settings_hash(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_path(folder: Path, name: str, settings: dict) -> Path:
    return folder / f"{name}-{settings_hash(settings)}.safetensors"


def cached_model(folder: Path, name: str, settings: dict, empty: Callable[[], nn.Module],
                 train: Callable[[nn.Module], None]) -> tuple[nn.Module, bool]:
    """``empty()`` with the weights cached for ``settings``, else trained by ``train(model)`` and
    cached. Returns (model, whether it came from the cache)."""
    path = cache_path(folder, name, settings)
    model = empty()
    if path.is_file():
        load_model(model, path)
        return model, True
    train(model)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_model(model, str(tmp))
    path.with_suffix(".json").write_text(json.dumps(settings, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
    return model, False


def gcide_splits(stride: int = 3) -> dict[str, list[str]]:
    """GCIDE paragraphs of more than 40 characters, dealt out in file order: paragraph i goes to
    ``train`` when i % stride == 0, ``validation`` when 1, ``test`` when 2 (each split spans
    the whole alphabet)."""
    from modular.app.corpora import gcide_paragraphs

    paragraphs = gcide_paragraphs(min_chars=41)
    return {"train": paragraphs[0::stride], "validation": paragraphs[1::stride], "test": paragraphs[2::stride]}


def mean_sd(values: list[float], digits: int = 4) -> dict:
    """{"mean", "sd" (sample standard deviation; 0 for one value), "values"}, rounded; a non-finite
    value (a diverged run) makes mean and sd NaN."""
    if not all(math.isfinite(v) for v in values):
        return {"mean": math.nan, "sd": math.nan, "values": [round(v, digits) for v in values]}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), digits), "sd": round(sd, digits), "values": [round(v, digits) for v in values]}


def run_stages(stages: Sequence[Sequence[tuple[Callable, tuple]]], workers: int) -> None:
    """Run each stage's jobs ``fn(*args)`` on ``workers`` processes (1 = in this process), one
    stage after the other (a stage may read what the previous one cached). Jobs must be
    module-level functions; a failing job raises here."""
    for jobs in stages:
        if workers <= 1 or len(jobs) <= 1:
            for fn, args in jobs:
                fn(*args)
            continue
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(fn, *args) for fn, args in jobs]:
                future.result()


class LMBlocks(torch.utils.data.Dataset):
    """Rows of a (N, length) token tensor as causal-LM examples (labels = inputs)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}

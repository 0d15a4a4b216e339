"""The DeepSpeed JSON configs shipped in ``finetune/configs/`` (package data).

``"auto"`` entries are filled by ``transformers.Trainer(deepspeed=path)`` from its
``TrainingArguments``; a raw ``deepspeed.initialize`` needs numbers, which
:func:`deepspeed_config` fills from keyword arguments.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

__all__ = ["deepspeed_config", "deepspeed_config_names", "deepspeed_config_path"]

_CONFIGS = files("finetune").joinpath("configs")


def deepspeed_config_names() -> list[str]:
    """Names (file stems) of the packaged configs, e.g. ``["onebit_zero0", "zero0", "zero1", "zero2"]``."""
    return sorted(Path(str(p)).stem for p in _CONFIGS.iterdir() if str(p).endswith(".json"))


def deepspeed_config_path(name: str) -> str:
    """Filesystem path of the packaged config ``name`` (``"zero2"`` or ``"zero2.json"``), for the
    ``deepspeed`` launcher's ``--deepspeed_config`` or ``TrainingArguments(deepspeed=...)``."""
    stem = name.removesuffix(".json")
    if stem not in deepspeed_config_names():
        raise KeyError(f"unknown DeepSpeed config {name!r}; packaged: {', '.join(deepspeed_config_names())}")
    return str(_CONFIGS.joinpath(f"{stem}.json"))


def deepspeed_config(name: str, **fill) -> dict:
    """The packaged config ``name`` as a dict, with ``"auto"`` values replaced from ``fill``
    (e.g. ``train_micro_batch_size_per_gpu=2``); an ``"auto"`` left unfilled raises, because a raw
    ``deepspeed.initialize`` cannot resolve it."""
    config = json.loads(Path(deepspeed_config_path(name)).read_text())
    for key, value in fill.items():
        if key not in config:
            raise KeyError(f"{name}: no top-level key {key!r} to fill; keys: {', '.join(config)}")
        config[key] = value
    for key in ("fp16", "bf16"):  # precision "auto" means: what the Trainer uses; raw runs are fp32
        if config.get(key, {}).get("enabled") == "auto":
            config[key] = {"enabled": False}
    left = [k for k, v in config.items() if v == "auto"]
    if left:
        raise ValueError(f"{name}: fill the 'auto' entries {left} for a raw deepspeed.initialize")
    return config

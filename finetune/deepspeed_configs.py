"""The DeepSpeed JSON configs shipped in ``finetune/configs/`` (package data).

``"auto"`` entries are filled by ``transformers.Trainer(deepspeed=path)`` from its
``TrainingArguments``; a raw ``deepspeed.initialize`` needs numbers, which
:func:`deepspeed_config` fills from keyword arguments.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

_CONFIGS = files("finetune").joinpath("configs")
ZERO_STAGES = (0, 1, 2, 3)


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


def validate_deepspeed_config(config: dict, name: str = "config") -> None:
    """Check what the project relies on: a known ZeRO stage, fp32 communication, and a
    ``zero_optimization`` block DeepSpeed's own schema accepts (typos raise)."""
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in ZERO_STAGES:
        raise ValueError(f"{name}: zero_optimization.stage must be one of {ZERO_STAGES}, got {zero!r}")
    if config.get("communication_data_type", "fp32") != "fp32":
        raise ValueError(f"{name}: communication_data_type must be 'fp32' (gloo on CPU), got {config['communication_data_type']!r}")
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError as err:
        raise ImportError("validating DeepSpeed configs needs deepspeed: pip install 'modular-llm[deepspeed]'") from err
    DeepSpeedZeroConfig(**zero)


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


def cpu_deepspeed_state():
    """Set up accelerate's process state for a ``deepspeed``-launched run on CPU (gloo).

    Without CUDA, ``TrainingArguments(deepspeed=...)`` lets accelerate pick no backend, so it
    records ``num_processes=1`` on every rank: each rank then loads *all* batches and DeepSpeed's
    batch-size check fails (read in accelerate's ``state.py``; ``use_cpu=True`` instead drops
    DeepSpeed). Call this first in the training script and pass
    ``accelerator_config={"use_configured_state": True}`` to ``TrainingArguments``: the state
    then has backend gloo, the launcher's world size and ``DistributedType.DEEPSPEED``.
    Returns the ``accelerate.PartialState``.
    """
    import os

    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch --use_deepspeed` sets
    return PartialState(backend="gloo")

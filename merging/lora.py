"""LoRA adapters as dense deltas: ΔW = scaling · B A for each LoRA layer, under the base weight's name.

Reads a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) or a
``PeftModel``. Linear LoRA layers only (embedding/conv LoRA, DoRA and ``modules_to_save``
raise); ``use_rslora``, ``rank_pattern``, ``alpha_pattern`` and ``fan_in_fan_out`` are honoured.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from modular.checkpoint import CheckpointError

__all__ = ["lora_deltas"]


def lora_deltas(adapter, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Dense float32 deltas by base-weight name, from an adapter folder or a ``PeftModel``."""
    if isinstance(adapter, torch.nn.Module):
        return _lora_deltas_from_model(adapter, adapter_name)
    return _lora_deltas_from_folder(Path(adapter))


def _pattern_value(module: str, patterns: Mapping[str, float], default: float) -> float:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _lora_deltas_from_folder(folder: Path) -> dict[str, torch.Tensor]:
    cfg_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{folder}: no {f.name} (expected a PEFT LoRA adapter folder)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters convert to task vectors")
    if cfg.get("use_dora") or cfg.get("modules_to_save"):
        raise ValueError(f"{cfg_file}: DoRA and modules_to_save are not supported as task vectors")
    try:
        tensors = load_file(str(weights_file))
    except Exception as err:
        raise CheckpointError(f"{weights_file}: cannot be read as safetensors ({err})") from None
    deltas = {}
    for key in tensors:
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise ValueError(f"{weights_file}: tensor {key!r} is not a linear LoRA factor (embedding/conv LoRA unsupported)")
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        a, b = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float()
        r = _pattern_value(module, cfg.get("rank_pattern"), cfg["r"])
        alpha = _pattern_value(module, cfg.get("alpha_pattern"), cfg["lora_alpha"])
        scaling = alpha / (r**0.5 if cfg.get("use_rslora") else r)
        delta = (b @ a) * scaling
        deltas[f"{module}.weight"] = delta.T if cfg.get("fan_in_fan_out") else delta
    if not deltas:
        raise ValueError(f"{weights_file}: no LoRA factors found")
    return deltas


def _lora_deltas_from_model(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {}):
            deltas[f"{name.removeprefix('base_model.model.')}.weight"] = module.get_delta_weight(adapter_name).detach().float()
    if not deltas:
        raise ValueError(f"model has no LoRA layers for adapter {adapter_name!r}")
    return deltas

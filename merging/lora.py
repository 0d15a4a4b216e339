"""LoRA adapters as dense deltas: ΔW = scaling · B A for each LoRA layer, under the base weight's name.

Reads a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) or a
``PeftModel``. Linear LoRA layers only (embedding/conv LoRA, DoRA and ``modules_to_save``
raise); ``use_rslora``, ``rank_pattern``, ``alpha_pattern`` and ``fan_in_fan_out`` are honoured.
Dense deltas are computed one weight at a time, when asked for.

:class:`LoraMerged` is mergekit's ``model: BASE+LORA``: the model with the adapter merged in, as
PEFT's ``merge_and_unload`` computes it, read tensor by tensor (no merged copy on disk).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from modular.checkpoint import CheckpointError

__all__ = ["ADAPTER_CONFIG", "LoraAdapter", "LoraMerged", "is_lora_adapter", "lora_deltas"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_lora_adapter(path: str | Path) -> bool:
    """A PEFT adapter folder (has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def lora_deltas(adapter, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Dense float32 deltas by base-weight name, from an adapter folder or a ``PeftModel``."""
    if isinstance(adapter, torch.nn.Module):
        return _lora_deltas_from_model(adapter, adapter_name)
    lora = LoraAdapter(adapter)
    return {name: lora.delta(name) for name in lora.names()}


def _pattern_value(module: str, patterns: Mapping[str, float], default: float) -> float:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter folder; its (small) factors are read once, dense deltas on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        cfg_file, weights_file = self.folder / ADAPTER_CONFIG, self.folder / ADAPTER_WEIGHTS
        for f in (cfg_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"{self.folder}: no {f.name} (expected a PEFT LoRA adapter folder)")
        self.config = json.loads(cfg_file.read_text())
        cfg = self.config
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters convert to task vectors")
        if cfg.get("use_dora") or cfg.get("modules_to_save"):
            raise ValueError(f"{cfg_file}: DoRA and modules_to_save are not supported as task vectors")
        try:
            self.tensors = load_file(str(weights_file))
        except Exception as err:
            raise CheckpointError(f"{weights_file}: cannot be read as safetensors ({err})") from None
        self.factors: dict[str, tuple[str, str, float]] = {}
        for key in self.tensors:
            if ".lora_A." not in key:
                if ".lora_B." not in key:
                    raise ValueError(f"{weights_file}: tensor {key!r} is not a linear LoRA factor (embedding/conv LoRA unsupported)")
                continue
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            r = _pattern_value(module, cfg.get("rank_pattern"), cfg["r"])
            alpha = _pattern_value(module, cfg.get("alpha_pattern"), cfg["lora_alpha"])
            scaling = alpha / (r**0.5 if cfg.get("use_rslora") else r)
            self.factors[f"{module}.weight"] = (key, key.replace(".lora_A.", ".lora_B."), scaling)
        if not self.factors:
            raise ValueError(f"{weights_file}: no LoRA factors found")

    @property
    def base_model(self) -> str | None:
        """The base model the adapter was trained on (``base_model_name_or_path``), if recorded."""
        return self.config.get("base_model_name_or_path")

    def names(self) -> list[str]:
        return list(self.factors)

    def shape(self, name: str) -> torch.Size:
        a_key, b_key, _ = self.factors[name]
        shape = torch.Size((self.tensors[b_key].shape[0], self.tensors[a_key].shape[1]))
        return torch.Size(reversed(shape)) if self.config.get("fan_in_fan_out") else shape

    def delta(self, name: str) -> torch.Tensor:
        """scaling · B A (transposed with ``fan_in_fan_out``) in float32, as PEFT's ``get_delta_weight``."""
        a_key, b_key, scaling = self.factors[name]
        delta = (self.tensors[b_key].float() @ self.tensors[a_key].float()) * scaling
        return delta.T if self.config.get("fan_in_fan_out") else delta


class LoraMerged:
    """``BASE+LORA``: ``model``'s tensors with ``adapter``'s deltas added in each weight's dtype
    (W + ΔW, PEFT's ``merge_and_unload``), read one tensor at a time."""

    def __init__(self, model, adapter: LoraAdapter, label: str):
        self.model, self.adapter, self.label = model, adapter, label
        self.path = getattr(model, "path", None)
        self.folders = (self.path, adapter.folder)  # both are inputs an output must not replace
        missing = [n for n in adapter.names() if n not in model.names() or model.shape(n) != adapter.shape(n)]
        if missing:
            raise ValueError(f"{label}: the adapter's weights {missing[:3]} are missing from {model!r} or have other shapes; "
                             "is it an adapter for this model?")

    def names(self) -> list[str]:
        return self.model.names()

    def __contains__(self, name: str) -> bool:
        return name in self.model.names()

    def shape(self, name: str) -> torch.Size:
        return self.model.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.model.dtype(name)

    def config(self) -> dict | None:
        return self.model.config()

    def get(self, name: str) -> torch.Tensor:
        weight = self.model.get(name)
        return weight + self.adapter.delta(name).to(weight.dtype) if name in self.adapter.factors else weight

    def __repr__(self) -> str:
        return self.label


def _lora_deltas_from_model(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {}):
            deltas[f"{name.removeprefix('base_model.model.')}.weight"] = module.get_delta_weight(adapter_name).detach().float()
    if not deltas:
        raise ValueError(f"model has no LoRA layers for adapter {adapter_name!r}")
    return deltas

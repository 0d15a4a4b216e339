"""``modular.load_model``: the one loader for checkpoints with or without injections.

How it loads an injected checkpoint:

1. read ``config.json``, take the HF ``model_type`` back from the mark, drop the records;
2. let transformers load the base model from the folder (so its own weight-format
   conversions, e.g. fused MoE experts, apply as for any checkpoint);
3. replay each injection record through its registered rebuild function;
4. read from the safetensors files every tensor the injections added (names the base model
   did not have), by name; any that is missing is an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils import logging as hf_logging

from .checkpoint import CheckpointError, SafetensorsCheckpoint
from .injections import InjectionError, rebuild_injection
from .surgery import INJECTIONS_KEY, base_model_type, clear_injection_records

__all__ = ["load_model", "saved_tensor_names"]


def _read_config(path: Path) -> tuple[transformers.PretrainedConfig, list[dict]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a folder written by save_pretrained)")
    try:
        config_dict = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    records = config_dict.pop(INJECTIONS_KEY, None) or []
    model_type = base_model_type(config_dict.get("model_type", ""))
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not known to transformers {transformers.__version__}")
    config_dict["model_type"] = model_type
    return CONFIG_MAPPING[model_type].from_dict(config_dict), records


def _model_class(config: transformers.PretrainedConfig, path: Path) -> type:
    names = getattr(config, "architectures", None) or []
    if not names:
        raise CheckpointError(f"{path}/config.json has no `architectures` entry; cannot tell which model class to build")
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise CheckpointError(f"{path}/config.json names architecture {names[0]!r}, which transformers does not provide")
    return cls


def load_model(path: str | os.PathLike, *, model_class: type | None = None, dtype: str | torch.dtype = "auto",
               **from_pretrained_kwargs) -> torch.nn.Module:
    """Load a ``save_pretrained`` folder, re-applying every modular-llm injection recorded in it.

    Works for plain HF checkpoints too. ``model_class``: the transformers class to build (an
    ``Auto*`` class too), e.g. ``AutoModelForSequenceClassification`` to put a fresh head on a
    saved backbone, injections included; default: the folder's own ``architectures`` entry.
    Keyword arguments naming config attributes (``num_labels=3``) update the config, as in
    ``from_pretrained``; the others, with ``dtype``, go to ``from_pretrained``. Local folders only.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"load_model: {str(path)!r} is not a folder (expected a save_pretrained output)")
    config, records = _read_config(path)
    for key in [k for k in from_pretrained_kwargs if hasattr(config, k)]:
        setattr(config, key, from_pretrained_kwargs.pop(key))
    checkpoint = SafetensorsCheckpoint(path)
    model_class = model_class or _model_class(config, path)

    # The injected tensors are unknown to the base model: transformers would report them as
    # unexpected (and injected-away modules as missing) although step 4 loads them.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = model_class.from_pretrained(path, config=config, dtype=dtype, **from_pretrained_kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not records:
        return model

    base_names = set(model.state_dict())
    clear_injection_records(model)
    for record in records:
        rebuild_injection(model, record)
    rebuilt = [r["kind"] for r in getattr(model.config, INJECTIONS_KEY, [])]
    if rebuilt != [r["kind"] for r in records]:
        raise InjectionError(f"{path}: rebuilding injections {[r['kind'] for r in records]} recorded {rebuilt} instead")
    _load_injected_tensors(model, checkpoint, base_names)
    model.eval()
    return model


def saved_tensor_names(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, list[str]]:
    """Name in ``model.state_dict()`` -> the names ``save_pretrained`` writes it under.

    ``save_pretrained`` reverts transformers' weight conversions (Mixtral's ``mlp.experts.gate_up_proj``
    is saved as ``block_sparse_moe.experts.<e>.w1`` and ``.w3``), so a module tensor may live under
    several names on disk. Found by reverting a probe: each tensor replaced by a zero-copy
    constant view holding its index, so the reversal's outputs tell where each came from.
    ``tensors``: the state to map (default: the whole state dict).
    """
    tensors = model.state_dict() if tensors is None else tensors
    names = list(tensors)
    probe = {n: torch.tensor(i, dtype=torch.int32).expand(t.shape) for i, (n, t) in enumerate(tensors.items())}
    saved: dict[str, list[str]] = {n: [] for n in names}
    for saved_name, value in revert_weight_conversion(model, probe).items():
        if value.numel():
            saved[names[int(value.reshape(-1)[0])]].append(saved_name)
    return saved


def _saved_names(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Model name -> the one name in the saved files for each injected tensor (renames only)."""
    names = {}
    for name, on_disk in saved_tensor_names(model, tensors).items():
        if len(on_disk) != 1:
            raise InjectionError(
                f"injected tensor {name!r} falls under a transformers weight conversion that is not a rename "
                "(e.g. fused MoE experts); injections must leave such weights under their original names"
            )
        names[name] = on_disk[0]
    return names


def _in_checkpoint(name: str, checkpoint: SafetensorsCheckpoint, prefix: str) -> str:
    """``name`` as the checkpoint holds it: a model with a head (``bert.encoder...``) read from a
    saved backbone (``encoder...``) finds its tensors without the base-model prefix."""
    if name not in checkpoint and prefix and name.startswith(prefix) and name[len(prefix):] in checkpoint:
        return name[len(prefix):]
    return name


def _load_injected_tensors(model: torch.nn.Module, checkpoint: SafetensorsCheckpoint, base_names: set[str]) -> None:
    state = model.state_dict()
    added = {name: tensor for name, tensor in state.items() if name not in base_names}
    prefix = f"{model.base_model_prefix}." if model.base_model is not model else ""
    on_disk = {name: _in_checkpoint(saved, checkpoint, prefix) for name, saved in _saved_names(model, added).items()}
    missing = [name for name in added if on_disk[name] not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{checkpoint.path}: the injected model needs {len(missing)} tensors the checkpoint lacks, "
            f"e.g. {[on_disk[n] for n in missing[:3]]}"
        )
    model_name = {saved: name for name, saved in on_disk.items()}
    with torch.no_grad():
        for saved, tensor in checkpoint.get_many(on_disk.values()):
            target = state[model_name[saved]]
            if target.shape != tensor.shape:
                raise CheckpointError(
                    f"{checkpoint.path}: tensor {saved!r} has shape {tuple(tensor.shape)}, "
                    f"the injected model expects {tuple(target.shape)}"
                )
            target.copy_(tensor)

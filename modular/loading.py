"""``modular.load_model``: the one loader for checkpoints with or without injections.

How it loads an injected checkpoint:

1. read ``config.json``, take the HF ``model_type`` back from the mark, drop the records;
2. let transformers load the base model from the folder (so its own weight-format
   conversions, e.g. fused MoE experts, apply as for any checkpoint);
3. replay each injection record through its registered rebuild function;
4. read from the safetensors files every tensor the injections added (names the base model
   did not have), by name;
5. account for every tensor: one the model needs but the files lack, or one the files hold but
   no part of the model reads (e.g. injected tensors of a folder whose record was removed), is
   an error naming them (``strict=False`` turns it into a warning).

:func:`load_checkpoint_into` reads such a folder into an existing model of the same structure
(the recipe runner resumes training with it).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils import logging as hf_logging

from .checkpoint import CheckpointError, SafetensorsCheckpoint
from .injections import InjectionError, rebuild_injection
from .surgery import INJECTIONS_KEY, base_model_type, clear_injection_records, injection_records

__all__ = ["load_checkpoint_into", "load_model", "read_config", "saved_tensor_names"]


def read_config(path: str | os.PathLike) -> tuple[transformers.PretrainedConfig, list[dict]]:
    """A checkpoint folder's HF config (injection mark removed) and its injection records; no weights."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a folder written by save_pretrained)")
    try:
        config_dict = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    records = config_dict.pop(INJECTIONS_KEY, None)
    if records is None:
        records = []
    if not isinstance(records, list):
        raise CheckpointError(
            f"{config_file}: {INJECTIONS_KEY} must be a list of injection records, got {type(records).__name__} {records!r}"
        )
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
               strict: bool = True, **from_pretrained_kwargs) -> torch.nn.Module:
    """Load a ``save_pretrained`` folder, re-applying every modular-llm injection recorded in it.

    Works for plain HF checkpoints too. ``model_class``: the transformers class to build (an
    ``Auto*`` class too), e.g. ``AutoModelForSequenceClassification`` to put a fresh head on a
    saved backbone, injections included; default: the folder's own ``architectures`` entry.
    Keyword arguments naming config attributes (``num_labels=3``) update the config, as in
    ``from_pretrained``; the others, with ``dtype``, go to ``from_pretrained``. Local folders only.
    ``strict``: a tensor the model needs and the folder lacks, or one the folder holds and the
    model does not read, is an error (``False``: a warning, and the model keeps its initial
    values there); with another ``model_class``, tensors outside the base model (heads) are
    exempt, as they are new or dropped on purpose.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"load_model: {str(path)!r} is not a folder (expected a save_pretrained output)")
    config, records = read_config(path)
    for key in [k for k in from_pretrained_kwargs if hasattr(config, k)]:
        setattr(config, key, from_pretrained_kwargs.pop(key))
    checkpoint = SafetensorsCheckpoint(path)
    own_class = _model_class(config, path) if model_class is None or not _is_auto(model_class) else None
    new_head = model_class is not None and model_class is not own_class
    model_class = model_class or own_class

    # The injected tensors are unknown to the base model: transformers would report them as
    # unexpected (and injected-away modules as missing); step 5 accounts for them instead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True,
                                                  **from_pretrained_kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    injected: set[str] = set()
    if records:
        base_names = set(model.state_dict())
        clear_injection_records(model)
        for record in records:
            rebuild_injection(model, record)
        rebuilt = [r["kind"] for r in getattr(model.config, INJECTIONS_KEY, [])]
        if rebuilt != [r["kind"] for r in records]:
            raise InjectionError(f"{path}: rebuilding injections {[r['kind'] for r in records]} recorded {rebuilt} instead")
        injected = _load_injected_tensors(model, checkpoint, base_names)
    _account_for_tensors(model, info, injected, path, strict, head_exempt=new_head)
    model.eval()
    return model


def _is_auto(cls: type) -> bool:
    return cls.__name__.startswith("Auto")


def _account_for_tensors(model: torch.nn.Module, info: dict, injected: set[str], path: Path, strict: bool,
                         head_exempt: bool = False) -> None:
    """Raise (or warn) when transformers left a tensor of the final model unloaded, or a tensor of
    the folder unread, that the injections did not account for (``head_exempt``: tensors outside
    the base model are a head put on, or left off, on purpose)."""
    state = set(model.state_dict())
    prefix = f"{model.base_model_prefix}." if model.base_model is not model else ""
    exempt = (lambda n: bool(prefix) and not n.startswith(prefix)) if head_exempt else (lambda n: False)
    missing = sorted(n for n in info["missing_keys"] if n in state and n not in injected and not exempt(n))
    unused = sorted(n for n in info["unexpected_keys"] if n not in injected and not exempt(n))
    mismatched = sorted(str(m[0] if isinstance(m, tuple) else m) for m in info.get("mismatched_keys", ()))
    problems = [
        f"{len(names)} {what}: {_first(names)}"
        for names, what in (
            (missing, "tensors the model needs are not in the folder (they would keep their initial values)"),
            (unused, "tensors in the folder are read by no part of the model (an injection record removed from "
                     "config.json, or a different architecture)"),
            (mismatched, "tensors have another shape in the folder"),
        )
        if names
    ]
    if not problems:
        return
    message = f"{path}: " + "; ".join(problems)
    if strict:
        raise CheckpointError(message + "; pass strict=False to load anyway")
    warnings.warn(message, stacklevel=3)


def _first(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def load_checkpoint_into(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy the weights of a ``save_pretrained`` folder into ``model``, read as :func:`load_model`
    reads them (injections rebuilt, transformers' weight conversions applied).

    ``model`` must have the folder's structure (same family, same injections in the same
    order); every tensor must be accounted for. The folder is loaded whole first, so this needs
    the memory of a second copy of the model for a moment.
    """
    saved = load_model(path, dtype=next(model.parameters()).dtype)
    ours, theirs = [r["kind"] for r in injection_records(model)], [r["kind"] for r in injection_records(saved)]
    if ours != theirs:
        raise CheckpointError(f"{path}: the folder records injections {theirs}, the model to load into has {ours}")
    missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the folder does not fit the model: missing {_first(sorted(missing))}; unexpected {_first(sorted(unexpected))}"
        )


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


def _load_injected_tensors(model: torch.nn.Module, checkpoint: SafetensorsCheckpoint, base_names: set[str]) -> set[str]:
    """Read the tensors the injections added (by name); returns their names in the model."""
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
    return set(added)

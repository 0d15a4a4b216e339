"""AdaMerging on loaded models: task vectors in the model's own parameter names, the merged model
written with ``save_pretrained``.

Why not the streamed merge: transformers 5 converts some checkpoints on load (e.g. Mixtral's
per-expert ``w1``/``w3`` tensors become one fused ``gate_up_proj``), so a checkpoint's tensor
names are not always the module's parameter names. AdaMerging differentiates through the module,
so its coefficients are per *parameter*; applying them to the module and letting
``save_pretrained`` write it back keeps every family's checkpoint format right.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .adamerging import AdaMergingConfig, AdaMergingResult, EntropyTask, adamerge
from .task_vector import TaskVector

__all__ = ["adamerge_folders", "apply_coefficients", "save_merged_model"]


def adamerge_folders(
    base: str | os.PathLike, finetuned: Mapping[str, str | os.PathLike], tasks: Sequence[EntropyTask],
    config: AdaMergingConfig, *, progress: bool = True,
) -> tuple[torch.nn.Module, AdaMergingResult]:
    """Learn coefficients for ``finetuned`` (label -> folder) over ``base``; returns the base
    model with the merge applied and the result. Holds the base and one fine-tuned model at a
    time, plus the K task vectors."""
    from modular import load_model

    model = load_model(base, dtype=torch.float32)
    task_vectors = [_task_vector(model, load_model(path, dtype=torch.float32), label) for label, path in finetuned.items()]
    result = adamerge(model, task_vectors, tasks, config, progress=progress)
    return apply_coefficients(model, result), result


def _task_vector(base: torch.nn.Module, finetuned: torch.nn.Module, label: str) -> TaskVector:
    """Eager deltas over parameters only. Not ``TaskVector.from_models``: its deltas are computed
    lazily from the live base, which ``apply_coefficients`` then changes, and it also covers buffers."""
    base_params = dict(base.named_parameters())
    deltas = {}
    for name, param in finetuned.named_parameters():
        if name not in base_params or base_params[name].shape != param.shape:
            raise ValueError(f"{label}: parameter {name!r} {tuple(param.shape)} has no match of that shape in the base model")
        deltas[name] = param.detach().float() - base_params[name].detach().float()
    return TaskVector.from_tensors(deltas, label=label)


@torch.no_grad()
def apply_coefficients(model: torch.nn.Module, result: AdaMergingResult) -> torch.nn.Module:
    """θ ← θ_0 + Σ_k λ_k τ_k in place, with the learned (row-wise) coefficients."""
    params = dict(model.named_parameters())
    for name in {n for tv in result.task_vectors for n in tv.names()}:
        weights = result.weights_for(name)
        delta = sum(w * tv.get(name) for w, tv in zip(weights, result.task_vectors) if name in tv)
        params[name].add_(delta.to(params[name].dtype))
    return model


def save_merged_model(
    model: torch.nn.Module, result: AdaMergingResult, out: str | os.PathLike, *, tokenizer_source: str | os.PathLike,
    force: bool = False, card: dict | None = None,
) -> Path:
    """The merged model, tokenizer, coefficients (JSON + heatmap PNG) and model card, written atomically."""
    from modular.checkpoint import atomic_output_dir

    from .merge import copy_tokenizer, write_model_card

    with atomic_output_dir(out, force=force) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(Path(tokenizer_source), tmp)
        result.save_json(tmp / "adamerging_coefficients.json")
        result.plot(tmp / "adamerging_coefficients.png")
        write_model_card(tmp, method="adamerging", params={"granularity": result.config.granularity, "steps": len(result.entropy)},
                         task_vectors=result.task_names, extra={"AdaMerging coefficients": result.markdown_table(), **(card or {})})
    return Path(out)

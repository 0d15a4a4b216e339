"""The model ``modular train`` fine-tunes: built or loaded (a fresh classification head when the
recipe asks), the recipe's injections applied through the registry, the head fitted first."""

from __future__ import annotations

import torch

from .recipe import Recipe

__all__ = ["build_model", "fit_head", "inject"]


def build_model(recipe: Recipe) -> torch.nn.Module:
    """The recipe's model; for ``sequence_classification``, the family's classification class with
    a fresh head (a saved backbone keeps its injections, rebuilt by ``load_model``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from modular import load_model

    classify = recipe.model.task == "sequence_classification"
    auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    head = {"num_labels": recipe.model.num_labels} if classify else {}
    dtype = getattr(torch, recipe.model.dtype)
    if recipe.model.path is not None:
        return load_model(recipe.model.path, dtype=dtype, **({"model_class": auto, **head} if classify else {}))
    config = dict(recipe.model.config)
    return auto.from_config(AutoConfig.for_model(config.pop("model_type"), **config, **head), dtype=dtype)


def inject(model: torch.nn.Module, recipe: Recipe, calibration: list[dict]) -> torch.nn.Module:
    """Apply the recipe's injections in order, each through its registry entry."""
    from modular.injections import get_injection

    for item in recipe.injections:
        kind = get_injection(item["kind"])
        model = kind.apply(model, kind.config(item["params"]), calibration if kind.needs_calibration else None)
    # A recipe fine-tunes the injected model: every parameter goes to the optimizer (LISA then picks
    # the layers that train). Some kinds leave their modules frozen (acmize: conversion is done).
    return model.requires_grad_(True)


def fit_head(model: torch.nn.Module, recipe: Recipe, data: dict, collator) -> dict | None:
    """``head_init: probe``: the classification head fitted on the frozen model (the ranks share
    the forwards; every rank fits the same head: same features, deterministic solver). Returns
    what was chosen."""
    if recipe.model.task != "sequence_classification" or recipe.model.head_init != "probe":
        return None
    from torch.utils.data import DataLoader

    from finetune.heads import fit_linear_probe

    def batches(split):
        return None if split not in data else DataLoader(data[split], batch_size=64, collate_fn=collator)

    probe = fit_linear_probe(model, batches("train"), batches("eval"), split_over_ranks=True)
    print(f"modular train: head fitted on the frozen model (L2 {probe['l2']:g}, train accuracy {probe['train_accuracy']:.3f})",
          flush=True)
    return probe

"""``acmize``: turn a pretrained model's dense FFNs into ACMs (see ``docs/methods.md``, "ACM"), the
``acm`` injection kind (rebuilt on load) and the run-time knobs.

Conversion, one target FFN after another (bounded memory: one module's cache at a time), phases 1
and 2 in :mod:`modular.acm.calibration`; every module is cached from the *original* model
(modules are independent, as in the paper): the ACMs are swapped in only after all of them are
trained. Phase 3 (optional, end to end) is in :mod:`modular.acm.training`.

The dense weights are dropped after conversion (the learners hold the same number of
parameters); there is no ``unwrap``: keep the original checkpoint to go back.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import asdict, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from ..injections import InjectionKind, register_injection
from ..surgery import record_injection, update_injection_records
from .calibration import calibration_batches, convert_site
from .config import ACMConfig
from .layer import ACMLayer
from .sites import ffn_sites, new_layer, replace_ffn

__all__ = ["ACM_KIND", "acm_modules", "acmize", "rebuild", "set_threshold"]

ACM_KIND = "acm"


def acmize(model: nn.Module, config: ACMConfig, calibration_data: Iterable, *, progress: bool = True) -> nn.Module:
    """Convert ``model``'s dense FFNs (those ``config.target_pattern`` selects) into ACMs, in place.

    Args:
        model: a HF model whose family is in the architecture registry.
        config: the conversion's knobs (:class:`ACMConfig`).
        calibration_data: a re-iterable of batches, each a dict of model inputs (``input_ids``
            and optionally ``attention_mask``, whose zeros are left out of the caches) or an
            ``input_ids`` tensor. Iterated once per target module.
    Returns:
        ``model`` (eval mode), with ``model.acm_conversion_log``: per module, the tokens used,
        the last distillation / gate losses, the mean relative error of each prefix
        (||y_j - y||^2 / ||y||^2 for j = 0..N) and the histogram of gate labels.
    """
    batches = calibration_batches(calibration_data)
    _check_token_ids(model, batches)
    sites = ffn_sites(model, config)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(config.seed)
    torch.manual_seed(config.seed)
    was_training = model.training
    model.eval()
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    converted, logs = [], []
    try:
        for site in tqdm(sites, desc="acmize", disable=not progress):
            layer, log = convert_site(model, site, batches, config, generator)
            converted.append(layer)
            logs.append(log)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
        model.train(was_training)
    targets = [t for site, layer in zip(sites, converted) for t in replace_ffn(model, site, layer)]
    record_injection(model, ACM_KIND, asdict(config), targets)
    model.acm_conversion_log = logs
    return model.eval()


def _check_token_ids(model: nn.Module, batches: list[dict]) -> None:
    """Calibration token ids must index the model's embedding table (else a raw IndexError deep inside)."""
    vocab = model.get_input_embeddings().num_embeddings
    for i, batch in enumerate(batches):
        ids = batch["input_ids"]
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"acmize: calibration batch {i} has token ids in [{ids.min().item()}, {ids.max().item()}], "
                             f"outside the model's vocabulary [0, {vocab - 1}] (a tokenizer of another model?)")


def rebuild(model: nn.Module, config_dict: dict) -> None:
    """Recreate the ACM structure on a freshly loaded base model (``modular.load_model`` fills the weights)."""
    known = {f.name for f in fields(ACMConfig)}
    unknown = sorted(set(config_dict) - known)
    if unknown:
        warnings.warn(f"ACM record has keys this modular-llm does not know, ignored: {unknown}", stacklevel=2)
    config = ACMConfig(**{k: v for k, v in config_dict.items() if k in known})
    sites = ffn_sites(model, config)
    targets = [t for site in sites for t in replace_ffn(model, site, new_layer(site, config).eval())]
    record_injection(model, ACM_KIND, asdict(config), targets)


INJECTION = register_injection(InjectionKind(ACM_KIND, ACMConfig, acmize, rebuild, needs_calibration=True))


# --------------------------------------------------------------------------- run time


def acm_modules(model: nn.Module) -> list[tuple[str, ACMLayer]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ACMLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no ACM modules; convert it with modular.acmize first")
    return layers


def set_threshold(model: nn.Module, threshold: float | None) -> None:
    """The global quality/compute knob: ``None`` = gate argmax, else a cumulative-probability
    threshold in (0, 1] (higher = more learners per token). No retraining needed."""
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"set_threshold: threshold must be None (argmax) or in (0, 1], got {threshold!r}")
    for _, layer in acm_modules(model):
        layer.threshold = threshold
    update_injection_records(model, ACM_KIND, threshold=threshold)  # saved with the model, rebuilt on load

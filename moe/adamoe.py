"""``inject_adamoe``: put AdaMoE routers into the MoE blocks of an HF model."""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from modular.injections import InjectionKind, register_injection
from modular.registry import architecture_of
from modular.surgery import find_modules, record_injection, replace_module

from . import experts as _experts  # noqa: F401  (registers the "modular"/"megablocks" experts implementations)
from .config import AdaMoEConfig
from .ffn_experts import set_experts_implementation
from .router import is_adamoe_router, make_adamoe_router

__all__ = ["inject_adamoe", "adamoe_routers"]

KIND = "adamoe"


def _target_routers(model: nn.Module, config: AdaMoEConfig) -> list[tuple[str, nn.Module]]:
    arch = architecture_of(model)  # unknown families raise UnknownArchitectureError here
    if not arch.moe_blocks():
        raise ValueError(
            f"inject_adamoe: this {arch.model_type} model has no MoE blocks; make them first with "
            f"moe.upcycle_to_moe(model, num_experts=..., top_k=...) or moe.inject_ffn_experts(model, ...)"
        )
    routers = find_modules(model, role="router")
    if config.layers is None:
        return routers
    by_layer = {i: [(n, r) for n, r in routers if n.startswith(f"{layer}.")] for i, layer in enumerate(arch.layer_names)}
    moe_layers = [i for i, found in by_layer.items() if found]
    bad = [i for i in config.layers if i not in moe_layers]
    if bad:
        raise ValueError(f"AdaMoEConfig.layers: {bad} are not MoE layers of this model (MoE layers: {moe_layers})")
    return [pair for i in config.layers for pair in by_layer[i]]


def _check_top_k(name: str, router: nn.Module, config: AdaMoEConfig) -> None:
    """k' must lie in [k, n + m]: AdaMoE adds null picks, it never takes true experts away."""
    n, k, top_k = router.num_experts, router.top_k, config.top_k_for(router.top_k)
    key = f"top_k={config.top_k}" if config.top_k is not None else f"k + extra_top_k = {top_k}"
    if top_k < k:
        raise ValueError(
            f"AdaMoEConfig.{key} is below the model's own top-k {k} at {name}: AdaMoE adds null experts and never "
            f"runs fewer than k picks; use top_k >= {k}, or leave top_k=None (k' = k + extra_top_k)"
        )
    if top_k > n + config.num_null_experts:
        raise ValueError(
            f"AdaMoEConfig.{key} is larger than the {n} true + {config.num_null_experts} null experts of {name}"
        )


def inject_adamoe(model: nn.Module, config: AdaMoEConfig | dict | None = None) -> list[str]:
    """Replace the router of each targeted MoE block by an AdaMoE router (``moe.router``).

    Expert weights are untouched; the model is switched to ``config.experts_implementation``
    (HF's default ``grouped_mm`` would compute garbage for null picks). Returns the router
    names. The injection is recorded in ``model.config`` so ``modular.load_model`` rebuilds it.
    The load-balancing loss is added in training by ``finetune.MoEAuxLossCallback``.

    HF's own aux loss (``output_router_logits=True`` on the ``ForCausalLM``) assumes n logits
    and k picks per token, so it is refused here; the base model (``model.model``) still
    records the n + m router logits with ``output_router_logits=True``.
    """
    config = AdaMoEConfig(**config) if isinstance(config, dict) else (config or AdaMoEConfig())
    targets = _target_routers(model, config)
    if any(is_adamoe_router(r) for _, r in targets):
        raise ValueError("inject_adamoe: this model already has AdaMoE routers")
    if getattr(model.config, "output_router_logits", False):
        raise ValueError(
            "inject_adamoe: config.output_router_logits=True makes transformers add its Switch loss over n experts, "
            "which does not fit AdaMoE's n + m logits; set it to False and train with finetune.MoEAuxLossCallback"
        )
    for name, router in targets:
        _check_top_k(name, router, config)
    for name, router in targets:
        n = router.num_experts
        top_k = config.top_k_for(router.top_k)
        new = make_adamoe_router(
            router,
            num_null=config.num_null_experts,
            top_k=top_k,
            anchor_rank=router.top_k if config.null_logit_init == "anchored" else None,
            renormalize=getattr(router, "norm_topk_prob", True),  # Mixtral has no flag: it always renormalises
            aux_loss_coef=config.aux_loss_coef,
            weighting=config.weighting,
        )
        if config.null_logit_init == "repeat_gate":  # official code: null row j copies gate row j mod n
            with torch.no_grad():
                rows = torch.arange(config.num_null_experts, device=router.weight.device) % n
                new.null_weight.copy_(router.weight[rows])
        replace_module(model, name, new)
    set_experts_implementation(model, config.experts_implementation)
    targets = [name for name, _ in targets]
    record_injection(model, KIND, asdict(config), targets)
    return targets


def adamoe_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, router) of every AdaMoE router in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if is_adamoe_router(m)]


def rebuild(model: nn.Module, config: dict) -> None:
    """``modular.load_model`` hook: re-inject on the freshly loaded base model (the loader then
    reads the null-logit parameters; the gate weight was loaded under its HF name)."""
    inject_adamoe(model, AdaMoEConfig(**config))


def _apply(model: nn.Module, config: AdaMoEConfig, calibration_data: list | None) -> nn.Module:
    inject_adamoe(model, config)
    return model


INJECTION = register_injection(InjectionKind(KIND, AdaMoEConfig, _apply, rebuild))

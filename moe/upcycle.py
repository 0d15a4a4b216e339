"""Sparse upcycling: a dense llama / mistral / qwen2 / qwen3 model becomes the matching HF MoE
model (``arch.spec.moe_model_type``), every expert a copy of the layer's MLP."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from modular.injections import InjectionKind, register_injection
from modular.registry import architecture_of

from .config import UpcycleConfig

__all__ = ["upcycle_to_moe"]

# MoE-only settings each family's config needs from us; everything else is copied from the
# dense config (hidden size, heads, norms, rope, vocabulary, tying, ...).
_EXPERT_COUNT_KEY = {"mixtral": "num_local_experts"}
_EXPERT_WIDTH_KEY = {"mixtral": "intermediate_size"}


def _moe_config(dense_config, moe_type: str, num_experts: int, top_k: int):
    moe_cls = CONFIG_MAPPING[moe_type]
    values = {k: v for k, v in dense_config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    if values.get("attention_bias") and moe_type == "mixtral":
        raise ValueError("upcycle_to_moe: mixtral attention has no bias, but this dense model's attention_bias=True")
    values.pop("mlp_bias", None)
    values[_EXPERT_COUNT_KEY.get(moe_type, "num_experts")] = num_experts
    values[_EXPERT_WIDTH_KEY.get(moe_type, "moe_intermediate_size")] = dense_config.intermediate_size
    values.update(
        num_experts_per_tok=top_k,
        norm_topk_prob=True,  # identical experts then sum to the dense MLP exactly
        output_router_logits=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        shared_expert_intermediate_size=dense_config.intermediate_size,  # qwen2_moe only
    )
    if moe_type == "qwen2_moe":
        values["qkv_bias"] = True  # qwen2's q/k/v projections carry a bias
    return moe_cls(**values)


def _fill_experts(moe_block: nn.Module, mlp: nn.Module, arch, noise_std: float, generator: torch.Generator) -> None:
    experts = getattr(moe_block, arch.spec.experts.split(".")[-1])
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
    down = mlp.down_proj.weight
    shared = getattr(moe_block, arch.spec.shared_expert, None) if arch.spec.shared_expert else None
    if shared is not None:
        # qwen2_moe adds sigmoid(shared_gate·x) · shared(x) to the routed sum. Shared gate 0
        # (sigmoid = 1/2), shared expert = MLP and routed experts' down projection halved give
        # MLP/2 + MLP/2: the block equals the dense MLP exactly.
        shared.load_state_dict(mlp.state_dict())
        moe_block.shared_expert_gate.weight.zero_()
        down = down / 2
    for e in range(experts.num_experts):
        experts.gate_up_proj[e].copy_(gate_up + noise_std * torch.randn(gate_up.shape, generator=generator).to(gate_up))
        experts.down_proj[e].copy_(down + noise_std * torch.randn(down.shape, generator=generator).to(down))


@torch.no_grad()
def upcycle_to_moe(model: nn.Module, config: UpcycleConfig | None = None, /, **settings) -> nn.Module:
    """A new MoE ``ForCausalLM`` whose experts are copies of ``model``'s MLPs.

    Args:
        model: a dense HF causal LM whose family has ``moe_model_type`` in the registry.
        config: an :class:`~moe.UpcycleConfig`, or its fields as keyword arguments
            (``upcycle_to_moe(model, num_experts=8, top_k=2)``).

    Everything but the MLPs is copied tensor by tensor; a parameter of either model that is
    not accounted for is an error.
    """
    config = config or UpcycleConfig(**settings)
    arch = architecture_of(model)
    moe_type = arch.spec.moe_model_type
    if moe_type is None:
        raise ValueError(
            f"upcycle_to_moe: the registry has no MoE family for {arch.model_type!r} "
            f"(set ArchitectureSpec.moe_model_type); MoE models need no upcycling"
        )
    moe_config = _moe_config(model.config, moe_type, config.num_experts, config.top_k)
    generator = torch.Generator().manual_seed(config.seed)
    moe_model = AutoModelForCausalLM.from_config(moe_config).to(model.device, model.dtype)
    moe_arch = architecture_of(moe_model)

    mlp_names = {name for name, _ in arch.mlps()}
    dense_state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(f"{m}.") for m in mlp_names)}
    moe_names = {name for name, _ in moe_arch.moe_blocks()}
    moe_state = {k for k in moe_model.state_dict() if not any(k.startswith(f"{m}.") for m in moe_names)}
    if set(dense_state) != moe_state:
        raise ValueError(
            f"upcycle_to_moe: {arch.model_type} -> {moe_type} parameters do not match outside the MLPs: "
            f"dense only {sorted(set(dense_state) - moe_state)[:4]}, MoE only {sorted(moe_state - set(dense_state))[:4]}"
        )
    moe_model.load_state_dict(dense_state, strict=False)
    std = moe_config.initializer_range if config.router_init_std is None else config.router_init_std
    for (_, block), (_, mlp), (_, router) in zip(moe_arch.moe_blocks(), arch.mlps(), moe_arch.routers()):
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator).to(router.weight) * std)
        _fill_experts(block, mlp, moe_arch, config.noise_std, generator)
    moe_model.train(model.training)
    return moe_model


def _apply(model: nn.Module, config: UpcycleConfig, calibration_data: list | None) -> nn.Module:
    return upcycle_to_moe(model, config)


# The result is a plain transformers MoE model: nothing to record or rebuild on load.
INJECTION = register_injection(InjectionKind("upcycle", UpcycleConfig, _apply))

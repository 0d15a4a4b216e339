"""moe part of modular-llm: AdaMoE null-expert routing in HF MoE models, sparse upcycling,
experts blocks in any family's dense FFNs, fast experts implementations, routing statistics
(``docs/methods.md``, "AdaMoE")."""

from .adamoe import adamoe_routers, inject_adamoe
from .config import AdaMoEConfig, UpcycleConfig
from .experts import megablocks_experts_forward, modular_experts_forward
from .ffn_experts import FFNExpertsConfig, ffn_experts_blocks, inject_ffn_experts
from .loss import adamoe_aux_loss, load_balancing_loss
from .stats import mean_experts_per_token, plot_routing_stats, routing_stats
from .upcycle import upcycle_to_moe

__all__: list[str] = [
    "AdaMoEConfig",
    "FFNExpertsConfig",
    "UpcycleConfig",
    "adamoe_aux_loss",
    "adamoe_routers",
    "ffn_experts_blocks",
    "inject_ffn_experts",
    "inject_adamoe",
    "load_balancing_loss",
    "mean_experts_per_token",
    "megablocks_experts_forward",
    "modular_experts_forward",
    "plot_routing_stats",
    "routing_stats",
    "upcycle_to_moe",
]

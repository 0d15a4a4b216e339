"""Routing statistics of AdaMoE routers after a forward pass, and their plot."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .adamoe import adamoe_routers

__all__ = ["mean_experts_per_token", "plot_routing_stats", "routing_stats"]


def routing_stats(model: nn.Module) -> list[dict]:
    """Per AdaMoE router, from its last forward: ``experts_per_token`` (mean true experts per
    token), ``null_share`` (fraction of the T·k' routed slots that went to null experts) and
    ``expert_load`` (fraction of slots per true expert, n values). Tokens are all positions of
    the last batch, padding included.

    A plain HF MoE model records nothing: inject with ``AdaMoEConfig(num_null_experts=0,
    extra_top_k=0)`` (a no-op on its outputs) to measure it.
    """
    routers = adamoe_routers(model)
    if not routers:
        raise ValueError("routing_stats: the model has no AdaMoE routers (inject_adamoe first; 0 null experts is a no-op)")
    stats = []
    for name, router in routers:
        if router.last_selected is None:
            raise ValueError(f"routing_stats: router {name} has not run yet; call the model on a batch first")
        selected = router.last_selected
        n = router.num_experts
        is_true = selected < n
        load = torch.bincount(selected[is_true], minlength=n).float() / selected.numel()
        stats.append(
            {
                "router": name,
                "experts_per_token": is_true.sum(-1).float().mean().item(),
                "null_share": 1.0 - is_true.float().mean().item(),
                "expert_load": load.tolist(),
            }
        )
    return stats


def mean_experts_per_token(stats: list[dict]) -> float:
    """Mean over layers of the true experts per token."""
    return sum(s["experts_per_token"] for s in stats) / len(stats)


def plot_routing_stats(stats: list[dict], path: str | Path) -> Path:
    """PNG: true experts per token per layer (bars) and the per-expert load heat map."""
    from modular.plotting import pyplot

    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    layers = range(len(stats))
    ax1.bar(layers, [s["experts_per_token"] for s in stats], color="tab:blue")
    ax1.set(xlabel="layer", ylabel="true experts per token", title="AdaMoE: experts per token")
    image = ax2.imshow([s["expert_load"] for s in stats], aspect="auto", cmap="viridis")
    ax2.set(xlabel="true expert", ylabel="layer", title="share of routed slots per expert")
    fig.colorbar(image, ax=ax2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

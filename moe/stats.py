"""Routing statistics of AdaMoE routers after a forward pass, their plot, and ``modular moe-stats``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from .adamoe import adamoe_routers

__all__ = ["add_parser", "mean_experts_per_token", "plot_routing_stats", "routing_stats"]


def routing_stats(model: nn.Module) -> list[dict]:
    """Per AdaMoE router, from its last forward: ``experts_per_token`` (mean true experts per
    token), ``null_share`` (fraction of the T·k' routed slots that went to null experts) and
    ``expert_load`` (fraction of slots per true expert, n values). Tokens are all positions of
    the last batch, padding included.

    A plain HF MoE model records nothing: inject with ``AdaMoEConfig(num_null_experts=0,
    top_k=None)`` (a no-op on its outputs) to measure it.
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _run(args: argparse.Namespace) -> int:
    from modular import load_model

    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"{args.model}: not a folder (expected a save_pretrained output)")
    model = load_model(args.model)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    with torch.no_grad():
        model(input_ids=input_ids)
    stats = routing_stats(model)
    out = Path(args.out) if args.out else Path(args.model) / "routing_stats.png"
    plot_routing_stats(stats, out)
    print(json.dumps({"mean_experts_per_token": mean_experts_per_token(stats), "layers": stats, "plot": str(out)}))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``modular moe-stats MODEL_DIR``: routing statistics (JSON) and a PNG plot."""
    parser = subparsers.add_parser("moe-stats", help="routing statistics of an AdaMoE model (JSON + PNG plot)")
    parser.add_argument("model", help="folder written by save_pretrained (AdaMoE-injected)")
    parser.add_argument("--out", help="PNG path (default: MODEL/routing_stats.png)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token batch routed")
    parser.set_defaults(func=_run)
    return parser

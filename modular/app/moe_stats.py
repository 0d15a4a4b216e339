"""``modular moe-stats MODEL_DIR``: routing statistics of an AdaMoE model (JSON) and their plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    import torch

    from modular import load_model
    from moe import mean_experts_per_token, plot_routing_stats, routing_stats

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

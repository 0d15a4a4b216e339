"""Per-token compute statistics of ACM models, and their plot.

Every ACM counts, in eval mode, how many tokens ran j = 0..N learners (``choice_counts``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .model import acm_modules

__all__ = ["compute_stats", "plot_stats", "reset_stats"]


def reset_stats(model: nn.Module) -> None:
    for _, layer in acm_modules(model):
        layer.choice_counts.zero_()


def compute_stats(model: nn.Module) -> dict:
    """Counts since the last :func:`reset_stats`.

    Returns ``{"layers": [{"name", "tokens", "histogram" (tokens per j = 0..N), "mean_learners",
    "flop_fraction"}], "mean_learners", "flop_fraction", "histogram"}``. ``flop_fraction`` is
    (learner FLOPs + gate FLOPs) / FLOPs of the dense FFNs on the same tokens.
    """
    layers, acm_flops, dense_flops, total_hist = [], 0, 0, None
    for name, layer in acm_modules(model):
        hist = layer.choice_counts.tolist()
        tokens = sum(hist)
        learners = sum(j * c for j, c in enumerate(hist))
        flops = learners * layer.learner_flops_per_token() + tokens * layer.gate.flops_per_token()
        dense = tokens * layer.dense_flops_per_token()
        acm_flops, dense_flops = acm_flops + flops, dense_flops + dense
        total_hist = hist if total_hist is None else [a + b for a, b in zip(total_hist, hist, strict=False)]
        layers.append({
            "name": name, "tokens": tokens, "histogram": hist,
            "mean_learners": learners / tokens if tokens else float("nan"),
            "flop_fraction": flops / dense if dense else float("nan"),
        })
    all_tokens = sum(total_hist)
    return {
        "layers": layers,
        "histogram": total_hist,
        "mean_learners": sum(j * c for j, c in enumerate(total_hist)) / all_tokens if all_tokens else float("nan"),
        "flop_fraction": acm_flops / dense_flops if dense_flops else float("nan"),
    }


def plot_stats(stats: dict, path: str | os.PathLike) -> None:
    """PNG with mean learners per token per layer (left) and the histogram of choices (right)."""
    from modular.plotting import pyplot

    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    means = [layer["mean_learners"] for layer in stats["layers"]]
    left.bar(range(len(means)), means)
    left.set_xlabel("ACM module (layer order)")
    left.set_ylabel("mean learners per token")
    left.set_title(f"mean {stats['mean_learners']:.2f} learners, {stats['flop_fraction']:.0%} of dense FLOPs")
    hist = torch.tensor(stats["histogram"], dtype=torch.float)
    right.bar(range(len(hist)), (hist / hist.sum().clamp(min=1)).tolist())
    right.set_xlabel("learners run (j)")
    right.set_ylabel("fraction of tokens")
    right.set_title("per-token compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The AdaMoE load-balancing loss, computed from what each AdaMoE router saw in its last forward."""

from __future__ import annotations

import torch
from torch import nn

from .router import is_adamoe_router

__all__ = ["adamoe_aux_loss", "load_balancing_loss"]


def load_balancing_loss(probs: torch.Tensor, selected: torch.Tensor, num_true: int) -> torch.Tensor:
    """``N · Σ_i f_i · P_i`` over all N = n + m experts of one layer (``docs/methods.md``, "AdaMoE").

    Args:
        probs: (T, N) router probabilities (softmax over true and null logits).
        selected: (T, k') picked expert ids in [0, N) (null j is id n + j).
        num_true: n; ids >= n are null experts.

    f_i is the fraction of the T·k' routed slots that went to expert i (so f sums to 1 and a
    perfectly balanced router scores 1.0); P_i is the mean probability of i. The null experts'
    f_i are replaced by their mean: nulls are balanced as a group, not against each other (the
    LoRA-experts variant of the official code, the one matching the paper's text). HF's
    Switch loss uses fractions of tokens (summing to k) instead of slots; the two differ by
    the constant factor k'.
    """
    num_all = probs.shape[-1]
    counts = torch.bincount(selected.reshape(-1), minlength=num_all).to(probs.dtype)
    f = counts / selected.numel()
    if num_all > num_true:
        f = torch.cat([f[:num_true], f[num_true:].mean().expand(num_all - num_true)])
    return num_all * (f * probs.mean(0)).sum()


def adamoe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean over AdaMoE routers of ``aux_loss_coef · load_balancing_loss`` from their last
    forward (each layer balanced on its own, then averaged; HF and the official code
    concatenate all layers' logits first, which lets imbalances of different layers cancel).
    ``None`` when the model has no AdaMoE router that has run."""
    terms = [
        r.aux_loss_coef * load_balancing_loss(r.last_probs, r.last_selected, r.num_experts)
        for r in model.modules()
        if is_adamoe_router(r) and r.last_probs is not None
    ]
    return torch.stack(terms).mean() if terms else None

"""Model Stock (Jang et al., 2024): interpolate between the base and the mean of the fine-tuned
models by a ratio read from the angle between their task vectors; no weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .registry import Parameter, is_bool, register_merge_method

__all__ = ["model_stock"]


@register_merge_method(
    "model_stock", parameters=[Parameter("filter_wise", False, check=is_bool, doc="one ratio per row instead of per tensor")],
    weighted=False, inputs="models", models=(2, None),
)
def model_stock(base: torch.Tensor, models: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """t · mean_k θ_k + (1 − t) · θ_0 with t = N cos θ / (1 + (N − 1) cos θ), cos θ the mean
    pairwise cosine of the N task vectors (t = 0 where the denominator vanishes); in the
    inputs' dtype, as mergekit."""
    if filter_wise:
        rows = base.unsqueeze(0) if base.dim() == 1 else base
        others = [m.unsqueeze(0) if m.dim() == 1 else m for m in models]
    else:
        rows, others = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [m - rows for m in others]
    cosines = [
        ((a * b).sum(dim=-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
        for i, a in enumerate(offsets) for b in offsets[i + 1:]
    ]
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(others)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta), n * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator))
    return (t * (sum(others) / n) + (1 - t) * rows).reshape(base.shape)

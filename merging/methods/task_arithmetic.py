"""Task arithmetic (Ilharco et al., 2023): θ_0 + λ Σ_k w_k τ_k."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import generalized_task_arithmetic, per_model
from .family import INT8_MASK, LAMBDA, normalize, rescale
from .registry import register_merge_method

__all__ = ["task_arithmetic"]


@register_merge_method("task_arithmetic", parameters=[LAMBDA, normalize(False, consensus=False), rescale(False), INT8_MASK])
def task_arithmetic(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    lambda_: float = 1.0, normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
) -> torch.Tensor:
    """θ_0 + λ Σ_k w_k δ_k (divided by Σ_k w_k when ``normalize``, as mergekit's option).
    ``rescale`` and ``int8_mask`` are accepted as mergekit does; without sparsification they change nothing."""
    return generalized_task_arithmetic(base, deltas, weights=per_model(weights, len(deltas), "weights"), consensus=False,
                                       normalize=normalize, lambda_=lambda_)

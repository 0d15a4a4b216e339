"""Task arithmetic (Ilharco et al., 2023): θ_0 + λ Σ_k w_k τ_k."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import finish, per_model, stack_weighted, sum_weighted
from .registry import Parameter, finite, is_bool, register_merge_method

__all__ = ["task_arithmetic"]

LAMBDA = Parameter("lambda", 1.0, check=finite, doc="scales the merged delta")
NORMALIZE_SUM = Parameter("normalize", False, check=is_bool, doc="divide the weighted sum by the sum of the weights")


@register_merge_method("task_arithmetic", parameters=[LAMBDA, NORMALIZE_SUM])
def task_arithmetic(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    lambda_: float = 1.0, normalize: bool = False,
) -> torch.Tensor:
    """θ_0 + λ Σ_k w_k δ_k (divided by Σ_k w_k when ``normalize``, as mergekit's option)."""
    weighted, w = stack_weighted(deltas, per_model(weights, len(deltas), "weights"))
    return finish(base, sum_weighted(weighted, w, normalize), lambda_)

"""DARE (Yu et al., 2024): drop each delta entry with probability 1 − density, rescale the rest,
then a linear sum (``dare_linear``) or TIES' sign election (``dare_ties``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import drop_and_rescale, generalized_task_arithmetic, per_model
from .family import COMBINE, INT8_MASK, LAMBDA, density, normalize, rescale
from .registry import register_merge_method

__all__ = ["dare_linear", "dare_ties"]

DENSITY = density(0.5, "probability of keeping each delta entry")


def _dare(base, deltas, weights, density, generator, rescale, **combine) -> torch.Tensor:
    k = len(deltas)
    densities = per_model(density, k, "density")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return generalized_task_arithmetic(
        base, deltas, weights=per_model(weights, k, "weights"),
        sparsify=lambda i, d: drop_and_rescale(d, densities[i], generator, rescale), **combine,
    )


@register_merge_method("dare_linear", parameters=[DENSITY, LAMBDA, normalize(False, consensus=False), rescale(True), INT8_MASK],
                       random=True)
def dare_linear(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.5, lambda_: float = 1.0, normalize: bool = False, rescale: bool = True,
    int8_mask: bool = False, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE then task arithmetic. ``generator`` draws the drop masks (default: seeded with 0)."""
    return _dare(base, deltas, weights, density, generator, rescale, consensus=False, normalize=normalize, lambda_=lambda_)


@register_merge_method(
    "dare_ties", parameters=[DENSITY, LAMBDA, normalize(True, consensus=True, mergekit_default=False), rescale(True), COMBINE,
                             INT8_MASK],
    random=True,
)
def dare_ties(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.5, lambda_: float = 1.0, normalize: bool = True, rescale: bool = True,
    combine: str | None = None, int8_mask: bool = False, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE then TIES sign election and disjoint combine (no magnitude trim)."""
    return _dare(base, deltas, weights, density, generator, rescale, consensus=True, normalize=normalize, lambda_=lambda_,
                 combine=combine)

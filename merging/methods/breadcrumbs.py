"""Model Breadcrumbs (Davari & Belilovsky, 2024): drop each task vector's largest-magnitude
outliers (``gamma``) and its smallest entries, keeping ``density``; then a linear sum
(``breadcrumbs``) or TIES' sign election (``breadcrumbs_ties``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import generalized_task_arithmetic, magnitude_outliers, per_model
from .family import COMBINE, GAMMA, INT8_MASK, LAMBDA, density, normalize, rescale
from .registry import register_merge_method

__all__ = ["breadcrumbs", "breadcrumbs_ties"]

DENSITY = density(0.9, "fraction of each task vector's entries kept (outliers and smallest magnitudes dropped)")


def _breadcrumbs(base, deltas, weights, density, gamma, rescale, **combine) -> torch.Tensor:
    k = len(deltas)
    densities, gammas = per_model(density, k, "density"), per_model(gamma, k, "gamma")
    return generalized_task_arithmetic(
        base, deltas, weights=per_model(weights, k, "weights"),
        sparsify=lambda i, d: magnitude_outliers(d, densities[i], gammas[i], rescale), concurrent=True, **combine,
    )


@register_merge_method("breadcrumbs", parameters=[DENSITY, GAMMA, LAMBDA, normalize(False, consensus=False), rescale(False),
                                                  INT8_MASK])
def breadcrumbs(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.9, gamma: float | Sequence[float] = 0.01, lambda_: float = 1.0,
    normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
) -> torch.Tensor:
    """Breadcrumbs sparsification then task arithmetic."""
    return _breadcrumbs(base, deltas, weights, density, gamma, rescale, consensus=False, normalize=normalize, lambda_=lambda_)


@register_merge_method(
    "breadcrumbs_ties",
    parameters=[DENSITY, GAMMA, LAMBDA, normalize(True, consensus=True, mergekit_default=False), rescale(False), COMBINE,
                INT8_MASK],
)
def breadcrumbs_ties(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.9, gamma: float | Sequence[float] = 0.01, lambda_: float = 1.0,
    normalize: bool = True, rescale: bool = False, combine: str | None = None, int8_mask: bool = False,
) -> torch.Tensor:
    """Breadcrumbs sparsification then TIES sign election and disjoint combine."""
    return _breadcrumbs(base, deltas, weights, density, gamma, rescale, consensus=True, normalize=normalize, lambda_=lambda_,
                        combine=combine)

"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import elect_sign, generalized_task_arithmetic, per_model, stack_weighted, trim_magnitude
from .family import COMBINE, INT8_MASK, LAMBDA, density, normalize, rescale
from .registry import register_merge_method

__all__ = ["ties", "ties_process"]

DENSITY = density(0.2, "fraction of each task vector's entries kept (largest magnitudes, per tensor)")


def ties_process(
    deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0, density: float | Sequence[float] = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TIES steps 1–2 on one tensor: trim each δ_k to its top-``density``, weight, elect sign.

    Returns ``(weighted (K, *S), weights (K, 1, ...), agree mask (K, *S))``. AdaMerging++ uses
    ``weighted * agree`` as its processed task vectors.
    """
    k = len(deltas)
    densities = per_model(density, k, "density")
    weighted, w = stack_weighted(deltas, per_model(weights, k, "weights"), lambda i, d: trim_magnitude(d, densities[i]),
                                 concurrent=True)
    return weighted, w, elect_sign(weighted)


@register_merge_method("ties", parameters=[DENSITY, LAMBDA, normalize(True, consensus=True), rescale(False), COMBINE, INT8_MASK])
def ties(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.2, lambda_: float = 1.0, normalize: bool = True, rescale: bool = False,
    combine: str | None = None, int8_mask: bool = False,
) -> torch.Tensor:
    """TIES-merging: trim to top-``density`` per tensor, elect sign, disjoint combine, × λ."""
    k = len(deltas)
    densities = per_model(density, k, "density")
    return generalized_task_arithmetic(
        base, deltas, weights=per_model(weights, k, "weights"), sparsify=lambda i, d: trim_magnitude(d, densities[i], rescale),
        consensus=True, normalize=normalize, lambda_=lambda_, combine=combine, concurrent=True,
    )

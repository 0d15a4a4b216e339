"""DELLA (Deep et al., 2024): drop delta entries at random with keep probabilities rising with
their magnitude rank (density ± epsilon), rescale, then TIES' sign election (``della``) or a
linear sum (``della_linear``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import della_magprune, generalized_task_arithmetic, per_model
from .family import COMBINE, EPSILON, INT8_MASK, LAMBDA, density, normalize, rescale
from .registry import register_merge_method

__all__ = ["della", "della_linear"]

DENSITY = density(0.5, "mean probability of keeping a delta entry")


def _keep_probabilities_in_range(kwargs: dict) -> str | None:
    """density ± epsilon must stay inside (0, 1) wherever density < 1 (mergekit raises mid-merge)."""
    for keep, epsilon in zip(kwargs["density"], kwargs["epsilon"]):
        if keep < 1 and not (keep - epsilon > 0 and keep + epsilon < 1):
            return f"density {keep:g} ± epsilon {epsilon:g} must stay inside (0, 1)"
    return None


def _della(base, deltas, weights, density, epsilon, generator, rescale, **combine) -> torch.Tensor:
    k = len(deltas)
    densities, epsilons = per_model(density, k, "density"), per_model(epsilon, k, "epsilon")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return generalized_task_arithmetic(
        base, deltas, weights=per_model(weights, k, "weights"),
        sparsify=lambda i, d: della_magprune(d, densities[i], epsilons[i], generator, rescale), **combine,
    )


@register_merge_method("della", parameters=[DENSITY, EPSILON, LAMBDA, normalize(True, consensus=True), rescale(True), COMBINE,
                                            INT8_MASK], random=True, check=_keep_probabilities_in_range)
def della(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.5, epsilon: float | Sequence[float] = 0.15, lambda_: float = 1.0,
    normalize: bool = True, rescale: bool = True, combine: str | None = None, int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA magnitude-ranked random pruning, then TIES sign election and disjoint combine."""
    return _della(base, deltas, weights, density, epsilon, generator, rescale, consensus=True, normalize=normalize,
                  lambda_=lambda_, combine=combine)


@register_merge_method("della_linear", parameters=[DENSITY, EPSILON, LAMBDA, normalize(False, consensus=False), rescale(True),
                                                   INT8_MASK], random=True, check=_keep_probabilities_in_range)
def della_linear(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.5, epsilon: float | Sequence[float] = 0.15, lambda_: float = 1.0,
    normalize: bool = False, rescale: bool = True, int8_mask: bool = False, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA magnitude-ranked random pruning, then task arithmetic."""
    return _della(base, deltas, weights, density, epsilon, generator, rescale, consensus=False, normalize=normalize,
                  lambda_=lambda_)

"""DARE (Yu et al., 2024): drop each delta entry with probability 1 − density, rescale the rest by
1 / density, then a linear sum (``dare_linear``) or TIES' sign election (``dare_ties``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .common import combine_disjoint, drop_and_rescale, elect_sign, finish, per_model, stack_weighted, sum_weighted
from .registry import Parameter, in_range, is_bool, register_merge_method
from .task_arithmetic import LAMBDA, NORMALIZE_SUM
from .ties import COMBINE, combine_of

__all__ = ["dare_linear", "dare_ties"]

DARE_DENSITY = Parameter("density", 0.5, per_model=True, check=in_range(0, 1, low_open=True),
                         doc="probability of keeping each delta entry")
SEED = Parameter("seed", 0, check=lambda v: None if isinstance(v, int) and not isinstance(v, bool) else "an integer",
                 doc="seeds the drop masks (each tensor's from (seed, tensor name))")
NORMALIZE_DARE_TIES = Parameter("normalize", False, check=is_bool,
                                doc="divide by the summed weights of the agreeing models (combine 'mergekit'), else sum")


def _dropper(density: float | Sequence[float], k: int, seed: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Row transform dropping δ_i with its own density; one generator, rows in order (reproducible)."""
    densities, generator = per_model(density, k, "density"), torch.Generator().manual_seed(seed)
    return lambda i, d: drop_and_rescale(d, densities[i], generator)


@register_merge_method("dare_linear", parameters=[DARE_DENSITY, LAMBDA, NORMALIZE_SUM, SEED])
def dare_linear(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.5, lambda_: float = 1.0, normalize: bool = False, seed: int = 0,
) -> torch.Tensor:
    """DARE then task arithmetic. ``seed`` seeds this tensor's drop masks (streaming derives it per tensor)."""
    weighted, w = stack_weighted(deltas, per_model(weights, len(deltas), "weights"), _dropper(density, len(deltas), seed))
    return finish(base, sum_weighted(weighted, w, normalize), lambda_)


@register_merge_method("dare_ties", parameters=[DARE_DENSITY, LAMBDA, NORMALIZE_DARE_TIES, COMBINE, SEED])
def dare_ties(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.5, lambda_: float = 1.0, normalize: bool = False, combine: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """DARE then TIES sign election and disjoint combine (no magnitude trim); ``normalize`` defaults
    to false (sum), as mergekit's ``dare_ties``."""
    weighted, w = stack_weighted(deltas, per_model(weights, len(deltas), "weights"), _dropper(density, len(deltas), seed))
    return finish(base, combine_disjoint(weighted, w, elect_sign(weighted), combine_of(normalize, combine)), lambda_)

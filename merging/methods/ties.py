"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import COMBINES, combine_disjoint, elect_sign, finish, per_model, stack_weighted, trim_magnitude
from .registry import Parameter, in_range, is_bool, one_of, register_merge_method
from .task_arithmetic import LAMBDA

__all__ = ["DENSITY", "ties", "ties_process"]

DENSITY = Parameter("density", 0.2, per_model=True, check=in_range(0, 1, low_open=True),
                    doc="fraction of each task vector's entries kept (largest magnitudes, per tensor)")
NORMALIZE_AGREEING = Parameter("normalize", True, check=is_bool,
                               doc="divide by the summed weights of the agreeing models (combine 'mergekit'), else sum")
COMBINE = Parameter("combine", None, check=one_of(None, *COMBINES),
                    doc="disjoint combine: 'mergekit', 'mean' or 'sum'; when set, it overrides normalize")


def combine_of(normalize: bool, combine: str | None) -> str:
    """The combine rule: ``combine`` when given, else mergekit's reading of ``normalize``."""
    return combine if combine is not None else ("mergekit" if normalize else "sum")


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


@register_merge_method("ties", parameters=[DENSITY, LAMBDA, NORMALIZE_AGREEING, COMBINE])
def ties(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.2, lambda_: float = 1.0, normalize: bool = True, combine: str | None = None,
) -> torch.Tensor:
    """TIES-merging: trim to top-``density`` per tensor, elect sign, disjoint combine, × λ."""
    weighted, w, mask = ties_process(deltas, weights=weights, density=density)
    return finish(base, combine_disjoint(weighted, w, mask, combine_of(normalize, combine)), lambda_)

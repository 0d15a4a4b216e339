"""Linear merge (model soups, Wortsman et al., 2022): Σ_k w_k θ_k, ÷ Σ_k w_k with ``normalize``.

With a base model, the base is one of the averaged models (it needs a weight too), as in mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import per_model
from .registry import Parameter, finite, is_bool, register_merge_method

__all__ = ["linear"]


@register_merge_method(
    "linear",
    parameters=[Parameter("weight", 1.0, per_model=True, check=finite, doc="weight w_k of model k (the base too)", base_too=True),
                Parameter("normalize", True, check=is_bool, doc="divide by the sum of the weights")],
    inputs="models", base="optional", base_is_input=True,
)
def linear(base: torch.Tensor | None, models: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
           normalize: bool = True) -> torch.Tensor:
    """Σ_k w_k θ_k (÷ Σ_k w_k), accumulated in float32 (float64 for float64 inputs) and returned
    in the models' dtype, as mergekit. ``base`` is unused: with ``base_is_input`` it is among ``models``."""
    first = models[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(per_model(weights, len(models), "weights"), dtype=dtype)
    merged = torch.zeros_like(first, dtype=dtype)
    for model, coefficient in zip(models, w):
        merged.addcmul_(model, coefficient)
    if normalize:
        merged.div_(w.sum())
    return merged.to(first.dtype)

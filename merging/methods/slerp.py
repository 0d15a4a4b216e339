"""SLERP: spherical interpolation between the base and one other model, per tensor, by ``t``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .registry import REQUIRED, Parameter, finite, register_merge_method

__all__ = ["slerp"]

DOT_THRESHOLD = 0.9995  # nearly (anti)parallel: interpolate linearly
NORM_EPS = 1e-8
CHUNK = 2**20  # elements per float32 scratch chunk (mergekit's bound)


def _chunks(vector: torch.Tensor, dtype: torch.dtype):
    for start in range(0, vector.numel(), CHUNK):
        yield vector[start: start + CHUNK].to(dtype)


def _norm(vector: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The norm of the per-chunk norms (mergekit's), ≤ eps replaced by 1."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c, dim=0, keepdim=True) for c in _chunks(vector, dtype)]), dim=0)
    return torch.where(norm > NORM_EPS, norm, 1)


@register_merge_method("slerp", parameters=[Parameter("t", REQUIRED, check=finite, doc="0 gives the base, 1 the other model")],
                       weighted=False, inputs="models", models=(1, 1))
def slerp(base: torch.Tensor, models: Sequence[torch.Tensor], *, t: float) -> torch.Tensor:
    """sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b, θ the angle between the flattened tensors a (base)
    and b; linear interpolation when they are nearly parallel. The un-normalised tensors are
    interpolated (their norms only give the angle). Computed in float32 (float64 for float64
    inputs), returned in ``base``'s dtype, as mergekit."""
    (other,) = models
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b = base.reshape(-1), other.reshape(-1)
    t_ = torch.tensor([t], dtype=dtype)
    if a.numel() == 0:
        return base.clone()
    norm_a, norm_b = _norm(a, dtype), _norm(b, dtype)
    dot = torch.stack([(x / norm_a * (y / norm_b)).sum(dim=0, keepdim=True)
                       for x, y in zip(_chunks(a, dtype), _chunks(b, dtype))]).sum(dim=0).clamp(-1, 1)
    parallel = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(parallel, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(parallel, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    coef_b = torch.where(parallel, t_, torch.sin(t_ * theta) / sin_theta)
    merged = torch.empty_like(a)
    for start, (x, y) in zip(range(0, a.numel(), CHUNK), zip(_chunks(a, dtype), _chunks(b, dtype))):
        merged[start: start + CHUNK] = coef_a * x + coef_b * y
    return merged.reshape(base.shape)

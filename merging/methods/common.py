"""Tensor operations shared by the merge methods: weighting and stacking the K deltas of one
tensor, magnitude trimming, DARE's drop-and-rescale, TIES' sign election and disjoint combine.

Where projects disagree (``docs/methods.md``, "TIES and DARE"):

* TIES "combine" step, ``combine=``:
  ``"mergekit"`` = Σ_k w_k δ_k m_k / Σ_k w_k m_k (mergekit's ``normalize: true``);
  ``"mean"`` = Σ_k w_k δ_k m_k / Σ_k m_k (PEFT's disjoint mean);
  ``"sum"`` = Σ_k w_k δ_k m_k (the AdaMerging code, with ``lambda=0.3``; mergekit's
  ``normalize: false``). With all weights 1, "mergekit" and "mean" coincide.
* TIES trimming keeps the top-``density`` magnitudes of each tensor separately (mergekit), not
  over the whole flattened task vector (TIES paper, FusionBench): streaming needs it.
* DARE rescales survivors by exactly 1/density (paper); mergekit rescales to the L1 norm of the
  undropped delta instead. Both equal 1/density in expectation.
* Sign election: +1 where Σ_k w_k δ_k ≥ 0 (ties go to +, as mergekit and PEFT); entries whose
  trimmed delta is 0 never agree with the elected sign.

Computation is in the deltas' dtype (float32 from ``TaskVector``); the caller casts the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = [
    "COMBINES", "combine_disjoint", "drop_and_rescale", "elect_sign", "finish", "per_model", "stack_weighted",
    "sum_weighted", "trim_magnitude",
]

COMBINES = ("mergekit", "mean", "sum")
CONCURRENT_MAX_BYTES = 64 * 2**20


def per_model(value: float | Sequence[float], k: int, what: str) -> list[float]:
    values = [float(value)] * k if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != k:
        raise ValueError(f"{what}: got {len(values)} values for {k} task vectors")
    return values


def stack_weighted(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    *, concurrent: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_k · transform(δ_k) stacked (K, *S), w shaped (K, 1, ...))``.

    Reads each ``deltas[k]`` once and drops it: the streaming merge passes a lazy sequence, so
    only one delta (per worker) exists besides the stack — embeddings dominate peak memory.
    ``concurrent`` runs rows on ``torch.get_num_threads()`` threads: worth it for TIES, whose
    per-row selection is single-threaded; only for transforms that do not depend on row order,
    and only for tensors under ``CONCURRENT_MAX_BYTES`` (each worker holds a few copies of a
    row; for embeddings that would push peak memory past the budget of ~one model).
    """
    first = deltas[0]
    weighted = torch.empty((len(weights), *first.shape), dtype=first.dtype)

    def fill(k: int, delta: torch.Tensor | None = None) -> None:
        delta = deltas[k] if delta is None else delta
        torch.mul(transform(k, delta) if transform else delta, weights[k], out=weighted[k])

    fill(0, first)
    del first
    small = weighted[0].numel() * weighted.element_size() <= CONCURRENT_MAX_BYTES
    workers = min(torch.get_num_threads(), len(weights) - 1) if concurrent and small else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, range(1, len(weights))))
    else:
        for k in range(1, len(weights)):
            fill(k)
    w = torch.tensor(weights, dtype=weighted.dtype).reshape(-1, *([1] * (weighted.dim() - 1)))
    return weighted, w


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density · numel))`` largest-magnitude entries of ``delta``, zero the rest.

    When several entries share the cut-off magnitude and only some fit, they are chosen as
    ``torch.argsort(descending=True)`` orders them — the call mergekit makes — so both keep the
    same entries (fp32 deltas have many exact ties). Otherwise a k-th value threshold gives the
    same set without the full sort (several times faster on embeddings).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    magnitude = flat.abs()
    cutoff = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    keep = magnitude >= cutoff
    if int(keep.sum()) == k:
        return (flat * keep).reshape_as(delta)
    chosen = torch.argsort(magnitude, descending=True)[:k]
    trimmed = torch.zeros_like(flat)
    trimmed[chosen] = flat[chosen]
    return trimmed.reshape_as(delta)


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (drop rate p = 1 − density), scale survivors by 1/density."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep / density


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """``weighted`` (K, *S) -> bool mask (K, *S): entries whose sign equals the elected sign of Σ_k.

    Row by row, so no K-sized float temporary is made.
    """
    positive = weighted.sum(dim=0) >= 0
    mask = torch.empty(weighted.shape, dtype=torch.bool)
    for k, row in enumerate(weighted):
        torch.where(positive, row > 0, row < 0, out=mask[k])
    return mask


def combine_disjoint(weighted: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, combine: str) -> torch.Tensor:
    """Disjoint combine of ``weighted`` (K, *S) over the entries where ``mask``; overwrites ``weighted``."""
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is not allowed; expected one of {', '.join(COMBINES)}")
    mixed = weighted.mul_(mask).sum(dim=0)
    if combine == "sum":
        return mixed
    divisor = torch.zeros_like(mixed)
    for k in range(len(mask)):
        divisor.add_(mask[k], alpha=float(w[k]) if combine == "mergekit" else 1.0)
    divisor[divisor == 0] = 1
    return mixed / divisor


def sum_weighted(weighted: torch.Tensor, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    mixed = weighted.sum(dim=0)
    total = w.sum()
    return mixed / total if normalize and total.abs() >= 1e-8 else mixed


def finish(base: torch.Tensor, mixed: torch.Tensor, lambda_: float) -> torch.Tensor:
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed

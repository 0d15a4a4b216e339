"""Merge methods: pure functions ``(base, deltas, **params) -> merged tensor``, registered by name.

Every function sees ONE parameter tensor: ``base`` (any shape S) and ``deltas``, a sequence of K
task-vector slices of shape S (θ_k − θ_0 for that tensor). They never see a model, so the
streaming code (``merging.streaming``) and AdaMerging call the same functions.

Per-model parameters (``weights``, ``density``) are sequences of length K, or one float used
for every model. Computation is in the deltas' dtype (float32 from ``TaskVector``); the caller
casts the result.

Where projects disagree (METHODS.md, "TIES and DARE"):

* TIES "combine" step, ``combine=``:
  ``"mergekit"`` (default) = Σ_k w_k δ_k m_k / Σ_k w_k m_k (mergekit's ``normalize: true``);
  ``"mean"`` = Σ_k w_k δ_k m_k / Σ_k m_k (PEFT's disjoint mean);
  ``"sum"`` = Σ_k w_k δ_k m_k (the AdaMerging code, with ``lambda_=0.3``; mergekit's
  ``normalize: false``). With all weights 1, "mergekit" and "mean" coincide.
  The default follows mergekit so that a mergekit YAML gives mergekit's result.
* TIES trimming keeps the top-``density`` magnitudes of each tensor separately (mergekit), not
  over the whole flattened task vector (TIES paper, FusionBench): streaming needs it.
* DARE rescales survivors by exactly 1/density (paper); mergekit rescales to the L1 norm of the
  undropped delta instead. Both equal 1/density in expectation.
* Sign election: +1 where Σ_k w_k δ_k ≥ 0 (ties go to +, as mergekit and PEFT); entries whose
  trimmed delta is 0 never agree with the elected sign.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = [
    "MERGE_METHODS",
    "dare_linear",
    "dare_ties",
    "drop_and_rescale",
    "elect_sign",
    "get_merge_method",
    "register_merge_method",
    "task_arithmetic",
    "ties",
    "ties_process",
    "trim_magnitude",
]

MergeFn = Callable[..., torch.Tensor]
MERGE_METHODS: dict[str, MergeFn] = {}
COMBINES = ("mergekit", "mean", "sum")
CONCURRENT_MAX_BYTES = 64 * 2**20


def register_merge_method(name: str) -> Callable[[MergeFn], MergeFn]:
    def decorate(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name] = fn
        return fn

    return decorate


def get_merge_method(name: str) -> MergeFn:
    if name not in MERGE_METHODS:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(MERGE_METHODS))}, adamerging")
    return MERGE_METHODS[name]


def _per_model(value: float | Sequence[float], k: int, what: str) -> list[float]:
    values = [float(value)] * k if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != k:
        raise ValueError(f"{what}: got {len(values)} values for {k} task vectors")
    return values


def _stack_weighted(
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


def _combine(weighted: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, combine: str) -> torch.Tensor:
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


def _sum(weighted: torch.Tensor, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    mixed = weighted.sum(dim=0)
    total = w.sum()
    return mixed / total if normalize and total.abs() >= 1e-8 else mixed


def _finish(base: torch.Tensor, mixed: torch.Tensor, lambda_: float) -> torch.Tensor:
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


@register_merge_method("task_arithmetic")
def task_arithmetic(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    lambda_: float = 1.0, normalize: bool = False,
) -> torch.Tensor:
    """θ_0 + λ Σ_k w_k δ_k (divided by Σ_k w_k when ``normalize``, as mergekit's option)."""
    weighted, w = _stack_weighted(deltas, _per_model(weights, len(deltas), "weights"))
    return _finish(base, _sum(weighted, w, normalize), lambda_)


def ties_process(
    deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0, density: float | Sequence[float] = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TIES steps 1–2 on one tensor: trim each δ_k to its top-``density``, weight, elect sign.

    Returns ``(weighted (K, *S), weights (K, 1, ...), agree mask (K, *S))``. AdaMerging++ uses
    ``weighted * agree`` as its processed task vectors.
    """
    k = len(deltas)
    densities = _per_model(density, k, "density")
    weighted, w = _stack_weighted(deltas, _per_model(weights, k, "weights"), lambda i, d: trim_magnitude(d, densities[i]), concurrent=True)
    return weighted, w, elect_sign(weighted)


@register_merge_method("ties")
def ties(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.2, lambda_: float = 1.0, combine: str = "mergekit",
) -> torch.Tensor:
    """TIES-merging: trim to top-``density`` per tensor, elect sign, disjoint combine, × λ."""
    weighted, w, mask = ties_process(deltas, weights=weights, density=density)
    return _finish(base, _combine(weighted, w, mask, combine), lambda_)


def _dare(density: float | Sequence[float], k: int, seed: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Row transform dropping δ_i with its own density; one generator, rows in order (reproducible)."""
    densities, generator = _per_model(density, k, "density"), torch.Generator().manual_seed(seed)
    return lambda i, d: drop_and_rescale(d, densities[i], generator)


@register_merge_method("dare_linear")
def dare_linear(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.5, lambda_: float = 1.0, seed: int = 0, normalize: bool = False,
) -> torch.Tensor:
    """DARE then task arithmetic. ``seed`` seeds this tensor's drop masks (streaming derives it per tensor)."""
    weighted, w = _stack_weighted(deltas, _per_model(weights, len(deltas), "weights"), _dare(density, len(deltas), seed))
    return _finish(base, _sum(weighted, w, normalize), lambda_)


@register_merge_method("dare_ties")
def dare_ties(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: float | Sequence[float] = 1.0,
    density: float | Sequence[float] = 0.5, lambda_: float = 1.0, seed: int = 0, combine: str = "sum",
) -> torch.Tensor:
    """DARE then TIES sign election and combine (no magnitude trim). Default ``combine="sum"``
    as mergekit's ``dare_ties`` (``normalize: false``)."""
    weighted, w = _stack_weighted(deltas, _per_model(weights, len(deltas), "weights"), _dare(density, len(deltas), seed))
    return _finish(base, _combine(weighted, w, elect_sign(weighted), combine), lambda_)

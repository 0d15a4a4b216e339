"""Tensor operations shared by the merge methods: sparsifying one delta (magnitude, breadcrumbs,
DARE, DELLA), weighting and stacking the K deltas of one tensor, TIES' sign election and the
combine, i.e. mergekit's "generalized task arithmetic" in one function.

Every operation follows mergekit 0.1.5 (``sparsify.py``, ``generalized_task_arithmetic.py``)
op for op, in the dtype of the deltas it is given (the engine's computation dtype), so that
the same inputs give the same tensors bit for bit. Where projects disagree (``docs/methods.md``,
"TIES and DARE"):

* TIES combine (``combine=``): ``"mergekit"`` = Σ_k w_k δ_k m_k / Σ_k w_k m_k (mergekit's
  ``normalize: true``); ``"mean"`` = Σ_k w_k δ_k m_k / Σ_k m_k (PEFT's disjoint mean);
  ``"sum"`` = Σ_k w_k δ_k m_k (mergekit's ``normalize: false``; the AdaMerging code).
* Trimming keeps the top-``density`` magnitudes of each tensor separately (mergekit), not over
  the whole flattened task vector (TIES paper, FusionBench): streaming needs it.
* ``rescale`` (DARE, DELLA; any sparsifier): the kept entries are scaled so that the tensor's
  L1 norm is the undropped one (mergekit), not by 1/density (the DARE paper); both are 1/density
  in expectation.
* Sign election: +1 where Σ_k w_k δ_k ≥ 0 (ties go to +, as mergekit and PEFT); an entry whose
  sparsified delta is 0 never agrees with the elected sign.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = [
    "COMBINES", "apply_lambda", "combine_disjoint", "della_magprune", "drop_and_rescale", "elect_sign", "generalized_task_arithmetic",
    "magnitude_outliers", "per_model", "rescale_l1", "stack_weighted", "sum_weighted", "trim_magnitude",
]

COMBINES = ("mergekit", "mean", "sum")
CONCURRENT_MAX_BYTES = 64 * 2**20
RESCALE_EPS = 1e-7

Sparsify = Callable[[int, torch.Tensor], torch.Tensor]  # (model index k, δ_k) -> sparsified δ_k


def per_model(value: float | Sequence[float], k: int, what: str) -> list[float]:
    values = [value] * k if not isinstance(value, (list, tuple)) else list(value)
    if len(values) != k:
        raise ValueError(f"{what}: got {len(values)} values for {k} models")
    return values


def rescale_l1(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``masked`` scaled to ``original``'s L1 norm (unchanged when either norm is ~0)."""
    before, after = original.abs().sum(), masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def trim_magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``max(1, int(density · numel))`` largest-magnitude entries of ``delta``, zero the rest.

    When several entries share the cut-off magnitude and only some fit, they are chosen as
    ``torch.argsort(descending=True)`` on float32 magnitudes orders them — the call mergekit
    makes — so both keep the same entries (fp32 deltas have many exact ties). Otherwise a k-th
    value threshold gives the same set without the full sort (several times faster on embeddings).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    magnitude = flat.abs()
    cutoff = torch.kthvalue(magnitude.float(), magnitude.numel() - k + 1).values
    keep = magnitude >= cutoff
    if int(keep.sum()) != k:
        keep = torch.zeros_like(keep)
        keep[torch.argsort(magnitude.float(), descending=True)[:k]] = True
    trimmed = (flat * keep).reshape_as(delta)
    return rescale_l1(delta, trimmed) if rescale else trimmed


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest magnitudes, then the smallest ones,
    keeping ``int(density · numel)`` entries (mergekit's ``magnitude_outliers``)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[order[bottom: bottom + target]] = 1
    masked = delta * mask.reshape_as(delta)
    return rescale_l1(delta, masked) if rescale else masked


def _work_dtype(delta: torch.Tensor) -> torch.dtype:
    """The dtype of random masks: bfloat16 stays, everything else draws in float32 (mergekit's CPU rule)."""
    return torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (drop rate p = 1 − density); with
    ``rescale``, survivors are scaled to the undropped L1 norm. One ``torch.bernoulli`` draw per
    call, as mergekit, so a generator seeded like mergekit's ``--random-seed`` gives its masks."""
    if density >= 1:
        return delta
    work = _work_dtype(delta)
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=generator)
    original = delta.to(work)
    masked = original * mask
    return (rescale_l1(original, masked) if rescale else masked).to(delta.dtype)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                   rescale: bool = True) -> torch.Tensor:
    """DELLA: keep entry j of each row with probability density − ε + 2ε · rank_j / (n − 1),
    ranks by magnitude (larger magnitudes kept more often)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density {density:g} ± epsilon {epsilon:g} must stay inside (0, 1)")
    work = _work_dtype(delta)
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probability = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probability, generator=generator).to(work)
    original = rows.to(work)
    masked = original * mask
    return (rescale_l1(original, masked) if rescale else masked).to(delta.dtype).reshape(delta.shape)


def stack_weighted(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], transform: Sparsify | None = None, *, concurrent: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_k · transform(δ_k) stacked (K, *S), w shaped (K, 1, ...))``, in the deltas' dtype.

    The weights are a tensor of that dtype (mergekit rounds them so: bf16 0.3 is 0.30078125).
    Reads each ``deltas[k]`` once and drops it: the streaming merge passes a lazy sequence, so
    only one delta (per worker) exists besides the stack. ``concurrent`` runs rows on
    ``torch.get_num_threads()`` threads (worth it for TIES, whose per-row selection is
    single-threaded): only for transforms that use no random generator, and only for tensors
    under ``CONCURRENT_MAX_BYTES`` (each worker holds a few copies of a row).
    """
    first = deltas[0]
    weighted = torch.empty((len(weights), *first.shape), dtype=first.dtype)
    w = torch.tensor(weights, dtype=first.dtype).reshape(-1, *([1] * first.dim()))

    def fill(k: int, delta: torch.Tensor | None = None) -> None:
        delta = deltas[k] if delta is None else delta
        torch.mul(transform(k, delta) if transform else delta, w[k], out=weighted[k])

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
    return weighted, w


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
    # Σ_k w_k m_k accumulated in float32 and rounded once: what torch.sum(dim=0) of mergekit's
    # (K, *S) product gives in every dtype, without that K-sized temporary.
    divisor = torch.zeros(mixed.shape, dtype=torch.float64 if mixed.dtype == torch.float64 else torch.float32)
    for k in range(len(mask)):
        divisor.add_(mask[k], alpha=float(w[k]) if combine == "mergekit" else 1.0)
    divisor = divisor.to(mixed.dtype)
    divisor[divisor == 0] = 1
    return mixed / divisor


def sum_weighted(weighted: torch.Tensor, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    mixed = weighted.sum(dim=0)
    if not normalize:
        return mixed
    total = w.sum(dim=0)
    total[total.abs() < 1e-8] = 1
    return mixed / total


def generalized_task_arithmetic(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: Sequence[float], sparsify: Sparsify | None = None,
    consensus: bool, normalize: bool, lambda_: float, combine: str | None = None, concurrent: bool = False,
) -> torch.Tensor:
    """θ_0 + λ · combine_k(w_k · sparsify(δ_k)): every task-arithmetic-family method.

    ``consensus``: TIES sign election and disjoint combine (``combine``, or mergekit's reading of
    ``normalize``: ÷ the agreeing weights, else sum); otherwise the weighted sum (÷ Σ w_k with
    ``normalize``). The result has ``base``'s dtype.
    """
    weighted, w = stack_weighted(deltas, weights, sparsify, concurrent=concurrent)
    if consensus:
        mixed = combine_disjoint(weighted, w, elect_sign(weighted), combine or ("mergekit" if normalize else "sum"))
    else:
        mixed = sum_weighted(weighted, w, normalize)
    return apply_lambda(base, mixed, lambda_)


def apply_lambda(base: torch.Tensor, mixed: torch.Tensor, lambda_: float) -> torch.Tensor:
    """θ_0 + λ · mixed in ``base``'s dtype: the last step of every task-arithmetic-family method.

    Merging ``mixed`` once (λ = 1 over a zero base) and calling this per λ gives, bit for bit,
    what the method writes at each λ (a λ grid without re-merging).
    """
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(base.dtype)

"""AdaMerging (Yang et al., ICLR 2024): learn merging coefficients on unlabelled inputs.

θ = θ_0 + Σ_k λ_k τ_k (task-wise: one λ per task) or θ^n = θ_0^n + Σ_k λ_k^n τ_k^n
(layer-wise: one λ per task and **parameter tensor** n, as the official code; ``"block"``: one
per numbered block). AdaMerging++ = the same over TIES-processed task vectors (``ties_density``).

Objectives, over the unlabelled inputs x of each task k, read through task k's own frozen head
(classifiers) or its label words / next-token distribution (causal LMs):

* ``"agreement"`` (default): Σ_k KL(f_k(x; θ_0 + τ_k) ‖ f_k(x; θ)) — the merged model should
  predict what task k's own fine-tuned model predicts on task k's inputs. The task models are at
  hand (θ_0 + τ_k); their predictions are computed once per batch, the first time it is used.
  The optimum is a merge that reproduces every task model: nothing rewards pushing λ past it.
* ``"entropy"``: Σ_k H(f_k(x; θ)), the paper's. Entropy keeps falling as λ grows past the
  accuracy optimum (docs/methods.md, "AdaMerging"): confident is not correct.

The defaults were chosen on a development task set and then confirmed once on four other tasks
(``benchmarks/adamerging.py``, benchmarks/RESULTS.md): agreement, layer-wise, ``init="search"``
(the uniform λ of 0.1…1.0 with the lowest objective on each task's first batch — a label-free
task-arithmetic λ), clamp [0, 1], Adam lr 1e-2, 100 steps, 16 inputs per task per step. The
paper's settings are ``objective="entropy", init=0.3, lr=1e-3, steps=500``.

Each step is one forward and one backward of the merged model over the K tasks' batches (one
fused forward when they can be concatenated), the merged parameters formed module by module just
in time (:mod:`merging.jit_merge`): memory is θ_0 + the K task vectors in the model's dtype,
(1 + K)× one model, with no stacked copy and no rebuild of the whole parameter set per step.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from modular.checkpoint import atomic_write_text

from .jit_merge import JitMerge
from .task_vector import TaskVector, ties_processed

__all__ = [
    "AdaMergingConfig", "AdaMergingResult", "EntropyTask", "adamerge", "adamerge_folders", "agreement", "block_of",
    "entropy", "pooled_logits",
]

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
TEACHER_TOP_K = 64  # agreement targets over more than 1024 classes (LM vocabularies) keep their top 64


@dataclass
class AdaMergingConfig:
    """Knobs of AdaMerging (the same defaults from Python and from ``modular merge``).

    - ``objective``: ``"agreement"`` (Σ_k KL(task model k's predictions ‖ the merged model's) on
      task k's unlabelled inputs) or ``"entropy"`` (the paper: Σ_k entropy of the merged model's
      predictions). ``normalize``: divide each task's term by log(number of classes), so tasks
      with more classes do not weigh more.
    - ``granularity``: ``"layer"`` (one λ per task per parameter tensor, as the official code),
      ``"block"`` (one λ per task per numbered block, e.g. ``encoder.layer.3``, and per other
      module) or ``"task"`` (one λ per task).
    - ``init``: the starting λ, or ``"search"``: the uniform λ of ``init_grid`` with the lowest
      objective on the first batch of every task (a task-arithmetic λ found without labels).
    - ``clamp``: ``[lo, hi]`` (default ``[0, 1]``, as the official code: λ is clamped at every use
      and projected back after every step, so a clamped λ gets no gradient and stays put), or
      ``None``: no bounds (FusionBench's choice).
    - ``lr``, ``betas``: Adam's; ``steps``: optimisation steps (one batch per task each).
    - ``batch_size``: inputs per task per step where AdaMerging forms the batches itself
      (``EntropyTask.inputs``, ``modular merge``); ``shuffle``: visit each task's batches in a new
      random order on every pass (seeded by ``seed``; ``inputs`` rows are also shuffled once
      before they are cut into batches). Off: batches are cycled in the order given.
    - ``ties_density``: set (official 0.2) for AdaMerging++ (with ``"agreement"`` the targets
      then come from the TIES-processed task models).
    - ``reg_to_init``: weight of Σ (λ − init)². ``patience``: stop once the summed objective has
      not improved by a relative ``min_delta`` for that many steps (``None``: run all ``steps``).
      ``own_task_gradient``: task k's term updates only its own coefficients λ_k (not in the paper).
    - ``fuse_tasks``: run the K tasks' batches as one forward when they can be concatenated
      (same keys; right-padded sequences are padded to a common length): same λ, same loss.
    - ``stream_task_vectors``: read the K deltas of a tensor from the task vectors' sources (their
      files) each time a step needs them instead of holding them: memory about one model instead
      of (1 + K)×, at the cost of reading the task vectors twice per step. Same coefficients.
      On glibc it also makes the process return freed large blocks to the OS at once
      (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``, for the rest of the process).

    Measured (docs/methods.md, "AdaMerging"; benchmarks/RESULTS.md, issue 22): on fully
    fine-tuned MiniLM encoders with their own heads, the paper's entropy objective drifts past
    the accuracy optimum the longer it runs (issue 22's held-out tasks: 68.0 after 100 steps,
    64.1 after its 500, below task arithmetic's 68.1); agreement does not.
    """

    objective: Literal["agreement", "entropy"] = "agreement"
    granularity: Literal["layer", "block", "task"] = "layer"
    init: float | Literal["search"] = "search"
    init_grid: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 11)])
    clamp: list[float] | None = field(default_factory=lambda: [0.0, 1.0])
    lr: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    steps: int = 100
    batch_size: int = 16
    shuffle: bool = False
    seed: int = 0
    normalize: bool = False
    ties_density: float | None = None
    reg_to_init: float = 0.0
    patience: int | None = None
    min_delta: float = 1e-3
    own_task_gradient: bool = False
    fuse_tasks: bool = True
    stream_task_vectors: bool = False

    def __post_init__(self) -> None:
        if self.objective not in ("agreement", "entropy"):
            raise ValueError(f"objective: {self.objective!r} is not allowed; expected 'agreement' or 'entropy'")
        if self.granularity not in ("layer", "block", "task"):
            raise ValueError(f"granularity: {self.granularity!r} is not allowed; expected 'layer', 'block' or 'task'")
        if isinstance(self.init, str) and self.init != "search":
            raise ValueError(f"init: expected a number or 'search', got {self.init!r}")
        if self.init == "search" and not self.init_grid:
            raise ValueError("init_grid: give at least one λ to search (init: 'search')")
        if self.clamp is not None and (len(self.clamp) != 2 or self.clamp[0] > self.clamp[1]):
            raise ValueError(f"clamp: expected [lo, hi] with lo <= hi or null, got {self.clamp!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {self.betas!r}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.ties_density is not None and not 0 < self.ties_density <= 1:
            raise ValueError(f"ties_density: must be in (0, 1], got {self.ties_density}")
        if not self.reg_to_init >= 0:
            raise ValueError(f"reg_to_init: must be >= 0, got {self.reg_to_init}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience: must be >= 1 or null, got {self.patience}")


def _outputs_logits(outputs, batch: dict) -> torch.Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise TypeError(
            f"the model's outputs ({type(outputs).__name__}) have no .logits (an encoder such as BertModel?): give "
            "EntropyTask(logits=...) a function (outputs, batch) -> (B, C) logits, e.g. merging.pooled_logits(task_head)"
        )
    return logits


@dataclass
class EntropyTask:
    """Unlabelled data of one task and how to read its predictions (for every objective; the
    name is historical).

    Give the data one of two ways:

    - ``batches``: model keyword inputs (``input_ids``, ``attention_mask``...), any iterable —
      a list, a generator (even an endless one), a DataLoader. It is read once, lazily; its
      batches are kept and cycled over the steps (in order, or shuffled per pass with
      ``AdaMergingConfig.shuffle``).
    - ``inputs``: one mapping of (N, ...) tensors (e.g. a tokenizer's output over all texts with
      padding); AdaMerging cuts it into ``AdaMergingConfig.batch_size`` rows per step, dropping
      the padding columns a batch does not need.

    ``logits``: ``(model outputs, batch) -> logits``, (B, C) for a classifier (this task's frozen
    head, e.g. :func:`pooled_logits` over an encoder's hidden states) or (B, T, V) for a causal
    LM (positions weighted by the batch's ``attention_mask``). Default: ``outputs.logits``.
    """

    name: str
    batches: Iterable[Mapping[str, torch.Tensor]] | None = None
    logits: Callable[[object, dict], torch.Tensor] | None = None
    inputs: Mapping[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if (self.batches is None) == (self.inputs is None):
            raise ValueError(f"task {self.name!r}: give exactly one of batches (an iterable of batches) or inputs (all rows at once)")
        if self.inputs is not None:
            sizes = {k: len(v) for k, v in self.inputs.items() if isinstance(v, torch.Tensor) and v.dim()}
            if not sizes or len(set(sizes.values())) != 1 or len(sizes) != len(self.inputs) or not next(iter(sizes.values())):
                raise ValueError(f"task {self.name!r}: inputs must be tensors with the same number of rows (>= 1), got {sizes}")
        if self.logits is None:
            self.logits = _outputs_logits


def pooled_logits(head: torch.nn.Module, pooling: Literal["mean", "cls"] = "mean") -> Callable[[object, dict], torch.Tensor]:
    """``EntropyTask.logits`` for an encoder with a task head on its pooled output: ``head``
    applied to the mean of ``last_hidden_state`` over the batch's ``attention_mask`` (``"mean"``,
    sentence-transformers' pooling) or to the first token's state (``"cls"``)."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling: {pooling!r} is not allowed; expected 'mean' or 'cls'")

    def logits(outputs, batch: dict) -> torch.Tensor:
        hidden = outputs.last_hidden_state
        if pooling == "cls":
            return head(hidden[:, 0])
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))

    return logits


def entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the last dim; ``mask`` (B, T) weights positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return _masked_mean(-(logp.exp() * logp).sum(dim=-1), mask)


def agreement(logits: torch.Tensor, target: tuple, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(target ‖ softmax(logits)) in nats; ``target`` from :func:`_soft_targets`."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, index = target
    own = logp if index is None else logp.gather(-1, index)
    return _masked_mean((values.exp() * (values - own)).sum(-1), mask)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or values.dim() == 1:
        return values.mean()
    mask = mask.to(device=values.device, dtype=values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _soft_targets(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A task model's predictions to agree with: (log-probabilities, None) over up to 1024 classes,
    else (its top ``TEACHER_TOP_K`` log-probabilities renormalised, their indices)."""
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    if logp.shape[-1] <= 1024:
        return logp, None
    values, index = logp.topk(TEACHER_TOP_K, dim=-1)
    return torch.log_softmax(values, dim=-1), index


def block_of(name: str) -> str:
    """Coefficient row of a tensor at ``"block"`` granularity: the name up to its first numeric
    component (``encoder.layer.3.attention.self.query.weight`` -> ``encoder.layer.3``), else its
    module (``embeddings.word_embeddings.weight`` -> ``embeddings.word_embeddings``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def _row_key(name: str, granularity: str) -> str:
    return name if granularity == "layer" else block_of(name) if granularity == "block" else "all"


@dataclass
class AdaMergingResult:
    """Learned (clamped) coefficients: ``coefficients[r, k]`` for row r (a tensor name, a block
    or ``"all"``) and task k. ``entropy``: the objective summed over tasks before each step
    (nats; the entropy, or the agreement KL — the field keeps its historical name) and
    ``task_entropy[s][k]`` task k's share of it; ``init``: the starting λ (the one found by
    ``init="search"``)."""

    coefficients: torch.Tensor
    rows: list[str]
    task_names: list[str]
    task_vectors: list[TaskVector]
    entropy: list[float]
    config: AdaMergingConfig
    task_entropy: list[list[float]] = field(default_factory=list)
    init: float | None = None

    def weights_for(self, name: str) -> list[float]:
        """λ_k of every task for the parameter ``name`` (zeros for a tensor no coefficient covers)."""
        row = self._row_of.get(_row_key(name, self.config.granularity))
        return [0.0] * len(self.task_names) if row is None else self.coefficients[row].tolist()

    @functools.cached_property
    def _row_of(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.rows)}

    def merge(self, base, task_vectors: Sequence[TaskVector] | None = None, *, saved_names: dict[str, list[str]] | None = None,
              **merge_kwargs):
        """θ_0 + Σ_k λ_k τ_k with the learned λ, streamed by :func:`merging.merge` like any merge.

        Returns what :func:`merging.merge` returns: with ``out=``, the ``Path`` of the written
        model folder (coefficients in its card, ``adamerging_coefficients.json`` and ``.png``);
        without, a dict tensor name -> merged tensor.

        ``task_vectors``: the same task vectors over ``base``'s tensor names (default: the ones
        learned on). ``saved_names``: module parameter name -> its names in ``base``'s files
        (:func:`modular.loading.saved_tensor_names`), when those differ (e.g. fused MoE experts).
        """
        from .engine import merge

        module_name = {saved: name for name, on_disk in (saved_names or {}).items() for saved in on_disk}

        def coefficient_of(tensor: str) -> list[float]:
            return self.weights_for(module_name.get(tensor, tensor))
        card = {"AdaMerging coefficients": self.markdown_table(), **(merge_kwargs.pop("card", None) or {})}
        return merge("task_arithmetic", base, task_vectors or self.task_vectors, weights=coefficient_of, card=card,
                     write_extra=self._write_files, **merge_kwargs)

    def _write_files(self, folder: Path) -> None:
        self.save_json(folder / "adamerging_coefficients.json")
        self.plot(folder / "adamerging_coefficients.png")

    def to_json(self) -> dict:
        return {
            "tasks": self.task_names, "granularity": self.config.granularity, "objective": self.config.objective,
            "rows": self.rows, "coefficients": self.coefficients.tolist(), "init": self.init, "entropy": self.entropy,
            "task_entropy": self.task_entropy, "config": dataclasses.asdict(self.config),
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2))

    def markdown_table(self) -> str:
        head = "| tensor | " + " | ".join(self.task_names) + " |\n|---|" + "---|" * len(self.task_names)
        rows = [f"| `{r}` | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for r, vals in zip(self.rows, self.coefficients.tolist())]
        return "\n".join([head, *rows])

    def plot(self, path: str | os.PathLike) -> Path:
        """Heatmap of λ (rows × tasks) beside the objective's curve, as a PNG."""
        from modular.plotting import pyplot

        plt = pyplot()

        height = max(4.0, min(0.12 * len(self.rows) + 2.0, 30.0))
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, height), gridspec_kw={"width_ratios": [1, 1.3]})
        im = ax.imshow(self.coefficients.float().cpu().numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(self.task_names)), self.task_names, rotation=45, ha="right")
        ax.set_ylabel({"layer": "parameter tensor", "block": "block"}.get(self.config.granularity, ""))
        ax.set_yticks([] if len(self.rows) > 40 else range(len(self.rows)), [] if len(self.rows) > 40 else self.rows, fontsize=6)
        ax.set_title(f"AdaMerging λ ({self.config.granularity}-wise)")
        fig.colorbar(im, ax=ax)
        ax2.plot(self.entropy)
        ax2.set_xlabel("step")
        ax2.set_ylabel(f"Σ_k {self.config.objective} (nats)")
        ax2.set_title(self.config.objective)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)


class _TaskBatches:
    """One task's batches by step: an iterable read once, lazily, then cycled from what it gave
    (shuffled per pass with ``config.shuffle``), or ``inputs`` cut into ``config.batch_size`` rows."""

    def __init__(self, task: EntropyTask, k: int, config: AdaMergingConfig):
        self.name, self.shuffle, self.seed = task.name, config.shuffle, f"{config.seed}:{k}"
        if task.inputs is not None:
            self.kept = _cut_rows(task.inputs, config.batch_size, random.Random(self.seed) if config.shuffle else None)
            self.source = None
        elif isinstance(task.batches, Sequence):
            self.kept, self.source = list(task.batches), None
        else:
            self.kept, self.source = [], iter(task.batches)
        self._orders: dict[int, list[int]] = {}
        self[self.index(0)]  # bad or missing data: one error before any work

    def index(self, step: int) -> int:
        """Which kept batch ``step`` uses (drawing the next one while the iterable lasts)."""
        if self.source is not None:
            if step < len(self.kept):
                return step
            for batch in self.source:
                self.kept.append(batch)
                return len(self.kept) - 1
            self.source = None
        if not self.kept:
            raise ValueError(f"task {self.name!r}: no batches (AdaMerging needs unlabelled inputs for every task)")
        passes, position = divmod(step, len(self.kept))
        if not self.shuffle:
            return position
        if passes not in self._orders:
            order = list(range(len(self.kept)))
            random.Random(f"{self.seed}:{passes}").shuffle(order)
            self._orders = {passes: order}
        return self._orders[passes][position]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.kept[index]
        if not isinstance(batch, Mapping) or not batch or not all(isinstance(v, torch.Tensor) for v in batch.values()):
            raise TypeError(f"task {self.name!r}: batch {index} is {type(batch).__name__}; expected a mapping of model inputs (tensors)")
        return dict(batch)


def _cut_rows(inputs: Mapping[str, torch.Tensor], size: int, rng: random.Random | None) -> list[dict[str, torch.Tensor]]:
    """``inputs`` in batches of ``size`` rows (shuffled first when ``rng``); trailing columns no
    row of a batch attends to (right padding) are dropped from its (B, T) tensors."""
    rows = len(next(iter(inputs.values())))
    order = list(range(rows))
    if rng is not None:
        rng.shuffle(order)
    mask = inputs.get("attention_mask")
    batches = []
    for start in range(0, rows, size):
        index = torch.tensor(order[start : start + size])
        batch = {k: v[index] for k, v in inputs.items()}
        if mask is not None and mask.dim() == 2:
            used = batch["attention_mask"].any(0).nonzero()
            width = int(used[-1]) + 1 if len(used) else 1
            batch = {k: v[:, :width] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v for k, v in batch.items()}
        batches.append(batch)
    return batches


def _fuse(batches: Sequence[dict]) -> tuple[dict, list[slice]] | None:
    """The K batches as one, or None. Tensors are concatenated along dim 0; (B, T) tensors of
    right-padded batches (``attention_mask`` rows of ones then zeros) are padded to the longest T
    with zeros (masked positions)."""
    keys = set(batches[0])
    if any(set(b) != keys for b in batches) or not all(isinstance(v, torch.Tensor) and v.dim() >= 1 for b in batches for v in b.values()):
        return None
    sizes = [len(next(iter(b.values()))) for b in batches]
    if any(len(v) != n for b, n in zip(batches, sizes) for v in b.values()):
        return None
    width = None
    for key in keys:
        if len({tuple(b[key].shape[1:]) for b in batches}) == 1:
            continue
        masks = [b.get("attention_mask") for b in batches]
        ragged = all(b[key].dim() == 2 for b in batches) and all(m is not None and m.dim() == 2 for m in masks)
        if not ragged or any((m[:, 1:] > m[:, :-1]).any() for m in masks):  # not right-padded
            return None
        width = max(b[key].shape[1] for b in batches)
    fused = {}
    for key in keys:
        parts = [b[key] if width is None or b[key].dim() != 2 or b[key].shape[1] == width
                 else torch.nn.functional.pad(b[key], (0, width - b[key].shape[1])) for b in batches]
        fused[key] = torch.cat(parts)
    starts = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    return fused, [slice(starts[k], starts[k + 1]) for k in range(len(sizes))]


def _rows_of(outputs, rows: slice, total: int):
    """``outputs`` of a fused forward restricted to one task's rows (tensors with ``total`` rows)."""
    if isinstance(outputs, torch.Tensor):
        return outputs[rows] if outputs.dim() and len(outputs) == total else outputs
    if isinstance(outputs, Mapping):  # transformers' ModelOutput or a dict
        return type(outputs)(**{k: _rows_of(v, rows, total) for k, v in outputs.items()})
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_rows_of(v, rows, total) for v in outputs)
    raise TypeError(f"cannot split a fused forward's output of type {type(outputs).__name__}")


def _check_inputs(model: torch.nn.Module, task_vectors: Sequence[TaskVector], tasks: Sequence[EntropyTask]) -> list[str]:
    if not tasks:
        raise ValueError("adamerging needs unlabelled data: give one EntropyTask per task vector")
    if len(tasks) != len(task_vectors):
        raise ValueError(f"adamerging: {len(task_vectors)} task vectors but {len(tasks)} tasks; give one task per task vector")
    params = dict(model.named_parameters())
    names = [n for n in params if any(n in tv for tv in task_vectors)]
    stray = sorted({n for tv in task_vectors for n in tv.names() if n not in params})
    if stray:
        raise KeyError(f"adamerging: task-vector tensors that are not parameters of the model: {stray[:5]}")
    bad = [n for tv in task_vectors for n in tv.names() if tuple(tv.shapes[n]) != tuple(params[n].shape)]
    if bad:
        raise ValueError(f"adamerging: task-vector shapes differ from the model's for {bad[:5]}")
    return names


def _deltas_of(param: torch.nn.Parameter, name: str, task_vectors: Sequence[TaskVector]) -> list[torch.Tensor]:
    """The K deltas of one parameter in its dtype and on its device (zeros where a task leaves it)."""
    return [tv.get(name).to(device=param.device, dtype=param.dtype) if name in tv else torch.zeros_like(param, requires_grad=False)
            for tv in task_vectors]


def _deltas_in_place(params: Mapping[str, torch.nn.Parameter], names: Sequence[str], task_vectors: Sequence[TaskVector]):
    """Per parameter, its K deltas, read tensor by tensor (one float32 delta at a time; no stacked copy)."""
    return {n: _deltas_of(params[n], n, task_vectors)
            for n in tqdm(names, desc="task vectors", disable=len(names) < 200, leave=False)}


def _return_freed_blocks_to_the_os() -> None:
    """glibc: serve every block above 64 KiB by mmap from now on, so the per-module deltas and
    merged weights a streamed step frees go back to the OS at once. With glibc's adaptive
    threshold they are kept in the heap, fragmented: 8× the RSS above the model, measured
    (benchmarks/RESULTS.md, "AdaMerging memory at LLM scale"). Elsewhere, nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    except (OSError, AttributeError):
        pass


class _StreamedDeltas(Mapping):
    """Parameter name -> its K deltas, read from the task vectors on every lookup. The few last read
    are kept: backward re-forms a module's merged weight and then needs the same deltas for the
    coefficient gradient."""

    KEEP = 4  # parameters per module (weight, bias...) with room to spare

    def __init__(self, params: Mapping[str, torch.nn.Parameter], names: Sequence[str], task_vectors: Sequence[TaskVector]):
        self.params, self.names, self.task_vectors = params, list(names), list(task_vectors)
        self.known = set(self.names)
        self.recent: dict[str, list[torch.Tensor]] = {}
        _return_freed_blocks_to_the_os()

    def __getitem__(self, name: str) -> list[torch.Tensor]:
        if name not in self.recent:
            if len(self.recent) >= self.KEEP:
                del self.recent[next(iter(self.recent))]
            self.recent[name] = _deltas_of(self.params[name], name, self.task_vectors)
        return self.recent[name]

    def __contains__(self, name: object) -> bool:
        return name in self.known  # never a read

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def adamerge(
    model, task_vectors: Sequence[TaskVector], tasks: Sequence[EntropyTask],
    config: AdaMergingConfig | None = None, *, progress: bool = True,
    callback: Callable[[int, AdaMergingResult], None] | None = None, **config_kwargs,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients for ``task_vectors`` over ``model`` (θ_0: a module, left
    unchanged, or a model folder, loaded in its own dtype), one :class:`EntropyTask` per task
    vector. Options: ``config`` or its fields as keywords. Returns an :class:`AdaMergingResult`;
    ``result.merge(base, out=...)`` writes the merged model.

    ``callback(step, snapshot)`` gets, after each step, a result holding the coefficients that
    step evaluated (their objective is ``snapshot.entropy[-1]``), e.g. to track labelled accuracy
    along the run with ``snapshot.merge(base)``.
    """
    config = dataclasses.replace(config, **config_kwargs) if config is not None else AdaMergingConfig(**config_kwargs)
    if isinstance(model, (str, os.PathLike)):
        from modular import load_model

        model = load_model(model)
    if config.ties_density is not None:
        task_vectors = ties_processed(task_vectors, density=config.ties_density)
    names = _check_inputs(model, task_vectors, tasks)
    if not names:
        raise ValueError("adamerging: the task vectors change no parameter of the model (no tensor name in common)")
    data = [_TaskBatches(task, k, config) for k, task in enumerate(tasks)]
    params = dict(model.named_parameters())
    rows = list(dict.fromkeys(_row_key(n, config.granularity) for n in names))
    row_index = {r: i for i, r in enumerate(rows)}
    deltas = (_StreamedDeltas if config.stream_task_vectors else _deltas_in_place)(params, names, task_vectors)
    merger = JitMerge(model, deltas, {n: row_index[_row_key(n, config.granularity)] for n in names})
    was_training, grad_flags = model.training, {n: p.requires_grad for n, p in params.items()}
    model.eval().requires_grad_(False)
    try:
        run = _Run(model, merger, tasks, data, config, len(rows))
        return run.optimise(rows, list(task_vectors), progress, callback)
    finally:
        for n, p in params.items():
            p.requires_grad_(grad_flags[n])
        model.train(was_training)


class _Run:
    """One AdaMerging optimisation: the objective's terms, the (fused) forwards, the steps."""

    def __init__(self, model, merger: JitMerge, tasks: Sequence[EntropyTask], data: list[_TaskBatches],
                 config: AdaMergingConfig, num_rows: int):
        self.model, self.merger, self.tasks, self.data, self.config = model, merger, tasks, data, config
        self.shape = (num_rows, len(tasks))
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.fuse = config.fuse_tasks and not config.own_task_gradient
        self.targets: dict[tuple[int, int], tuple] = {}

    def target(self, k: int, index: int) -> tuple:
        """Task model k's predictions on batch ``index`` of task k (θ_0 + τ_k; computed once)."""
        if (k, index) not in self.targets:
            batch = self.data[k][index]
            onehot = torch.zeros(self.shape, device=self.device)
            onehot[:, k] = 1
            with torch.no_grad(), self.merger(onehot):
                self.targets[k, index] = _soft_targets(self.tasks[k].logits(self.model(**batch), batch))
        return self.targets[k, index]

    def term(self, k: int, index: int, logits: torch.Tensor) -> torch.Tensor:
        mask = self.data[k][index].get("attention_mask")
        if logits.dim() == 3 and mask is not None and logits.shape[1] > mask.shape[1]:
            logits = logits[:, : mask.shape[1]]  # fused with a longer batch: the positions past this one are padding
        if self.config.objective == "entropy":
            value = entropy(logits, mask)
        else:
            value = agreement(logits, self.target(k, index), mask)
        return value / math.log(logits.shape[-1]) if self.config.normalize else value

    def logits(self, lam: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Each task's logits on its batch under coefficients ``lam`` (one fused forward when possible)."""
        batches = [d[i] for d, i in zip(self.data, indices)]
        fused = _fuse(batches) if self.fuse else None
        if fused is not None:
            inputs, slices = fused
            with self.merger(lam):
                outputs = self.model(**inputs)
            try:
                return [t.logits(_rows_of(outputs, sl, slices[-1].stop), {k: v[sl] for k, v in inputs.items()})
                        for t, sl in zip(self.tasks, slices)]
            except TypeError:
                self.fuse = False  # an output type that cannot be split: one forward per task from now on
        out = []
        for k, (task, batch) in enumerate(zip(self.tasks, batches)):
            with self.merger(_own_column(lam, k) if self.config.own_task_gradient else lam):
                out.append(task.logits(self.model(**batch), batch))
        return out

    def search_init(self) -> float:
        """The uniform λ of ``init_grid`` with the lowest objective on every task's first batch."""
        scores = {}
        with torch.no_grad():
            for value in self.config.init_grid:
                lam = torch.full(self.shape, float(value), device=self.device)
                scores[value] = sum(self.term(k, 0, x).item() for k, x in enumerate(self.logits(lam, [0] * len(self.tasks))))
        return float(min(self.config.init_grid, key=lambda v: (scores[v], v)))

    def optimise(self, rows: list[str], task_vectors: list[TaskVector], progress: bool, callback) -> AdaMergingResult:
        config, names = self.config, [t.name for t in self.tasks]
        init = self.search_init() if config.init == "search" else float(config.init)
        raw = torch.full(self.shape, init, device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([raw], lr=config.lr, betas=tuple(config.betas))

        def coefficients() -> torch.Tensor:
            return raw.clamp(*config.clamp) if config.clamp is not None else raw

        def result(lam: torch.Tensor) -> AdaMergingResult:
            return AdaMergingResult(lam.cpu(), rows, names, task_vectors, history, config, per_task, init)

        history: list[float] = []
        per_task: list[list[float]] = []
        best, since_best = math.inf, 0
        bar = tqdm(range(config.steps), desc=f"AdaMerging ({config.granularity}-wise, {config.objective})", disable=not progress)
        for step in bar:
            lam = coefficients()
            indices = [d.index(step) for d in self.data]
            losses = [self.term(k, i, x) for k, (i, x) in enumerate(zip(indices, self.logits(lam, indices)))]
            total = sum(losses)
            evaluated = lam.detach().clone()  # clamp=None: lam is raw itself, which the step changes
            loss = total + config.reg_to_init * ((lam - init) ** 2).sum() if config.reg_to_init else total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if config.clamp is not None:
                with torch.no_grad():
                    raw.clamp_(*config.clamp)
            history.append(total.item())
            per_task.append([h.item() for h in losses])
            if callback is not None:
                callback(step, result(evaluated))
            bar.set_postfix({config.objective: f"{history[-1]:.4f}"})
            if history[-1] < best * (1 - config.min_delta):
                best, since_best = history[-1], 0
            else:
                since_best += 1
            if config.patience is not None and since_best >= config.patience:
                break
        return result(coefficients().detach().clone())


def _own_column(lam: torch.Tensor, k: int) -> torch.Tensor:
    """Same values as ``lam``; gradient flows only into column k."""
    frozen = lam.detach()
    keep = torch.zeros(lam.shape[1], dtype=lam.dtype, device=lam.device)
    keep[k] = 1
    return frozen + (lam - frozen) * keep


def adamerge_folders(
    base: str | os.PathLike, finetuned: Mapping[str, str | os.PathLike], tasks: Sequence[EntropyTask],
    config: AdaMergingConfig | None = None, *, out: str | os.PathLike | None = None, progress: bool = True, **merge_kwargs,
) -> AdaMergingResult:
    """AdaMerging over checkpoint folders: learn coefficients for ``finetuned`` (label -> folder)
    over ``base`` (loaded in its own dtype), then (with ``out``) write the merged model, streamed
    from the folders by :func:`merging.merge` (``merge_kwargs``: its options, e.g.
    ``tokenizer_source``). Returns the :class:`AdaMergingResult`.

    Memory: the base model plus the K deltas in its dtype, read tensor by tensor from the
    folders (no second full model), when every parameter is saved as one tensor (with
    ``stream_task_vectors``, the base model alone: the deltas are re-read when needed); under
    transformers' weight conversions that are not renames (fused MoE experts) the fine-tuned
    models are loaded as modules to read their parameters, (1 + 2K)× one model.
    """
    from modular import load_model
    from modular.checkpoint import check_output_dir
    from modular.loading import saved_tensor_names

    if out is not None:  # before the coefficients are learned, not after
        check_output_dir(out, force=merge_kwargs.get("force", False),
                         inputs=[base, *finetuned.values(), merge_kwargs.get("tokenizer_source")])
    model = load_model(base)
    params = dict(model.named_parameters())
    saved = saved_tensor_names(model, params)
    on_files = [TaskVector.from_models(base, path, label=label) for label, path in finetuned.items()]
    if all(len(on_disk) == 1 for on_disk in saved.values()):
        task_vectors = [_by_parameter(tv, {n: d[0] for n, d in saved.items()}) for tv in on_files]
    else:
        task_vectors = [_parameter_deltas(model, _backbone(load_model(path, dtype=model.dtype), model), label)
                        for label, path in finetuned.items()]
    result = adamerge(model, task_vectors, tasks, config or AdaMergingConfig(), progress=progress)
    if out is not None:
        result.merge(base, on_files, saved_names=saved, out=out, progress=progress, **merge_kwargs)
    return result


def _backbone(finetuned: torch.nn.Module, base: torch.nn.Module) -> torch.nn.Module:
    """``finetuned``'s backbone when it is ``base``'s class with a head (a classifier fine-tuned
    from a saved backbone; heads are not merged), else ``finetuned``."""
    inner = finetuned.base_model
    return inner if inner is not finetuned and type(inner) is type(base) else finetuned


def _by_parameter(on_files: TaskVector, on_disk: Mapping[str, str]) -> TaskVector:
    """A task vector over checkpoint tensor names seen under the module parameters' names
    (``on_disk``: parameter name -> its tensor in the files); read lazily, tensor by tensor."""
    missing = sorted(d for d in on_disk.values() if d not in on_files)
    if missing:
        raise KeyError(f"{on_files.label}: the fine-tuned model lacks parameter tensors of the base, e.g. {missing[:5]}")
    return TaskVector({n: on_files.shape(d) for n, d in on_disk.items()}, lambda n: on_files.get(on_disk[n]), label=on_files.label)


def _parameter_deltas(base: torch.nn.Module, finetuned: torch.nn.Module, label: str) -> TaskVector:
    """θ_ft − θ_0 over parameters, from a loaded fine-tuned module (kept while the task vector is)."""
    base_params = dict(base.named_parameters())
    ft_params = dict(finetuned.named_parameters())
    for name, param in ft_params.items():
        if name not in base_params or base_params[name].shape != param.shape:
            raise ValueError(f"{label}: parameter {name!r} {tuple(param.shape)} has no match of that shape in the base model")
    return TaskVector({n: p.shape for n, p in ft_params.items()},
                      lambda n: ft_params[n].detach().float() - base_params[n].detach().float(), label=label)

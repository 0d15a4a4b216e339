"""AdaMerging (Yang et al., ICLR 2024): learn merging coefficients by entropy minimisation.

θ = θ_0 + Σ_k λ_k τ_k (task-wise: one λ per task) or θ^n = θ_0^n + Σ_k λ_k^n τ_k^n
(layer-wise: one λ per task and **parameter tensor** n, as the official code). The loss is
Σ_k H(f_k(x; θ)) over unlabelled inputs x of task k: the mean Shannon entropy of task k's
predictions (its own frozen head for classifiers; the next-token distribution at every
non-padded position for causal LMs). AdaMerging++ = the same over TIES-processed task
vectors (``ties_density``).

Defaults follow the official settings (``docs/methods.md``, "AdaMerging"): λ initialised at 0.3, clamped to [0, 1]
at every use and projected back after every step (a clamped λ gets no gradient and stays put),
Adam lr 1e-3 betas (0.9, 0.999), 500 steps, losses summed over tasks, one backward per step.
The merged parameters are recomputed each step with ``torch.func.functional_call`` over
θ_0 + Σ λ τ — the model itself is never copied or modified.

The paper's objective buys confidence, not accuracy: unconstrained, λ drifts past the
task-arithmetic optimum. Knobs against it: ``clamp``, ``reg_to_init`` (L2 pull of λ toward its
initial value), ``steps`` and early stopping when the entropy curve flattens
(``patience``/``min_delta``), ``own_task_gradient``. The method needs heads whose entropy tracks
their accuracy. On our text benchmark (MiniLM, frozen zero-shot heads), heads with CLIP's logit
scale 100 are overconfident on the base encoder already, and AdaMerging switched their task
vectors off (a tie with TIES); with each head's scale calibrated on the base encoder
(temperature scaling), layer-wise AdaMerging beats task arithmetic and TIES
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from modular.checkpoint import atomic_write_text

from .task_vector import TaskVector, ties_processed

__all__ = ["AdaMergingConfig", "AdaMergingResult", "EntropyTask", "adamerge", "adamerge_folders", "entropy"]


@dataclass
class AdaMergingConfig:
    """Knobs of AdaMerging. ``granularity``: ``"layer"`` (one λ per task per parameter tensor)
    or ``"task"`` (one λ per task). ``clamp``: ``[lo, hi]`` or ``None`` (FusionBench's default).
    ``ties_density``: set (official 0.2) for AdaMerging++. ``reg_to_init``: weight of
    Σ (λ − init)². ``patience``: stop once the summed entropy has not improved by a relative
    ``min_delta`` for that many steps (``None``: run all ``steps``). ``own_task_gradient``:
    task k's entropy updates only its own coefficients λ_k (not in the paper): with the summed
    objective a confident task can lower its entropy by switching the other task vectors off,
    the collapse measured on text tasks (benchmarks/RESULTS.md: it lifts layer-wise AdaMerging from
    0.727 to 0.749 there, still short of TIES's 0.751)."""

    granularity: Literal["layer", "task"] = "layer"
    init: float = 0.3
    clamp: list[float] | None = field(default_factory=lambda: [0.0, 1.0])
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    steps: int = 500
    ties_density: float | None = None
    reg_to_init: float = 0.0
    patience: int | None = None
    min_delta: float = 1e-3
    own_task_gradient: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in ("layer", "task"):
            raise ValueError(f"granularity: {self.granularity!r} is not allowed; expected 'layer' or 'task'")
        if self.clamp is not None and (len(self.clamp) != 2 or self.clamp[0] > self.clamp[1]):
            raise ValueError(f"clamp: expected [lo, hi] with lo <= hi or null, got {self.clamp!r}")
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.ties_density is not None and not 0 < self.ties_density <= 1:
            raise ValueError(f"ties_density: must be in (0, 1], got {self.ties_density}")
        if self.reg_to_init < 0:
            raise ValueError(f"reg_to_init: must be >= 0, got {self.reg_to_init}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience: must be >= 1 or null, got {self.patience}")


@dataclass
class EntropyTask:
    """Unlabelled data of one task and how to read its predictions.

    ``batches``: model keyword inputs (``input_ids``, ``attention_mask``...), cycled over steps.
    ``logits``: ``(model outputs, batch) -> logits``, (B, C) for a classifier (e.g. this task's
    frozen head on the pooled output) or (B, T, V) for a causal LM (default: ``outputs.logits``;
    positions are weighted by the batch's ``attention_mask``).
    """

    name: str
    batches: Sequence[dict[str, torch.Tensor]]
    logits: Callable[[object, dict], torch.Tensor] = lambda outputs, batch: outputs.logits


def entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the last dim; ``mask`` (B, T) weights positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1)
    if mask is None or h.dim() == 1:
        return h.mean()
    mask = mask.to(h.dtype)
    return (h * mask).sum() / mask.sum().clamp_min(1)


@dataclass
class AdaMergingResult:
    """Learned (clamped) coefficients: ``coefficients[r, k]`` for row r (a tensor name, or
    ``"all"`` task-wise) and task k; ``entropy`` is the summed entropy before each step and
    ``task_entropy[s][k]`` task k's share of it (nats)."""

    coefficients: torch.Tensor
    rows: list[str]
    task_names: list[str]
    task_vectors: list[TaskVector]
    entropy: list[float]
    config: AdaMergingConfig
    task_entropy: list[list[float]] = field(default_factory=list)

    def weights_for(self, name: str) -> list[float]:
        """λ_k of every task for the parameter ``name`` (zeros for a tensor no coefficient covers)."""
        if self.config.granularity == "task":
            return self.coefficients[0].tolist()
        row = self._row_of.get(name)
        return [0.0] * len(self.task_names) if row is None else self.coefficients[row].tolist()

    @functools.cached_property
    def _row_of(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.rows)}

    def merge(self, base, task_vectors: Sequence[TaskVector] | None = None, *, saved_names: dict[str, list[str]] | None = None,
              **merge_kwargs):
        """θ_0 + Σ_k λ_k τ_k with the learned λ, streamed by :func:`merging.merge` like any merge
        (``out=`` writes a model folder with the coefficients in its card, JSON and plot).

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
            "tasks": self.task_names, "granularity": self.config.granularity, "rows": self.rows,
            "coefficients": self.coefficients.tolist(), "entropy": self.entropy,
            "task_entropy": self.task_entropy, "config": dataclasses.asdict(self.config),
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2))

    def markdown_table(self) -> str:
        head = "| tensor | " + " | ".join(self.task_names) + " |\n|---|" + "---|" * len(self.task_names)
        rows = [f"| `{r}` | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for r, vals in zip(self.rows, self.coefficients.tolist())]
        return "\n".join([head, *rows])

    def plot(self, path: str | os.PathLike) -> Path:
        """Heatmap of λ (rows × tasks) beside the entropy curve, as a PNG."""
        from modular.plotting import pyplot

        plt = pyplot()

        height = max(4.0, min(0.12 * len(self.rows) + 2.0, 30.0))
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, height), gridspec_kw={"width_ratios": [1, 1.3]})
        im = ax.imshow(self.coefficients.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(self.task_names)), self.task_names, rotation=45, ha="right")
        ax.set_ylabel("parameter tensor" if self.config.granularity == "layer" else "")
        ax.set_yticks([] if len(self.rows) > 40 else range(len(self.rows)), [] if len(self.rows) > 40 else self.rows, fontsize=6)
        ax.set_title(f"AdaMerging λ ({self.config.granularity}-wise)")
        fig.colorbar(im, ax=ax)
        ax2.plot(self.entropy)
        ax2.set_xlabel("step")
        ax2.set_ylabel("Σ_k entropy (nats)")
        ax2.set_title("entropy")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)


def _check_inputs(model: torch.nn.Module, task_vectors: Sequence[TaskVector], tasks: Sequence[EntropyTask]) -> list[str]:
    if not tasks or any(len(t.batches) == 0 for t in tasks):
        raise ValueError("adamerging needs unlabelled data: give each task at least one batch of inputs (EntropyTask.batches)")
    if len(tasks) != len(task_vectors):
        raise ValueError(f"adamerging: {len(task_vectors)} task vectors but {len(tasks)} tasks; give one task per task vector")
    params = dict(model.named_parameters())
    names = [n for n in params if any(n in tv for tv in task_vectors)]
    stray = sorted({n for tv in task_vectors for n in tv.names() if n not in params})
    if stray:
        raise KeyError(f"adamerging: task-vector tensors that are not parameters of the model: {stray[:5]}")
    bad = [n for tv in task_vectors for n in tv.names() if tv.shapes[n] != params[n].shape]
    if bad:
        raise ValueError(f"adamerging: task-vector shapes differ from the model's for {bad[:5]}")
    return names


def adamerge(
    model: torch.nn.Module, task_vectors: Sequence[TaskVector], tasks: Sequence[EntropyTask],
    config: AdaMergingConfig | None = None, *, progress: bool = True,
    callback: Callable[[int, AdaMergingResult], None] | None = None, **config_kwargs,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients for ``task_vectors`` over ``model`` (= θ_0, left unchanged).

    ``callback(step, snapshot)`` gets, after each step, a result holding the coefficients that
    step evaluated (their entropy is ``snapshot.entropy[-1]``), e.g. to track labelled accuracy
    along the run with ``snapshot.merge(base)``.

    Memory: the K task vectors are stacked per tensor (K × the merged tensors' size).
    """
    config = config or AdaMergingConfig(**config_kwargs)
    if config.ties_density is not None:
        task_vectors = ties_processed(task_vectors, density=config.ties_density)
    names = _check_inputs(model, task_vectors, tasks)
    model.eval()
    theta0 = {n: p.detach() for n, p in model.named_parameters() if n in names}
    taus = {n: torch.stack([tv.get(n) if n in tv else torch.zeros(theta0[n].shape) for tv in task_vectors]).to(theta0[n].dtype) for n in names}
    rows = names if config.granularity == "layer" else ["all"]
    task_names = [t.name for t in tasks]
    raw = torch.full((len(rows), len(task_vectors)), config.init, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=config.lr, betas=tuple(config.betas))

    def coefficients() -> torch.Tensor:
        return raw.clamp(*config.clamp) if config.clamp is not None else raw

    def merged_params(lam: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: theta0[n] + torch.tensordot(lam[i if len(rows) > 1 else 0], taus[n], dims=1) for i, n in enumerate(names)}

    def own_column(lam: torch.Tensor, k: int) -> torch.Tensor:
        """Same values as ``lam``; gradient flows only into column k."""
        frozen = lam.detach()
        return frozen + (lam - frozen) * torch.nn.functional.one_hot(torch.tensor(k), lam.shape[1]).to(lam.dtype)

    history: list[float] = []
    per_task: list[list[float]] = []
    best, since_best = math.inf, 0
    bar = tqdm(range(config.steps), desc=f"AdaMerging ({config.granularity}-wise)", disable=not progress)
    for step in bar:
        lam = coefficients()
        shared = None if config.own_task_gradient else merged_params(lam)
        losses = []
        for k, task in enumerate(tasks):
            batch = task.batches[step % len(task.batches)]
            params = shared if shared is not None else merged_params(own_column(lam, k))
            outputs = functional_call(model, params, args=(), kwargs=batch)
            losses.append(entropy(task.logits(outputs, batch), batch.get("attention_mask")))
        total = sum(losses)
        evaluated = lam.detach().clone()  # clamp=None: lam is raw itself, which the step changes
        loss = total + config.reg_to_init * ((lam - config.init) ** 2).sum() if config.reg_to_init else total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if config.clamp is not None:
            with torch.no_grad():
                raw.clamp_(*config.clamp)
        history.append(total.item())
        per_task.append([h.item() for h in losses])
        if callback is not None:
            callback(step, AdaMergingResult(evaluated, rows, task_names, list(task_vectors), history, config, per_task))
        bar.set_postfix(entropy=f"{history[-1]:.4f}")
        if history[-1] < best * (1 - config.min_delta):
            best, since_best = history[-1], 0
        else:
            since_best += 1
        if config.patience is not None and since_best >= config.patience:
            break
    return AdaMergingResult(coefficients().detach().clone(), rows, task_names, list(task_vectors), history, config, per_task)


def adamerge_folders(
    base: str | os.PathLike, finetuned: Mapping[str, str | os.PathLike], tasks: Sequence[EntropyTask],
    config: AdaMergingConfig, *, out: str | os.PathLike | None = None, progress: bool = True, **merge_kwargs,
) -> AdaMergingResult:
    """AdaMerging over checkpoint folders: learn coefficients for ``finetuned`` (label -> folder)
    over ``base`` on the loaded models, then (with ``out``) write the merged model, streamed from
    the folders by :func:`merging.merge` (``merge_kwargs``: its options, e.g. ``tokenizer_source``).

    Coefficients are learned per module parameter (what the forward differentiates); the merge
    maps them to the checkpoint's tensor names, which transformers' weight conversions may change.
    """
    from modular import load_model
    from modular.checkpoint import check_output_dir
    from modular.loading import saved_tensor_names

    if out is not None:  # before the coefficients are learned, not after
        check_output_dir(out, force=merge_kwargs.get("force", False),
                         inputs=[base, *finetuned.values(), merge_kwargs.get("tokenizer_source")])
    model = load_model(base, dtype=torch.float32)
    task_vectors = [_parameter_deltas(model, _backbone(load_model(path, dtype=torch.float32), model), label)
                    for label, path in finetuned.items()]
    result = adamerge(model, task_vectors, tasks, config, progress=progress)
    if out is not None:
        on_disk = [TaskVector.from_models(base, path, label=label) for label, path in finetuned.items()]
        result.merge(base, on_disk, saved_names=saved_tensor_names(model), out=out, progress=progress, **merge_kwargs)
    return result


def _backbone(finetuned: torch.nn.Module, base: torch.nn.Module) -> torch.nn.Module:
    """``finetuned``'s backbone when it is ``base``'s class with a head (a classifier fine-tuned
    from a saved backbone; heads are not merged), else ``finetuned``."""
    inner = finetuned.base_model
    return inner if inner is not finetuned and type(inner) is type(base) else finetuned


def _parameter_deltas(base: torch.nn.Module, finetuned: torch.nn.Module, label: str) -> TaskVector:
    """θ_ft − θ_0 over parameters, in memory (the base module's values are read once, here)."""
    base_params = dict(base.named_parameters())
    deltas = {}
    for name, param in finetuned.named_parameters():
        if name not in base_params or base_params[name].shape != param.shape:
            raise ValueError(f"{label}: parameter {name!r} {tuple(param.shape)} has no match of that shape in the base model")
        deltas[name] = param.detach().float() - base_params[name].detach().float()
    return TaskVector.from_tensors(deltas, label=label)

"""``acmize``: turn a pretrained model's dense FFNs into ACMs (METHODS.md "ACM"), and the
injection plumbing (rebuild on load, run-time threshold, phase-3 budget loss for ``Trainer``).

Conversion, one target FFN after another (bounded memory: one module's cache at a time):

1. cache the FFN's input and output on the calibration tokens (forward hooks; the forward is
   stopped right after the module, padding tokens are dropped); the base model is frozen and
   every module is cached from the *original* model (modules are independent, as in the paper):
   the ACMs are swapped in only after all of them are trained;
2. representation distillation: train the learners so that every prefix sum approximates the
   output (MSE averaged over the N prefixes, optionally per-token relative), Adam;
3. gate training: label each cached token with the paper's rule (:func:`gate_labels`) and fit
   the gate with cross-entropy.

Phase 3 (optional, end to end) is :func:`budget_loss`, a ``compute_loss_func`` for ``Trainer``,
or :func:`finetune_end_to_end`, the same loss in a plain loop (e.g. distilling a teacher's outputs).

Supported FFNs: llama-style gated MLPs (``gate_proj``/``up_proj``/``down_proj``/``act_fn``)
and BERT's split FFN (registry ``mlp`` = ``intermediate``, ``mlp_output`` = ``output.dense``):
there the ACM replaces ``intermediate`` and produces the whole FFN output, and ``output.dense``
becomes ``nn.Identity`` (BertOutput still applies dropout, the residual and LayerNorm).
The dense weights are dropped after conversion (the learners hold the same number of
parameters); there is no ``unwrap``: keep the original checkpoint to go back.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..registry import architecture_of
from ..surgery import InjectionError, find_modules, record_injection, register_injection, replace_module
from .config import ACMConfig
from .layer import ACMLayer, gate_labels

__all__ = ["ACM_KIND", "acm_modules", "acmize", "budget_loss", "compute_penalty", "finetune_end_to_end", "rebuild", "set_threshold"]

ACM_KIND = "acm"
_LABEL_CHUNK = 4096  # tokens per chunk when labelling the cache (bounds the (T, N+1, d) prefixes)


@dataclass
class _Site:
    """One dense FFN: where it is, and its weights in the ACM's layout (hidden units as rows)."""

    name: str  # module the ACM replaces
    output_name: str | None  # BERT: second half of the FFN, replaced by nn.Identity
    act_fn: nn.Module
    w_in: torch.Tensor  # (h, d)
    b_in: torch.Tensor | None
    w_up: torch.Tensor | None  # (h, d), gated FFNs only
    b_up: torch.Tensor | None
    w_out: torch.Tensor  # (h, d) = down/output weight transposed
    b_out: torch.Tensor | None  # (d,)

    @property
    def intermediate_size(self) -> int:
        return self.w_in.shape[0]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The dense FFN's hidden activations (T, h)."""
        h = self.act_fn(F.linear(x, self.w_in, self.b_in))
        return h * F.linear(x, self.w_up, self.b_up) if self.w_up is not None else h


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def _site(model: nn.Module, name: str, module: nn.Module, output_name: str | None) -> _Site:
    if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return _Site(name, None, module.act_fn, module.gate_proj.weight.detach(), _bias(module.gate_proj),
                     module.up_proj.weight.detach(), _bias(module.up_proj), module.down_proj.weight.detach().T,
                     _bias(module.down_proj))
    if output_name is not None and hasattr(module, "dense") and hasattr(module, "intermediate_act_fn"):
        out = model.get_submodule(output_name)
        if isinstance(module.dense, nn.Linear) and isinstance(out, nn.Linear):
            return _Site(name, output_name, module.intermediate_act_fn, module.dense.weight.detach(), _bias(module.dense),
                         None, None, out.weight.detach().T, _bias(out))
    raise InjectionError(
        f"acmize: {name} is a {type(module).__name__}, which ACM does not know how to convert; supported FFNs are "
        "llama-style gated MLPs (gate_proj/up_proj/down_proj/act_fn) and BERT-style split FFNs "
        "(intermediate.dense + output.dense)"
    )


def _sites(model: nn.Module, config: ACMConfig) -> list[_Site]:
    arch = architecture_of(model)  # unknown model_type: UnknownArchitectureError naming the registry
    if not arch.mlps():
        raise InjectionError(f"acmize: this {arch.model_type} model has no dense FFN to convert (ACM targets dense MLPs)")
    outputs = dict(zip([n for n, _ in arch.mlps()], [n for n, _ in arch.mlp_outputs()]))
    found = find_modules(model, role="mlp", pattern=config.target_pattern)
    return [_site(model, name, module, outputs.get(name)) for name, module in found]


def _new_layer(site: _Site, config: ACMConfig) -> ACMLayer:
    return ACMLayer(
        site.w_in.shape[1], config.num_learners, config.width_for(site.intermediate_size), site.act_fn,
        gated=site.w_up is not None, bias_in=site.b_in is not None, bias_out=site.b_out is not None,
        gate_hidden_size=config.gate_hidden_size, dense_intermediate_size=site.intermediate_size,
        threshold=config.threshold, gumbel_tau=config.gumbel_tau, dtype=site.w_in.dtype, device=site.w_in.device,
    )


# --------------------------------------------------------------------------- calibration cache


class _StopForward(Exception):
    """Raised by the caching hook: nothing after the target module is needed."""


def _batches(calibration_data: Iterable) -> list[dict]:
    batches = [b if isinstance(b, dict) else {"input_ids": b} for b in calibration_data]
    if not batches:
        raise ValueError("acmize: calibration_data is empty; give a list of batches (dicts of model inputs, or input_ids tensors)")
    if not all(isinstance(b.get("input_ids"), torch.Tensor) for b in batches):
        raise ValueError("acmize: every calibration batch needs an `input_ids` tensor")
    return batches


@torch.no_grad()
def _cache(model: nn.Module, site: _Site, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and outputs (T, d) of the FFN at ``site`` on the calibration tokens (padding dropped)."""
    device = next(model.parameters()).device
    xs, ys, current = [], [], {}
    first = model.get_submodule(site.name)
    last = model.get_submodule(site.output_name or site.name)

    def take_input(_module, args):
        current["x"] = args[0]

    def take_output(_module, _args, output):
        keep = current["mask"]
        xs.append(current["x"].reshape(-1, current["x"].shape[-1])[keep].float())
        ys.append(output.reshape(-1, output.shape[-1])[keep].float())
        raise _StopForward

    handles = [first.register_forward_pre_hook(take_input), last.register_forward_hook(take_output)]
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            mask = batch.get("attention_mask")
            current["mask"] = (mask.reshape(-1) > 0) if mask is not None else torch.ones(batch["input_ids"].numel(), dtype=torch.bool, device=device)
            try:
                model(**batch)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    x, y = torch.cat(xs), torch.cat(ys)
    if not len(x):
        raise ValueError("acmize: calibration_data holds no (unmasked) tokens")
    return x, y


# --------------------------------------------------------------------------- phases 1 and 2


@torch.no_grad()
def _init_from_dense(layer: ACMLayer, site: _Site, x: torch.Tensor) -> None:
    """Learners = slices of the dense neurons, most important first.

    Importance of hidden unit k = mean_t |h_k(x_t)| * ||w_out[k]||: its average contribution to
    the output norm; learner 1 gets the top w units, and so on. The dense output bias goes to
    learner 1. All N learners together then equal the dense FFN exactly.
    """
    magnitude = torch.zeros(site.intermediate_size, device=x.device)
    for chunk in x.split(_LABEL_CHUNK):
        magnitude += site.hidden(chunk.to(site.w_in.dtype)).abs().float().sum(0)
    order = (magnitude * site.w_out.float().norm(dim=1)).argsort(descending=True)
    layer.w_in.copy_(site.w_in[order])
    layer.w_out.copy_(site.w_out[order])
    if layer.b_in is not None:
        layer.b_in.copy_(site.b_in[order])
    if layer.w_up is not None:
        layer.w_up.copy_(site.w_up[order])
    if layer.b_up is not None:
        layer.b_up.copy_(site.b_up[order])
    if layer.b_out is not None:
        layer.b_out.zero_()
        layer.b_out[0].copy_(site.b_out)


def _learner_params(layer: ACMLayer) -> list[nn.Parameter]:
    return [p for n, p in layer.named_parameters() if not n.startswith("gate.")]


def distillation_loss(prefixes: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Squared error of every prefix (T, N, d) against the target (T, d), averaged over prefixes and
    tokens; ``kind="relative"`` first divides each token's error by its target's squared norm."""
    error = (prefixes.float() - y[:, None]).pow(2).mean(-1)  # (T, N)
    if kind == "relative":
        error = error / y.pow(2).mean(-1, keepdim=True).clamp_min(1e-12)
    return error.mean()


def distill(layer: ACMLayer, x: torch.Tensor, y: torch.Tensor, config: ACMConfig, generator: torch.Generator) -> float:
    """Phase 1: Adam on the learners, loss = :func:`distillation_loss` of the prefixes j = 1..N. Returns the last loss."""
    if not config.distill_steps:
        return float("nan")
    optimizer = torch.optim.Adam(_learner_params(layer), lr=config.distill_lr)
    loss = torch.tensor(float("nan"))
    for _ in range(config.distill_steps):
        idx = torch.randint(len(x), (min(config.distill_batch_size, len(x)),), generator=generator, device=x.device)
        prefixes = layer.prefix_outputs(x[idx].to(layer.w_in.dtype))[:, 1:]
        loss = distillation_loss(prefixes, y[idx], config.distill_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


@torch.no_grad()
def prefix_errors(layer: ACMLayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token MSE of every prefix (T, N + 1), computed in chunks."""
    return torch.cat([
        (layer.prefix_outputs(xc.to(layer.w_in.dtype)).float() - yc[:, None]).pow(2).mean(-1)
        for xc, yc in zip(x.split(_LABEL_CHUNK), y.split(_LABEL_CHUNK))
    ])


def train_gate(layer: ACMLayer, x: torch.Tensor, labels: torch.Tensor, config: ACMConfig, generator: torch.Generator) -> float:
    """Phase 2: cross-entropy of the gate's logits against the labels. Returns the last loss."""
    optimizer = torch.optim.Adam(layer.gate.parameters(), lr=config.gate_lr)
    loss = torch.tensor(float("nan"))
    for _ in range(config.gate_steps):
        idx = torch.randint(len(x), (min(config.gate_batch_size, len(x)),), generator=generator, device=x.device)
        loss = F.cross_entropy(layer.gate(x[idx].to(layer.w_in.dtype)).float(), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def _convert(model: nn.Module, site: _Site, batches: list[dict], config: ACMConfig, generator: torch.Generator) -> tuple[ACMLayer, dict]:
    x, y = _cache(model, site, batches)
    layer = _new_layer(site, config)
    if config.init == "dense":
        _init_from_dense(layer, site, x)
    with torch.enable_grad():
        distill_loss = distill(layer, x, y, config, generator)
        labels = gate_labels(prefix_errors(layer, x, y), config.label_factor)
        gate_loss = train_gate(layer, x, labels, config, generator)
    layer.requires_grad_(False).eval()
    log = {
        "module": site.name, "tokens": len(x), "distill_loss": distill_loss, "gate_loss": gate_loss,
        "relative_error": (prefix_errors(layer, x, y).mean(0) / y.pow(2).mean()).tolist(),
        "label_histogram": torch.bincount(labels, minlength=config.num_learners + 1).tolist(),
    }
    return layer, log


# --------------------------------------------------------------------------- injection


def _install(model: nn.Module, site: _Site, layer: ACMLayer) -> list[str]:
    replace_module(model, site.name, layer)
    if site.output_name is None:
        return [site.name]
    replace_module(model, site.output_name, nn.Identity())
    return [site.name, site.output_name]


def acmize(model: nn.Module, config: ACMConfig, calibration_data: Iterable, *, progress: bool = True) -> nn.Module:
    """Convert ``model``'s dense FFNs (those ``config.target_pattern`` selects) into ACMs, in place.

    Args:
        model: a HF model whose family is in the architecture registry.
        config: the conversion's knobs (:class:`ACMConfig`).
        calibration_data: a re-iterable of batches, each a dict of model inputs (``input_ids``
            and optionally ``attention_mask``, whose zeros are left out of the caches) or an
            ``input_ids`` tensor. Iterated once per target module.
    Returns:
        ``model`` (eval mode), with ``model.acm_conversion_log``: per module, the tokens used,
        the last distillation / gate losses, the mean relative error of each prefix
        (||y_j - y||^2 / ||y||^2 for j = 0..N) and the histogram of gate labels.
    """
    batches = _batches(calibration_data)
    sites = _sites(model, config)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(config.seed)
    torch.manual_seed(config.seed)
    was_training = model.training
    model.eval()
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    converted, logs = [], []
    try:
        for site in tqdm(sites, desc="acmize", disable=not progress):
            layer, log = _convert(model, site, batches, config, generator)
            converted.append(layer)
            logs.append(log)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
        model.train(was_training)
    targets = [t for site, layer in zip(sites, converted) for t in _install(model, site, layer)]
    record_injection(model, ACM_KIND, asdict(config), targets)
    model.acm_conversion_log = logs
    return model.eval()


def rebuild(model: nn.Module, config_dict: dict) -> None:
    """Recreate the ACM structure on a freshly loaded base model (``modular.load_model`` fills the weights)."""
    known = {f.name for f in fields(ACMConfig)}
    unknown = sorted(set(config_dict) - known)
    if unknown:
        warnings.warn(f"ACM record has keys this modular-llm does not know, ignored: {unknown}", stacklevel=2)
    config = ACMConfig(**{k: v for k, v in config_dict.items() if k in known})
    sites = _sites(model, config)
    targets = [t for site in sites for t in _install(model, site, _new_layer(site, config).eval())]
    record_injection(model, ACM_KIND, asdict(config), targets)


register_injection(ACM_KIND, rebuild)


# --------------------------------------------------------------------------- run time


def acm_modules(model: nn.Module) -> list[tuple[str, ACMLayer]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ACMLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no ACM modules; convert it with modular.acmize first")
    return layers


def set_threshold(model: nn.Module, threshold: float | None) -> None:
    """The global quality/compute knob: ``None`` = gate argmax, else a cumulative-probability
    threshold in (0, 1] (higher = more learners per token). No retraining needed."""
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"set_threshold: threshold must be None (argmax) or in (0, 1], got {threshold!r}")
    for _, layer in acm_modules(model):
        layer.threshold = threshold


def compute_penalty(model: nn.Module, budget_target: float) -> torch.Tensor:
    """|mean expected compute fraction of the last training forward - budget_target| (a scalar)."""
    expected = [m.expected_compute for _, m in acm_modules(model) if m.expected_compute is not None]
    if not expected:
        raise ValueError("compute_penalty: no ACM forward in training mode yet (call model.train() and run a batch)")
    return (torch.stack(expected).mean() - budget_target).abs()


def budget_loss(model: nn.Module, config: ACMConfig, task_loss: Callable | None = None) -> Callable:
    """Phase 3 as ``Trainer(compute_loss_func=budget_loss(model, config))``.

    Loss = task loss + ``config.budget_weight`` * :func:`compute_penalty`. ``task_loss(outputs,
    labels, num_items_in_batch)`` defaults to the model's own HF loss on ``outputs.logits``.
    The paper's small entropy / diversity terms are left out. Train the model in ``train()``
    mode: ACMs then mix all prefixes with a straight-through Gumbel-softmax, so the task
    gradient reaches the gates (the official code's argmax blocks it).
    """

    def default_task_loss(outputs, labels, num_items_in_batch=None):
        return model.loss_function(outputs.logits, labels, vocab_size=model.config.vocab_size, num_items_in_batch=num_items_in_batch)

    task = task_loss or default_task_loss

    def compute_loss(outputs, labels, num_items_in_batch=None):
        return task(outputs, labels, num_items_in_batch=num_items_in_batch) + config.budget_weight * compute_penalty(model, config.budget_target)

    return compute_loss


def finetune_end_to_end(
    model: nn.Module, batches: Sequence, task_loss: Callable[[nn.Module, object], torch.Tensor], config: ACMConfig,
    *, steps: int, lr: float, progress: bool = True,
) -> list[dict]:
    """Phase 3 in a plain loop (:func:`budget_loss` is the same loss for ``Trainer``).

    Loss = ``task_loss(model, batches[step % len(batches)])`` + ``config.budget_weight`` *
    :func:`compute_penalty`; Adam on the ACM parameters only, the learning rate decaying
    linearly from ``lr`` to 0 over ``steps``. Only the ACMs are put in training mode
    (straight-through Gumbel gates); the rest of the model keeps its mode (dropout stays off
    in an eval model) and gets no gradients meanwhile (its ``requires_grad`` flags are restored
    afterwards). The ACMs end in eval mode and frozen, as :func:`acmize` leaves them. A batch
    item can carry anything ``task_loss`` needs (e.g. ``(inputs, targets)``). Returns the
    per-step ``{"task", "penalty"}`` values.
    """
    layers = [layer for _, layer in acm_modules(model)]
    if not layers:
        raise ValueError("finetune_end_to_end: the model has no ACM modules (run acmize first)")
    if not batches:
        raise ValueError("finetune_end_to_end: no batches")
    if steps <= 0 or lr <= 0:
        raise ValueError(f"finetune_end_to_end: steps and lr must be positive, got steps={steps!r}, lr={lr!r}")
    trainable_before = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    params = [p.requires_grad_(True) for layer in layers for p in layer.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    for layer in layers:
        layer.train()
    history = []
    bar = tqdm(range(steps), desc="ACM end-to-end", disable=not progress, mininterval=10)
    for step in bar:
        task = task_loss(model, batches[step % len(batches)])
        penalty = compute_penalty(model, config.budget_target)
        optimizer.zero_grad(set_to_none=True)
        (task + config.budget_weight * penalty).backward()
        optimizer.step()
        schedule.step()
        history.append({"task": task.item(), "penalty": penalty.item()})
        bar.set_postfix(task=f"{history[-1]['task']:.4f}", penalty=f"{history[-1]['penalty']:.3f}", refresh=False)
    for p, flag in trainable_before.items():
        p.requires_grad_(flag)
    for layer in layers:
        layer.eval().requires_grad_(False)
    return history

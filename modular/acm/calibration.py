"""Phases 1 and 2 of an ACM conversion, one dense FFN at a time (see ``docs/methods.md``, "ACM").

1. cache the FFN's input and output on the calibration tokens (forward hooks; the forward is
   stopped right after the module, padding tokens are dropped);
2. representation distillation: train the learners so that every prefix sum approximates the
   output (MSE averaged over the N prefixes, optionally per-token relative), Adam;
3. gate training: label each cached token with the paper's rule (:func:`gate_labels`) and fit
   the gate with cross-entropy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ACMConfig
from .layer import ACMLayer, gate_labels
from .sites import FFNSite, new_layer

__all__ = ["cache_ffn_io", "calibration_batches", "convert_site", "distill", "distillation_loss", "prefix_errors", "train_gate"]

_LABEL_CHUNK = 4096  # tokens per chunk when labelling the cache (bounds the (T, N+1, d) prefixes)


class _StopForward(Exception):
    """Raised by the caching hook: nothing after the target module is needed."""


def calibration_batches(calibration_data: Iterable) -> list[dict]:
    batches = [b if isinstance(b, dict) else {"input_ids": b} for b in calibration_data]
    if not batches:
        raise ValueError("calibration_data is empty; give a list of batches (dicts of model inputs, or input_ids tensors)")
    if not all(isinstance(b.get("input_ids"), torch.Tensor) for b in batches):
        raise ValueError("calibration_data: every batch needs an `input_ids` tensor")
    return batches


@torch.no_grad()
def cache_ffn_io(model: nn.Module, site: FFNSite, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and outputs (T, d) of the FFN at ``site`` on the calibration tokens (padding dropped; the
    forward stops right after the FFN)."""
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
        raise ValueError("calibration_data holds no (unmasked) tokens")
    return x, y


# --------------------------------------------------------------------------- phases 1 and 2


@torch.no_grad()
def _init_from_dense(layer: ACMLayer, site: FFNSite, x: torch.Tensor) -> None:
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


def convert_site(model: nn.Module, site: FFNSite, batches: list[dict], config: ACMConfig, generator: torch.Generator) -> tuple[ACMLayer, dict]:
    x, y = cache_ffn_io(model, site, batches)
    layer = new_layer(site, config)
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

"""Phase 3 of an ACM conversion: end-to-end fine-tuning under a compute budget
(task loss + ``budget_weight`` · |expected compute − ``budget_target``|), for ``Trainer``
(:func:`budget_loss`) or in a plain loop (:func:`finetune_end_to_end`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ACMConfig
from .model import acm_modules

__all__ = ["budget_loss", "compute_penalty", "finetune_end_to_end"]


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
    *, steps: int | None = None, lr: float | None = None, progress: bool = True,
) -> list[dict]:
    """Phase 3 in a plain loop (:func:`budget_loss` is the same loss for ``Trainer``).

    Loss = ``task_loss(model, batches[step % len(batches)])`` + ``config.budget_weight`` *
    :func:`compute_penalty`; Adam on the ACM parameters only, the learning rate decaying
    linearly from ``lr`` to 0 over ``steps`` (``None``: ``config.finetune_lr`` /
    ``config.finetune_steps``). Only the ACMs are put in training mode
    (straight-through Gumbel gates); the rest of the model keeps its mode (dropout stays off
    in an eval model) and gets no gradients meanwhile (its ``requires_grad`` flags are restored
    afterwards). The ACMs end in eval mode and frozen, as :func:`acmize` leaves them. A batch
    item can carry anything ``task_loss`` needs (e.g. ``(inputs, targets)``). Returns the
    per-step ``{"task", "penalty"}`` values.
    """
    layers = [layer for _, layer in acm_modules(model)]  # raises when the model has no ACM
    if not batches:
        raise ValueError("finetune_end_to_end: no batches")
    steps = config.finetune_steps if steps is None else steps
    lr = config.finetune_lr if lr is None else lr
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

"""A classification head fitted on the frozen model before fine-tuning (linear probe, then fine-tune:
"LP-FT", Kumar et al., 2022).

A fresh random head makes the first fine-tuning steps push the backbone towards a random
readout; a head fitted first (multinomial logistic regression on the frozen features) starts
fine-tuning from a working classifier, so the backbone moves less. For merging this matters
twice: task vectors stay smaller, and each task's head already reads the *base* backbone, so it
still works on a merged one (AdaMerging's heads are frozen zero-shot heads for the same reason).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["L2_GRID", "classification_head", "fit_linear_probe", "head_features"]

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # penalties tried; the best on the validation split wins


def classification_head(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` outside the backbone with ``config.num_labels`` outputs (BERT's
    ``classifier``, llama's ``score``, RoBERTa's ``classifier.out_proj``)."""
    backbone = {id(m) for m in model.base_model.modules()} if model.base_model is not model else set()
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in backbone
             and m.out_features == model.config.num_labels]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no linear head with num_labels={model.config.num_labels} outputs outside its backbone")
    return heads[-1]


@torch.no_grad()
def head_features(model: nn.Module, batches: Iterable[dict], split_over_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of the classification head (N, d), labels (N,)) over ``batches`` (model inputs with
    ``labels`` and ``attention_mask``), the model in eval mode. Decoder classifiers apply their
    head to every position and read the last token's logits: there the last non-padding position
    (right padding) is taken.

    ``split_over_ranks``: a collective of the default process group (every rank calls it with the
    same batches): rank r runs the batches r, r + W, ... and the features are gathered back in
    order, so every rank returns the tensors that one process would compute at the same thread
    count, in 1/W of the time.
    """
    world, rank = (dist.get_world_size(), dist.get_rank()) if split_over_ranks and dist.is_initialized() else (1, 0)
    head = classification_head(model)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach().float()))
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for i, batch in enumerate(batches):
            batch = dict(batch)
            labels.append(batch.pop("labels"))
            if i % world != rank:
                continue
            model(**batch)
            x = seen.pop()
            if x.dim() == 3:
                x = x[torch.arange(len(x)), batch["attention_mask"].sum(1) - 1]
            features.append(x)
    finally:
        handle.remove()
        model.train(was_training)
    if world > 1:
        features = _gathered_in_order(features, [len(y) for y in labels], head, world, rank)
    return torch.cat(features), torch.cat(labels)


def _gathered_in_order(own: list[torch.Tensor], sizes: list[int], head: nn.Linear, world: int, rank: int) -> list[torch.Tensor]:
    """Every batch's features, from each rank's own (batches ``rank::world``) and every batch's size."""
    rows = [sum(sizes[r::world]) for r in range(world)]
    mine = torch.zeros(max(rows), head.in_features, device=head.weight.device)  # padded: all_gather takes equal shapes
    if own:
        mine[: rows[rank]] = torch.cat(own)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    offsets, out = [0] * world, []
    for i, size in enumerate(sizes):
        r = i % world
        out.append(gathered[r][offsets[r] : offsets[r] + size])
        offsets[r] += size
    return out


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (C, d) and bias (C,) minimising mean cross-entropy + l2/2 · ||W||² (L-BFGS, deterministic);
    the bias stays 0 without ``with_bias``."""
    weight = torch.zeros(classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(classes, requires_grad=with_bias)
    optimizer = torch.optim.LBFGS([weight, bias] if with_bias else [weight], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


@torch.no_grad()
def fit_linear_probe(model: nn.Module, train: Iterable[dict], validation: Iterable[dict] | None = None,
                     l2_grid: Sequence[float] = L2_GRID, split_over_ranks: bool = False) -> dict:
    """Set ``model``'s classification head to a logistic regression on its frozen features.

    The L2 penalty is the one of ``l2_grid`` with the best ``validation`` accuracy (ties: the
    larger penalty); without validation batches, the middle of the grid. Returns what was
    chosen: ``{"l2", "validation_accuracy": {l2: acc}, "train_accuracy"}``. ``split_over_ranks``:
    the forwards are shared by the ranks (:func:`head_features`); every rank fits the same head.
    """
    x, y = head_features(model, train, split_over_ranks)
    head = classification_head(model)
    fits = {}
    with torch.enable_grad():
        candidates = l2_grid if validation is not None else [sorted(l2_grid)[len(l2_grid) // 2]]
        for l2 in candidates:
            fits[l2] = _logistic_regression(x, y, head.out_features, l2, head.bias is not None)
    scores = {}
    if validation is not None:
        xv, yv = head_features(model, validation, split_over_ranks)
        scores = {l2: ((xv @ w.T + b).argmax(-1) == yv).float().mean().item() for l2, (w, b) in fits.items()}
        l2 = max(sorted(fits, reverse=True), key=lambda value: scores[value])
    else:
        l2 = candidates[0]
    weight, bias = fits[l2]
    head.weight.copy_(weight.to(head.weight))
    if head.bias is not None:
        head.bias.copy_(bias.to(head.bias))
    train_accuracy = ((x @ weight.T + bias).argmax(-1) == y).float().mean().item()
    return {"l2": l2, "validation_accuracy": scores, "train_accuracy": train_accuracy}

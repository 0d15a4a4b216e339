"""LISA under DeepSpeed ZeRO-1/2: the ZeRO optimizer is rebuilt over the active parameters at every switch.

``DeepSpeedZeroOptimizer`` keeps, per parameter group, one flat copy of the trainable (bit16) weights
and this rank's partition of the fp32 master weights, gradients and Adam moments, sized once when it
is built. Frozen parameters (``requires_grad=False``) are left out of those buffers, so LISA frees
memory by rebuilding the optimizer whenever its set of trainable parameters changes:

1. the parameters that stay (embeddings / head / final norm unless frozen) record where their fp32
   master and moment slices lie on this rank (DeepSpeed's per-parameter ``_hp_mapping``);
2. the old optimizer is destroyed (its gradient hooks removed); parameters that leave get their own
   storage, so the old flat buffers are freed with the old optimizer;
3. the torch optimizer's groups get the new trainable parameters (same groups, same hyper-parameters,
   model order: what ``Trainer.create_optimizer`` itself produces for this set, so a checkpoint saved in
   this period loads into an engine built for it) and the engine builds a new ZeRO optimizer over them
   (``engine._configure_zero_optimizer``, the engine's own construction path);
4. the staying parameters' master weights and moments are copied into the new partitions (assembled
   per parameter over the data-parallel group, since partition boundaries move); new layers start
   with zero moments. The torch optimizer object, its step count and the LR scheduler are untouched.

Cost per switch: one construction (a flat copy of the active weights) and, per staying parameter, an
all-reduce of its fp32 master and of each moment. The step count is per group (one flat tensor), so a
newly active layer joins its group's step count: its first Adam steps have no bias-correction warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ZeroLayout", "rebuild_zero_optimizer", "zero_optimizer_of"]


def zero_optimizer_of(engine):
    """The engine's ``DeepSpeedZeroOptimizer``; a clear error for any other optimizer wrapper."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = getattr(engine, "optimizer", None)
    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        raise ValueError(f"LISA under ZeRO-1/2 rebuilds DeepSpeed's ZeRO optimizer; this engine has "
                         f"{type(optimizer).__name__} (bf16 with fp32 gradient accumulation at stage 1 uses "
                         "BF16_Optimizer instead: drop data_types.grad_accum_dtype or use stage 2)")
    return optimizer


@dataclass
class ZeroLayout:
    """Which torch-optimizer group each parameter belongs to, read from the engine's first optimizer.

    Layer parameters are looked up by their name inside the layer (``mlp.up_proj.weight``), so a layer
    that was frozen when the optimizer was built joins the group its twins in the trained layers joined.
    """

    group_of_key: dict[str, int]

    @classmethod
    def from_optimizer(cls, zero, key_of: dict[int, str]) -> ZeroLayout:
        groups = {}
        for i, params in enumerate(zero.bit16_groups):
            for p in params:
                groups.setdefault(key_of[id(p)], i)
        return cls(groups)

    def groups(self, params: list[tuple[str, nn.Parameter]], num_groups: int) -> list[list[nn.Parameter]]:
        """``params`` (key, parameter) in model order, split into the optimizer's groups."""
        out: list[list[nn.Parameter]] = [[] for _ in range(num_groups)]
        for key, p in params:
            if key not in self.group_of_key:
                raise ValueError(f"LISA: parameter {key!r} was in no optimizer group when DeepSpeed was initialised, "
                                 "so its group is unknown (layers must have the same parameters)")
            out[self.group_of_key[key]].append(p)
        empty = [i for i, g in enumerate(out) if not g]
        if empty:
            raise ValueError(f"LISA: optimizer groups {empty} would be empty in this period; DeepSpeed cannot build them")
        return out


@dataclass
class _Slice:
    """Where one parameter's fp32 slice lies on this rank: ``numel`` elements from ``lp_start`` in the
    flattened parameter, at ``hp_start`` in its group's flat partition."""

    group: int
    lp_start: int
    hp_start: int
    numel: int


def _slice_of(p: nn.Parameter) -> _Slice | None:
    mapping = getattr(p, "_hp_mapping", None)  # None: the parameter lies in other ranks' partitions
    if mapping is None:
        return None
    return _Slice(mapping.param_group_index, mapping.lp_fragment_address.start,
                  mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel)


def _flat_tensors(basic, index: int) -> dict[str, torch.Tensor]:
    """The group's flat fp32 partition (``"master"``) and its optimizer-state tensors of the same shape."""
    flat = basic.param_groups[index]["params"][0]
    state = basic.state.get(flat, {})
    return {"master": flat, **{k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape}}


@torch.no_grad()
def rebuild_zero_optimizer(engine, wrapper, groups: list[list[nn.Parameter]], staying: list[nn.Parameter]) -> None:
    """Rebuild ``engine``'s ZeRO optimizer over ``groups`` (one parameter list per torch-optimizer group),
    carrying over the master weights and moments of ``staying``; ``wrapper`` (accelerate's optimizer
    wrapper, or None) is pointed at the new optimizer. Every rank must call it with the same arguments."""
    old = zero_optimizer_of(engine)
    basic = engine.basic_optimizer
    group_of = {id(p): i for i, params in enumerate(groups) for p in params}
    slices = {id(p): _slice_of(p) for p in staying}
    old_tensors = [_flat_tensors(basic, i) for i in range(len(basic.param_groups))]
    old_states = [basic.state.pop(g["params"][0], {}) for g in basic.param_groups]
    leaving = [p for params in old.bit16_groups for p in params if id(p) not in group_of]
    old.destroy()
    for p in leaving:  # its own storage, so that the old flat buffer dies with the old optimizer
        p.data = p.data.clone()
    for group, params in zip(basic.param_groups, groups):
        group["params"] = params
    new = engine._configure_zero_optimizer(basic)
    new.loss_scaler = old.loss_scaler  # fp16's dynamic loss scale continues
    engine.optimizer = new
    if wrapper is not None:
        wrapper.optimizer = new
    del old
    for i, state in enumerate(old_states):
        if state:  # before the first step there is no state to carry
            basic.state[basic.param_groups[i]["params"][0]] = _fresh_state(state, old_tensors[i], basic.param_groups[i]["params"][0])
    for p in staying:
        _carry_over(p, slices[id(p)], _slice_of(p), old_tensors[group_of[id(p)]],
                    _flat_tensors(basic, group_of[id(p)]), new.real_dp_process_group[group_of[id(p)]])


def _fresh_state(old: dict, old_tensors: dict[str, torch.Tensor], flat: torch.Tensor) -> dict:
    """The group's new state: zero moments shaped like the new partition, the same step count."""
    return {k: torch.zeros_like(flat) if k in old_tensors else v.clone() if torch.is_tensor(v) else v
            for k, v in old.items()}


def _carry_over(p: nn.Parameter, old: _Slice | None, new: _Slice | None, old_tensors: dict[str, torch.Tensor],
                new_tensors: dict[str, torch.Tensor], dp_group) -> None:
    """Copy ``p``'s fp32 master and moments from its old slice to its new one.

    Partition boundaries move with the set of parameters, so a slice this rank held may now belong to
    another rank: each tensor is assembled at full size (the ranks' slices are disjoint and the others
    add zeros, so the sum is exact) and every rank copies out its new slice.
    """
    for key, source in old_tensors.items():
        full = torch.zeros(p.numel(), dtype=source.dtype, device=source.device)
        if old is not None:
            full.narrow(0, old.lp_start, old.numel).copy_(source.narrow(0, old.hp_start, old.numel))
        if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(full, group=dp_group)
        if new is not None:
            new_tensors[key].narrow(0, new.hp_start, new.numel).copy_(full.narrow(0, new.lp_start, new.numel))

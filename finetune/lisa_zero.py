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


def _flat_tensors(basic, index: int) -> dict[str, torch.Tensor]:
    """The group's flat fp32 partition (``"master"``) and its optimizer-state tensors of the same shape."""
    flat = basic.param_groups[index]["params"][0]
    state = basic.state.get(flat, {})
    return {"master": flat, **{k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape}}


def _carried_keys(p: nn.Parameter, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The state to carry for ``p``: its moments, and its fp32 master unless the weight itself is fp32
    (then the master equals the weight, and the new optimizer starts from it)."""
    return [k for k in tensors if k != "master" or p.dtype != torch.float32]


def _places(zero) -> dict[int, tuple[int, int]]:
    """(offset in its group's flat buffer, buffer size) of every parameter the optimizer holds: the same
    place in a same-sized buffer means the same slice on every rank."""
    return {id(p): (offset, zero.bit16_groups_flat[i].numel())
            for i, (params, offsets) in enumerate(zip(zero.round_robin_bit16_groups, zero.round_robin_bit16_offsets))
            for p, offset in zip(params, offsets)}


def _stash(basic, staying: list[nn.Parameter]) -> dict[int, tuple[int, dict[str, torch.Tensor]]]:
    """Copies of this rank's slices of the staying parameters' state: (start in the flattened parameter,
    tensors by key); parameters that lie in other ranks' partitions have none here."""
    out = {}
    for p in staying:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            address, tensors = mapping.hp_fragment_address, _flat_tensors(basic, mapping.param_group_index)
            out[id(p)] = (mapping.lp_fragment_address.start,
                          {k: tensors[k].narrow(0, address.start, address.numel).clone() for k in _carried_keys(p, tensors)})
    return out


@torch.no_grad()
def rebuild_zero_optimizer(engine, wrapper, groups: list[list[nn.Parameter]], staying: list[nn.Parameter]) -> None:
    """Rebuild ``engine``'s ZeRO optimizer over ``groups`` (one parameter list per torch-optimizer group),
    carrying over the master weights and moments of ``staying``; ``wrapper`` (accelerate's optimizer
    wrapper, or None) is pointed at the new optimizer. Every rank must call it with the same arguments.

    Memory: the staying parameters' state is copied aside and the old optimizer freed before the new one
    is built, so the peak above training is that copy plus the new flat copy of the active weights.
    """
    old = zero_optimizer_of(engine)
    basic = engine.basic_optimizer
    group_of = {id(p): i for i, params in enumerate(groups) for p in params}
    stash, old_places = _stash(basic, staying), _places(old)
    moment_keys = [[k for k in _flat_tensors(basic, i) if k != "master"] for i in range(len(groups))]
    steps = [{k: v for k, v in basic.state.get(g["params"][0], {}).items() if k not in moment_keys[i]}
             for i, g in enumerate(basic.param_groups)]
    leaving = [p for params in old.bit16_groups for p in params if id(p) not in group_of]
    loss_scaler = old.loss_scaler
    old.destroy()
    for p in leaving:  # its own storage, so that the old flat buffer dies with the old optimizer
        p.data = p.data.clone()
    basic.state.clear()
    for group, params in zip(basic.param_groups, groups):
        group["params"] = params
    engine.optimizer = None
    if wrapper is not None:
        wrapper.optimizer = None
    del old  # the last reference: its partitions, gradient buffers and flat weights are freed here
    new = engine._configure_zero_optimizer(basic)
    new.loss_scaler = loss_scaler  # fp16's dynamic loss scale continues
    engine.optimizer = new
    if wrapper is not None:
        wrapper.optimizer = new
    for group, keys, step in zip(basic.param_groups, moment_keys, steps):
        if step:  # before the first step there is no state to carry
            flat = group["params"][0]
            basic.state[flat] = {**{k: v.clone() if torch.is_tensor(v) else v for k, v in step.items()},
                                 **{k: torch.zeros_like(flat) for k in keys}}
    if any(steps):
        new._lazy_init_hp_params_optimizer_state()  # what its first step would do: per-parameter state views
    new_places = _places(new)
    for p in staying:
        i = group_of[id(p)]
        moved = old_places[id(p)] != new_places[id(p)]
        _restore(p, stash.get(id(p)), moved, _flat_tensors(basic, i), new.real_dp_process_group[i])


def _restore(p: nn.Parameter, stashed, moved: bool, new_tensors: dict[str, torch.Tensor], dp_group) -> None:
    """Copy ``p``'s stashed state into its slice of the new partitions.

    Not ``moved`` (same place in a same-sized flat buffer: the usual case, every layer having the same
    size): the slice is this rank's again, a local copy. Otherwise partition boundaries moved and the
    slice may now be another rank's: each tensor is assembled at full size (slices are disjoint and the
    other ranks add zeros, so the sum is exact) and every rank copies out its new slice. ``moved`` is the
    same on every rank (places are global), so all ranks join the same collectives.
    """
    mapping = getattr(p, "_hp_mapping", None)
    for key in _carried_keys(p, new_tensors):
        if not moved:
            if mapping is not None:
                address = mapping.hp_fragment_address
                new_tensors[key].narrow(0, address.start, address.numel).copy_(stashed[1][key])
            continue
        full = torch.zeros(p.numel(), dtype=torch.float32, device=new_tensors[key].device)
        if stashed is not None:
            start, tensors = stashed
            full.narrow(0, start, tensors[key].numel()).copy_(tensors[key])
        if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(full, group=dp_group)
        if mapping is not None:
            lp = mapping.lp_fragment_address
            new_tensors[key].narrow(0, mapping.hp_fragment_address.start, lp.numel).copy_(full.narrow(0, lp.start, lp.numel))

"""LISA — Layerwise Importance Sampled AdamW (Pan et al., 2024) as a ``transformers`` callback.

Embeddings and LM head train always (configurable); of the L decoder layers only γ, sampled
uniformly without replacement, train during each period of K optimizer steps.

How the known pitfalls of public implementations (``docs/methods.md``, "LISA") are avoided:

* **Layers frozen before the optimizer is built never train.** The callback changes nothing
  before ``on_train_begin``, which ``Trainer`` calls after it (or ``deepspeed.initialize``) has
  built the optimizer over every trainable parameter. Freezing is ``requires_grad=False`` plus
  ``grad=None``; the parameters stay in the optimizer's groups, so a layer sampled later trains.
* **State never freed.** On every switch the optimizer state of every decoder-layer parameter
  is released, so each period starts a fresh AdamW over its active layers, as in the paper (the
  authors restarted the job each period). Embeddings/head keep their state: they train in every
  period and resetting their moments would only repeat Adam's bias-correction warm-up.

  - torch optimizers (plain ``Trainer``, DDP, DeepSpeed ZeRO-0): ``optimizer.state.pop(p)``;
    AdamW skips parameters whose grad is None and lazily re-creates state when the layer is
    sampled again. Memory really drops: cost is one dict pop per tensor, O(#layer tensors)
    Python work per switch, no copies; the next period's first step re-allocates zeroed
    moments. OneBitAdam follows the same contract (a parameter without state is newly activated).
  - DeepSpeed ZeRO-1/2: the fp32 master weights, gradients and Adam moments live in flat
    partitions sized at ``deepspeed.initialize`` (one flat tensor per group), so nothing can be
    freed per layer without rebuilding the engine. Frozen parameters get zero gradients from
    ZeRO; the callback zeroes their moment slices (through each parameter's ``_hp_mapping``,
    DeepSpeed's own per-parameter view) so that the zero gradient gives a zero update. Cost:
    O(numel) memset per switch; memory stays that of full fine-tuning partitioned over ranks.
    Two differences from plain AdamW follow from the flat state and are checked, not hidden:
    decoupled weight decay would shrink frozen weights, so ZeRO-1/2 with ``weight_decay > 0``
    is refused; and the flat group shares one step count, so a re-activated layer's first
    updates are larger than a fresh AdamW's (no bias-correction restart: (1-β1)/√(1-β2) ≈ 3.2×
    the gradient-sign step at its first step, instead of 1×).
  - ZeRO-3 partitions the parameters themselves and gathers them per module; freezing layers
    mid-run there was not attempted, so it is refused with an error.
* **Ranks sampling different layers.** The layers of period ``p`` are a pure function of
  ``(seed, p, L)``: every rank computes the same set without communication, and a resumed run
  re-derives the same schedule from ``state.global_step``.

Multi-process: checked with 2 gloo processes under ``torchrun`` (DDP; Trainer's default
``ddp_find_unused_parameters`` lets DDP skip the frozen layers' missing gradients) and under
``deepspeed --num_gpus 2`` with ZeRO-0/1/2. On CPU, a DeepSpeed run needs
:func:`finetune.launch.cpu_deepspeed_state` so that ranks really split the data.

Parameters outside the blocks and embeddings (final norm) follow ``train_head``. With tied
embeddings the head *is* the embedding, so ``train_embeddings`` and ``train_head`` must agree.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass

import torch
from torch import nn
from transformers import TrainerCallback

from modular.registry import architecture_of

logger = logging.getLogger(__name__)

SCHEDULE_FILE = "lisa_schedule.json"

__all__ = ["LisaCallback", "LisaConfig", "release_optimizer_state", "sample_active_layers"]


def sample_active_layers(seed: int, period: int, num_layers: int, num_active: int) -> list[int]:
    """Indices (sorted) of the ``num_active`` layers of ``period``; identical on every rank and run."""
    rng = random.Random(seed * 1_000_003 + period)
    return sorted(rng.sample(range(num_layers), num_active))


def _zero_stage(args) -> int:
    """ZeRO stage of a ``TrainingArguments`` run under DeepSpeed, else 0."""
    ds = getattr(args, "hf_deepspeed_config", None)
    return int(ds.config.get("zero_optimization", {}).get("stage", 0)) if ds is not None else 0


def _innermost_optimizer(optimizer):
    """Unwrap accelerate/DeepSpeed wrappers down to the ZeRO optimizer or the torch optimizer."""
    while not hasattr(optimizer, "single_partition_of_fp32_groups") and getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


def release_optimizer_state(optimizer, params: list[nn.Parameter]) -> None:
    """Forget the optimizer state of ``params`` (see the module docstring for each backend)."""
    optimizer = _innermost_optimizer(optimizer)
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # DeepSpeed ZeRO-1/2: flat state
        # Slices are taken from each parameter's fragment address, not from DeepSpeed's cached
        # ``optim_fragment`` views: those are linked once after the first group's step, so they
        # are empty for later groups (e.g. Trainer's no-decay group of norms).
        for p in params:
            mapping = getattr(p, "_hp_mapping", None)  # None: the parameter lies in another rank's partition
            if mapping is None:
                continue
            flat = optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
            address = mapping.hp_fragment_address
            for value in optimizer.optimizer.state.get(flat, {}).values():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    value.narrow(0, address.start, address.numel).zero_()
        return
    for p in params:
        optimizer.state.pop(p, None)


def check_all_layers_in_optimizer(optimizer, layer_params: list[list[nn.Parameter]]) -> None:
    """Raise if a decoder-layer parameter is missing from the optimizer (the parameter was frozen
    before the optimizer was built, so sampling its layer would silently train nothing)."""
    optimizer = _innermost_optimizer(optimizer)
    groups = optimizer.bit16_groups if hasattr(optimizer, "bit16_groups") else [g["params"] for g in optimizer.param_groups]
    known = {id(p) for group in groups for p in group}
    missing = [i for i, params in enumerate(layer_params) if any(id(p) not in known for p in params)]
    if missing:
        raise ValueError(f"decoder layers {missing} have parameters outside the optimizer: they were frozen "
                         "(requires_grad=False) before it was built; leave them trainable, LisaCallback freezes them")


@dataclass
class LisaConfig:
    """LISA's settings (the ``lisa:`` section of a ``modular train`` recipe).

    Attributes:
        num_active_layers: γ, decoder layers trained per period (1 ≤ γ ≤ L).
        interval_steps: K, optimizer steps per period (≥ 1).
        train_embeddings: train the input embedding tables in every period.
        train_head: train the LM head (and the final norm / other non-layer params) in every period.
        seed: seeds the per-period sampling; the same on all ranks.
        schedule_file: JSON written to ``args.output_dir`` by the main process (list of periods
            with their first step and active layer indices), for reports to plot.
    """

    num_active_layers: int = 2
    interval_steps: int = 20
    train_embeddings: bool = True
    train_head: bool = True
    seed: int = 0
    schedule_file: str = SCHEDULE_FILE

    def __post_init__(self) -> None:
        for name in ("num_active_layers", "interval_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LisaConfig.{name} must be an int >= 1, got {value!r}")


class LisaCallback(TrainerCallback):
    """Train embeddings, head and ``num_active_layers`` sampled decoder layers per period.

    ``LisaCallback(LisaConfig(...))`` or ``LisaCallback(num_active_layers=2, interval_steps=20)``
    (the fields of :class:`LisaConfig`).

    Attributes:
        active_layers: indices of the layers training in the current period.
        schedule: ``[{"period", "start_step", "layers"}]`` for every period reached so far.
    """

    def __init__(self, config: LisaConfig | None = None, /, **settings):
        self.config = config or LisaConfig(**settings)
        self.active_layers: list[int] = []
        self.schedule: list[dict] = []
        self._period: int | None = None

    # -- structure -------------------------------------------------------------------------
    def _partition(self, model: nn.Module) -> None:
        """Split ``model``'s parameters into per-layer lists and the always-on / always-off rest."""
        arch = architecture_of(model)
        if arch.embeddings_tied and self.config.train_embeddings != self.config.train_head:
            raise ValueError("embeddings are tied to the head: train_embeddings and train_head must agree "
                             f"(got train_embeddings={self.config.train_embeddings}, train_head={self.config.train_head})")
        if self.config.num_active_layers > arch.num_layers:
            raise ValueError(f"num_active_layers={self.config.num_active_layers} exceeds the model's {arch.num_layers} layers")
        self.num_layers = arch.num_layers
        self.layer_params: list[list[nn.Parameter]] = [[] for _ in range(arch.num_layers)]
        self.fixed_params: list[tuple[nn.Parameter, bool]] = []  # (param, trains in every period)
        params = dict(model.named_parameters())
        for name, role in arch.parameter_roles().items():
            if role.startswith("layers."):
                self.layer_params[int(role.split(".")[1])].append(params[name])
            else:
                self.fixed_params.append((params[name], self.config.train_embeddings if role == "embeddings" else self.config.train_head))

    # -- switching -------------------------------------------------------------------------
    def _activate(self, period: int, optimizer, fresh_period: bool, is_main: bool) -> None:
        self.active_layers = sample_active_layers(self.config.seed, period, self.num_layers, self.config.num_active_layers)
        active = set(self.active_layers)
        for i, params in enumerate(self.layer_params):
            for p in params:
                p.requires_grad_(i in active)
                if i not in active:
                    p.grad = None
        # Inactive layers never keep state; active ones start a fresh AdamW at a period boundary
        # (mid-period, i.e. on resume, they keep the state restored from the checkpoint).
        released = [p for i, ps in enumerate(self.layer_params) if fresh_period or i not in active for p in ps]
        if optimizer is not None:
            release_optimizer_state(optimizer, released)
        self._period = period
        start = period * self.config.interval_steps
        self.schedule = [s for s in self.schedule if s["period"] < period]
        self.schedule.append({"period": period, "start_step": start, "layers": self.active_layers})
        if is_main:
            logger.info("LISA period %d (steps %d-%d): active layers %s", period, start,
                        start + self.config.interval_steps - 1, self.active_layers)

    def _rebuild_schedule(self, period: int) -> None:
        """Schedule of the periods before ``period`` (derived, so a resumed run reports the full history)."""
        self.schedule = [{"period": q, "start_step": q * self.config.interval_steps,
                          "layers": sample_active_layers(self.config.seed, q, self.num_layers, self.config.num_active_layers)}
                         for q in range(period)]

    # -- Trainer hooks ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        stage = _zero_stage(args)
        if stage >= 3:
            raise ValueError("LISA cannot run under DeepSpeed ZeRO-3 (parameters are partitioned and gathered per "
                             "module; requires_grad cannot change during training): use finetune/configs/zero2.json")
        if stage >= 1 and any(g.get("weight_decay", 0.0) for g in _innermost_optimizer(optimizer).param_groups):
            raise ValueError("LISA under DeepSpeed ZeRO-1/2 needs weight_decay=0: frozen layers share the flat fp32 "
                             "partition and decoupled weight decay would shrink them")
        self._partition(model)
        check_all_layers_in_optimizer(optimizer, self.layer_params)
        for p, trains in self.fixed_params:
            p.requires_grad_(trains)
            if not trains:
                p.grad = None
        period = state.global_step // self.config.interval_steps
        self._rebuild_schedule(period)
        self._activate(period, optimizer, state.global_step % self.config.interval_steps == 0, state.is_world_process_zero)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        period = state.global_step // self.config.interval_steps
        if period != self._period:
            self._activate(period, optimizer, True, state.is_world_process_zero)

    def on_save(self, args, state, control, **kwargs):
        self.save_schedule(args.output_dir, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.save_schedule(args.output_dir, state)

    def save_schedule(self, output_dir: str, state) -> None:
        """Write the schedule as JSON (main process only); loads with ``json.load``."""
        if not state.is_world_process_zero:
            return
        os.makedirs(output_dir, exist_ok=True)
        doc = {"num_layers": self.num_layers, "num_active_layers": self.config.num_active_layers,
               "interval_steps": self.config.interval_steps, "seed": self.config.seed, "global_step": state.global_step,
               "train_embeddings": self.config.train_embeddings, "train_head": self.config.train_head, "periods": self.schedule}
        with open(os.path.join(output_dir, self.config.schedule_file), "w") as f:
            json.dump(doc, f, indent=1)

"""LISA — Layerwise Importance Sampled AdamW (Pan et al., 2024) as a ``transformers`` callback.

Embeddings and LM head train always (configurable); of the L decoder layers only γ, sampled
uniformly without replacement, train during each period of K optimizer steps.

How the known pitfalls of public implementations (``docs/methods.md``, "LISA") are avoided:

* **Layers frozen before the optimizer is built never train.** With torch optimizers the callback
  changes nothing before ``on_train_begin``, which ``Trainer`` calls after it has built the
  optimizer over every trainable parameter. Freezing is ``requires_grad=False`` plus ``grad=None``;
  the parameters stay in the optimizer's groups, so a layer sampled later trains. Under ZeRO-1/2
  the optimizer is rebuilt over the active layers at every switch instead (below).
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
    partitions that DeepSpeed builds over the *trainable* parameters. The callback keeps only the
    active layers (and embeddings / head unless frozen) trainable and rebuilds the ZeRO optimizer
    over them at each switch (:mod:`finetune.lisa_zero`): frozen layers hold only their weights, on
    every rank. Embeddings / head keep their master weights and moments; new layers start with zero
    moments. This needs the trainer (``LisaCallback(config, trainer=trainer)``, added with
    ``trainer.add_callback``): the callback freezes the inactive layers *before* ``train()`` builds
    the engine (so DeepSpeed never allocates state for them) and rebuilds through the engine.
    Resuming: DeepSpeed's checkpoint holds the optimizer of the period it was saved in, and the
    engine must be built for that period before it loads: set ``TrainingArguments.resume_from_checkpoint``
    to the checkpoint you pass to ``train()`` (``modular train`` does); the callback reads its step.
    The step count is per flat group, so a newly active layer's first Adam steps have no
    bias-correction warm-up ((1-β1)/√(1-β2) ≈ 3.2× the gradient-sign step at its first step, instead of 1×).
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

from torch import nn
from transformers import TrainerCallback

from modular.registry import architecture_of

from .lisa_zero import ZeroLayout, rebuild_zero_optimizer, zero_optimizer_of

logger = logging.getLogger(__name__)

SCHEDULE_FILE = "lisa_schedule.json"

__all__ = ["LisaCallback", "LisaConfig", "release_optimizer_state", "sample_active_layers"]

TRAINER_STATE = "trainer_state.json"


def sample_active_layers(seed: int, period: int, num_layers: int, num_active: int) -> list[int]:
    """Indices (sorted) of the ``num_active`` layers of ``period``; identical on every rank and run."""
    rng = random.Random(seed * 1_000_003 + period)
    return sorted(rng.sample(range(num_layers), num_active))


def _zero_stage(args) -> int:
    """ZeRO stage of a ``TrainingArguments`` run under DeepSpeed, else 0."""
    ds = getattr(args, "hf_deepspeed_config", None)
    return int(ds.config.get("zero_optimization", {}).get("stage", 0)) if ds is not None else 0


def _checkpoint_step(checkpoint: str) -> int:
    """``global_step`` of a ``Trainer`` checkpoint folder."""
    path = os.path.join(checkpoint, TRAINER_STATE)
    if not os.path.isfile(path):
        raise ValueError(f"TrainingArguments.resume_from_checkpoint={checkpoint!r}: no {TRAINER_STATE} there")
    with open(path) as f:
        return int(json.load(f)["global_step"])


def _innermost_optimizer(optimizer):
    """Unwrap accelerate's wrapper down to the torch optimizer."""
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


def release_optimizer_state(optimizer, params: list[nn.Parameter]) -> None:
    """Forget the optimizer state of ``params`` (torch optimizers: plain ``Trainer``, DDP, ZeRO-0)."""
    optimizer = _innermost_optimizer(optimizer)
    for p in params:
        optimizer.state.pop(p, None)


def check_all_layers_in_optimizer(optimizer, layer_params: list[list[nn.Parameter]]) -> None:
    """Raise if a decoder-layer parameter is missing from the optimizer (the parameter was frozen
    before the optimizer was built, so sampling its layer would silently train nothing)."""
    known = {id(p) for group in _innermost_optimizer(optimizer).param_groups for p in group["params"]}
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
    (the fields of :class:`LisaConfig`). Under DeepSpeed ZeRO-1/2 pass the trainer and add the
    callback before ``train()``: ``trainer.add_callback(LisaCallback(config, trainer=trainer))``.

    Attributes:
        active_layers: indices of the layers training in the current period.
        schedule: ``[{"period", "start_step", "layers"}]`` for every period reached so far.
    """

    def __init__(self, config: LisaConfig | None = None, /, *, trainer=None, **settings):
        self.config = config or LisaConfig(**settings)
        self.trainer = trainer
        self.active_layers: list[int] = []
        self.schedule: list[dict] = []
        self._period: int | None = None
        self._zero_layout: ZeroLayout | None = None
        if trainer is not None and _zero_stage(trainer.args) in (1, 2):
            self._freeze_before_engine(trainer)

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
        # The name of each parameter inside its layer (or its full name outside the layers): the ZeRO
        # path puts a newly active layer's parameters into the groups their twins were in.
        self.param_keys: dict[int, str] = {}
        layer_prefixes = [f"{name}." for name in arch.layer_names]
        params = dict(model.named_parameters())
        for name, role in arch.parameter_roles().items():
            if role.startswith("layers."):
                i = int(role.split(".")[1])
                self.layer_params[i].append(params[name])
                self.param_keys[id(params[name])] = name.removeprefix(layer_prefixes[i])
            else:
                self.fixed_params.append((params[name], self.config.train_embeddings if role == "embeddings" else self.config.train_head))
                self.param_keys[id(params[name])] = name
        self.model = model

    def _layers_of(self, period: int) -> list[int]:
        return sample_active_layers(self.config.seed, period, self.num_layers, self.config.num_active_layers)

    def _set_trainable(self, layers: list[int]) -> None:
        """requires_grad on the fixed parameters that train and on ``layers``; frozen ones drop their grad."""
        active = set(layers)
        trainable = [(p, trains) for p, trains in self.fixed_params]
        trainable += [(p, i in active) for i, params in enumerate(self.layer_params) for p in params]
        for p, trains in trainable:
            p.requires_grad_(trains)
            if not trains:
                p.grad = None

    # -- DeepSpeed ZeRO-1/2 ----------------------------------------------------------------
    def _freeze_before_engine(self, trainer) -> None:
        """Freeze all but the first period's layers before ``train()`` builds the engine, so DeepSpeed
        allocates master weights and moments for the active parameters only. A resumed run starts with
        the layers its checkpoint's optimizer was saved with (the period of its last step)."""
        self._partition(trainer.model)
        checkpoint = trainer.args.resume_from_checkpoint
        step = _checkpoint_step(checkpoint) if checkpoint else 0
        self._engine_period = max(step - 1, 0) // self.config.interval_steps
        self._set_trainable(self._layers_of(self._engine_period))

    def _zero_trainable(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(key, parameter) of the trainable parameters, in model order."""
        return [(self.param_keys[id(p)], p) for p in model.parameters() if p.requires_grad]

    def _start_zero(self, state) -> None:
        """on_train_begin under ZeRO-1/2: check that the engine holds the layers the run starts with."""
        if self.trainer is None:
            raise ValueError("LISA under DeepSpeed ZeRO-1/2 rebuilds DeepSpeed's optimizer and needs the trainer: "
                             "trainer.add_callback(LisaCallback(config, trainer=trainer)) before trainer.train()")
        saved_period = max(state.global_step - 1, 0) // self.config.interval_steps
        if saved_period != self._engine_period:
            raise ValueError(
                f"LISA: DeepSpeed's optimizer was built for the layers of period {self._engine_period}, but this run "
                f"resumes at step {state.global_step}, whose checkpoint holds period {saved_period}'s: set "
                "TrainingArguments.resume_from_checkpoint to the checkpoint passed to train() (modular train does)")
        zero = zero_optimizer_of(self.trainer.model_wrapped)
        built = {id(p) for params in zero.bit16_groups for p in params}
        if built != {id(p) for _, p in self._zero_trainable(self.model)}:
            raise ValueError("LISA: DeepSpeed's optimizer holds other parameters than those LISA left trainable; "
                             "add the callback before train() and do not change requires_grad in between")
        self._zero_layout = ZeroLayout.from_optimizer(zero, self.param_keys)

    def _rebuild_zero(self) -> None:
        """Rebuild DeepSpeed's ZeRO optimizer over the parameters now trainable (:mod:`finetune.lisa_zero`)."""
        engine = self.trainer.model_wrapped
        groups = self._zero_layout.groups(self._zero_trainable(self.model), len(engine.basic_optimizer.param_groups))
        staying = [p for p, trains in self.fixed_params if trains]
        rebuild_zero_optimizer(engine, self.trainer.optimizer, groups, staying)

    # -- switching -------------------------------------------------------------------------
    def _activate(self, period: int, optimizer, fresh_period: bool, is_main: bool) -> None:
        self.active_layers = self._layers_of(period)
        if self._zero_layout is not None:
            same_layers = self._period is not None and self.active_layers == self._layers_of(self._period)
            self._set_trainable(self.active_layers)
            # A new period is a fresh AdamW over its layers: rebuild even with the same layers, unless no
            # step has been taken (nothing to reset) or the run resumes mid-period (keep the loaded state).
            if not same_layers or (fresh_period and self.trainer.model_wrapped.basic_optimizer.state):
                self._rebuild_zero()
        else:
            self._set_trainable(self.active_layers)
            # Inactive layers never keep state; active ones start a fresh AdamW at a period boundary
            # (mid-period, i.e. on resume, they keep the state restored from the checkpoint).
            active = set(self.active_layers)
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
        self.schedule = [{"period": q, "start_step": q * self.config.interval_steps, "layers": self._layers_of(q)}
                         for q in range(period)]

    # -- Trainer hooks ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        stage = _zero_stage(args)
        if stage >= 3:
            raise ValueError("LISA cannot run under DeepSpeed ZeRO-3 (parameters are partitioned and gathered per "
                             "module; requires_grad cannot change during training): use finetune/configs/zero2.json")
        self._partition(model)
        period = state.global_step // self.config.interval_steps
        if stage in (1, 2):
            self._start_zero(state)
            self._period = self._engine_period
        else:
            check_all_layers_in_optimizer(optimizer, self.layer_params)
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

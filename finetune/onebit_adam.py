"""1-bit Adam (Tang et al., 2021) over ``torch.distributed``, LISA-aware.

Each parameter goes through two stages, counted by its own step number ``state["step"]``:

* **warm-up** (its first ``freeze_step`` steps): exact AdamW on the gradient averaged over ranks in
  full precision (one fp32 all-reduce of all warm-up gradients per step).
* **compression** (afterwards): the variance ``v`` is frozen (with its bias correction at the freeze
  step); the momentum is updated from the *local* gradient, ``m ← β1·m + (1−β1)·g_local``, and replaced
  by its error-compensated 1-bit average over ranks (:meth:`Communicator.compressed_all_reduce`); then
  ``p ← p − lr·wd·p − lr/(1−β1^t) · m / (√(v/(1−β2^t_freeze)) + ε)``.

Design choices (no anchor settles them):

* **The optimizer does all gradient averaging itself**, in both stages. The host's gradient
  all-reduce must be switched off with :func:`skip_host_allreduce` (DDP comm hook / DeepSpeed's
  ``enable_backward_allreduce``) — so ``step()`` always sees local gradients, and the switch to
  compression needs no cooperation from the host mid-run. If the host still averages, results are
  unchanged (averaging equal tensors is the identity), only the bytes double.
* **LISA**: a parameter whose ``grad`` is ``None`` is skipped (no state change, no bytes). LISA samples
  the same layers on every rank, so all ranks skip the same parameters (the collectives require it).
  A parameter with no state — never stepped, or its state freed by LISA with
  ``optimizer.state.pop(p)`` — is *newly activated*: its variance is unknown, so it gets its own
  uncompressed warm-up of ``param_warmup_steps`` steps (default ``freeze_step``) before its momentum
  is compressed. Parameters first seen at the optimizer's first step use ``freeze_step``.
  DeepSpeed's old 1-bit Adam froze ``v`` globally, so a layer activated later had ``v = 0`` and diverged.
* **Error buffers are per parameter and rank-local** (``worker_error`` and ``server_error``, each of the
  parameter's shape; a rank reads/writes only the positions it serves in the server error), so they
  survive LISA switching which parameters are compressed together (while the set stays the same,
  they are views into one flat buffer per kind, which the all-reduce updates in place). Save the
  optimizer state per rank; :meth:`state_dict` carries frozen variance and both error buffers, and a resumed run
  continues bit for bit. Hosts that save the optimizer of rank 0 only (``Trainer``'s
  ``optimizer.pt``, DeepSpeed ZeRO-0 checkpoints) resume every rank with rank 0's error buffers:
  parameters stay identical across ranks, but the run is not bit-identical to an uninterrupted one
  (``modular train`` also saves and restores each rank's buffers, so its resume is exact).
* **What is compressed** (default ``compress_preconditioned=True``): the paper compresses the
  momentum ``m``. Since ``v`` is frozen and the same on all ranks, averaging ``m / (√v̂ + ε)`` is the same
  linear map as averaging ``m``; compressing it makes the 1-bit error relative to Adam's (already
  normalised) update, and every coordinate of a block moves by the block's mean |update| instead of
  the block's mean |m| divided by its own √v̂ (a coordinate with a tiny frozen ``v`` next to busy ones
  then moves many times ``lr``). Error buffers are in update units. ``compress_preconditioned=False``
  is the paper's variant; with the mean-|x| block scale of :mod:`finetune.comm` it trains as well
  (measured: same eval loss; with DeepSpeed's RMS scale it diverged), but its update norm is ~14×
  larger, all of it in rarely-seen embedding / output rows.
* **Why 1-bit Adam departs from AdamW** (measured on the benchmark's llama and setting, see benchmarks/RESULTS.md): the
  frozen ``v`` goes stale. From step 45 to 120 of fine-tuning, AdamW's √v̂ grows by a median 1.2–1.6×
  per coordinate in the MLPs and by 1000×+ in the embedding and output rows of rare bytes, so with ``v``
  frozen the step is larger than AdamW's: the median by the same 1.2–1.6× (a larger effective lr), the
  rare rows by orders of magnitude. Exact frozen-``v`` Adam without any compression blew up there (eval
  2.26 → 3.37 at step ~100). The 1-bit sign-and-scale step bounds each coordinate by its block's mean, which
  is what keeps the compressed optimizer stable, but the larger effective step remains.
* Without a process group (single process) it runs as a world of one (see :mod:`finetune.comm`).
* Gradient clipping by the host (Trainer's ``max_grad_norm``, DeepSpeed's ``gradient_clipping``) acts on
  the *local* gradients before they are averaged, since the host no longer averages them.
* ``freeze_step`` must leave ``v`` informative: after very few steps (e.g. 1) coordinates with a tiny
  but non-zero ``v`` turn 1-bit compression noise into huge updates. Coordinates with ``v = 0``
  (never a gradient during warm-up) are held still. The benchmark (benchmarks/RESULTS.md) also shows
  that freezing ``v`` after 15 % of a *short from-scratch* run stalls training even without
  compression; 1-bit Adam is for fine-tuning and for long pre-training runs, as in the paper.
  With DeepSpeed's RMS block scale the benchmark diverged at lr 2e-3 where AdamW did not; with the
  mean-|x| scale it trains there too (the stale ``v`` still makes its effective step larger).

All parameters must live on one device; state, error buffers and the communication buffers are fp32
whatever the parameters' dtype. bf16 (or fp16) parameters are updated in fp32 and rounded once:
``p ← round(p·(1 − lr·wd) − lr·update)``, so the only precision lost to bf16 is that one rounding per step
(there is no fp32 master copy: an update below half a bf16 ulp of the weight is lost, as in any pure-bf16
optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from finetune.comm import Communicator, skip_host_allreduce

__all__ = ["ERROR_BUFFERS", "OneBitAdam", "SkipHostAllReduceCallback"]

ERROR_BUFFERS = ("worker_error", "server_error")  # per-parameter state of the compressed stage


class OneBitAdam(torch.optim.Optimizer):
    """1-bit Adam(W). Args as ``torch.optim.AdamW``, plus:

    Args:
        freeze_step: warm-up steps (exact AdamW, fp32 averaging) before a parameter's variance is
            frozen and its momentum compressed. Paper: ~15–25 % of training. Must be ≥ 1.
        param_warmup_steps: warm-up steps for a parameter that gets optimizer state after the first
            step (a layer LISA activates later, or whose state was popped). Default ``freeze_step``.
        block_size: elements per compression scale (multiple of 8); ``None`` = one scale per rank
            chunk, as DeepSpeed did.
        compress_preconditioned: compress ``m / (√v̂ + ε)`` (the update direction, with the frozen
            denominator) instead of ``m``; ``False`` is the paper's and DeepSpeed's choice.
        group: process group (default: the world).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        freeze_step: int = 100,
        param_warmup_steps: int | None = None,
        block_size: int | None = 1024,
        compress_preconditioned: bool = True,
        group: dist.ProcessGroup | None = None,
    ):
        if not isinstance(freeze_step, int) or freeze_step < 1:
            raise ValueError(f"freeze_step must be an int ≥ 1 (warm-up steps before compression), got {freeze_step!r}")
        if param_warmup_steps is not None and (not isinstance(param_warmup_steps, int) or param_warmup_steps < 1):
            raise ValueError(f"param_warmup_steps must be an int ≥ 1 or None, got {param_warmup_steps!r}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be ≥ 0, got lr={lr}, eps={eps}, weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"OneBitAdam needs all parameters on one device, got {sorted(map(str, devices))}")
        self.freeze_step = freeze_step
        self.param_warmup_steps = freeze_step if param_warmup_steps is None else param_warmup_steps
        self.communicator = Communicator(group=group, block_size=block_size)
        self.compress_preconditioned = compress_preconditioned
        self.global_step = 0
        self._error_flats: tuple[torch.Tensor, torch.Tensor] | None = None  # see _error_buffers

    @property
    def comm_stats(self):
        """Bytes this rank handed to collectives so far (:class:`finetune.comm.CommStats`)."""
        return self.communicator.stats

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["global_step"] = self.global_step
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.global_step = state_dict.pop("global_step", 0)
        super().load_state_dict(state_dict)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = 0
        state["warmup_steps"] = self.freeze_step if self.global_step == 0 else self.param_warmup_steps
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        warm, compressed = [], []  # (param, group) in a rank-independent order
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("OneBitAdam does not support sparse gradients")
                state = self.state[p] or self._init_state(p)
                (warm if state["step"] < state["warmup_steps"] else compressed).append((p, group))
        if warm:
            self._warmup_step(warm)
        if compressed:
            self._compressed_step(compressed)
        self.global_step += 1
        return loss

    def _warmup_step(self, items: list) -> None:
        n = sum(p.numel() for p, _ in items)
        fp32 = self.state[items[0][0]]["exp_avg"]  # the buffer's dtype and device
        grads = _flat([p.grad for p, _ in items], self.communicator.workspace.get("grads", n, fp32))
        self.communicator.all_reduce_mean(grads)
        for (p, group), g in zip(items, _split(grads, [p for p, _ in items])):
            state = self.state[p]
            beta1, beta2 = group["betas"]
            state["step"] += 1
            t = state["step"]
            # Same operation order as torch.optim.AdamW (foreach=False), so fp32 warm-up matches it bitwise.
            weight = _fp32(p)
            _decay(weight, group)
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
            weight.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))
            _store(p, weight)
            if t == state["warmup_steps"]:
                # Freeze v with its bias correction: later steps divide by this fixed denominator.
                # Coordinates that never had a gradient (v = 0: an embedding row of an unseen token)
                # would divide 1-bit compression noise by eps and blow up; an infinite denominator
                # keeps them still, which is what DeepSpeed's manual ``exp_avg_mask`` was for.
                state["frozen_denom"] = denom.masked_fill_(state["exp_avg_sq"] == 0, float("inf"))
                state["worker_error"] = torch.zeros_like(state["exp_avg"])
                state["server_error"] = torch.zeros_like(state["exp_avg"])

    def _compressed_step(self, items: list) -> None:
        params = [p for p, _ in items]
        states = [self.state[p] for p in params]
        for (p, group), state in zip(items, states):
            state["exp_avg"].lerp_(p.grad.float(), 1 - group["betas"][0])
        n = sum(p.numel() for p in params)
        padded, _ = self.communicator.padded_length(n)
        # The frozen denominator is the same on every rank, so averaging m or m / denom is the same
        # linear map; it only decides in which units the 1-bit error is made (see the module doc).
        space = self.communicator.workspace
        sent = _flat([s["exp_avg"] for s in states], space.get("sent", padded, states[0]["exp_avg"]))
        if self.compress_preconditioned:
            for state, part in zip(states, _split(sent, params)):
                part.div_(state["frozen_denom"])
        averaged = self.communicator.compressed_all_reduce(sent, *self._error_buffers(params, states, padded))
        # coordinates held still (denom = inf, see _warmup_step); into a reused buffer: a fresh mask
        # (Tensor.isinf) cost 5x the comparison itself on CPU
        still = _split(space.get("still", padded, torch.empty(0, dtype=torch.bool, device=sent.device)), params)
        for (p, group), state, part, held in zip(items, states, _split(averaged, params), still):
            denom = state["frozen_denom"]
            if self.compress_preconditioned:  # part = m / denom; coordinates with denom = inf keep m = 0
                torch.mul(part, denom, out=state["exp_avg"]).masked_fill_(torch.eq(denom, math.inf, out=held), 0.0)
                direction = part
            else:
                state["exp_avg"].copy_(part)
                direction = part / denom
            state["step"] += 1
            weight = _fp32(p)
            _decay(weight, group)
            weight.add_(direction, alpha=-group["lr"] / (1 - group["betas"][0] ** state["step"]))
            _store(p, weight)

    def _error_buffers(self, params: list, states: list[dict], padded: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The worker and server errors of ``params`` as two flat buffers of ``padded`` elements whose
        parts *are* the states' tensors, so the all-reduce updates the states in place (copying
        them out and back cost a few percent of a fine-tuning step on CPU). Rebuilt when the compressed
        parameters change (LISA) or a state's tensors were replaced (end of warm-up, a loaded
        checkpoint); the padding is zeroed on every call."""
        flats = self._error_flats
        if flats is None or flats[0].numel() != padded or not _parts_of(flats, states, params):
            flats = tuple(torch.empty(padded, dtype=torch.float32, device=params[0].device) for _ in ERROR_BUFFERS)
            for key, flat in zip(ERROR_BUFFERS, flats):
                for state, part in zip(states, _split(flat, params)):
                    state[key] = part.copy_(state[key])
            self._error_flats = flats
        n = sum(p.numel() for p in params)
        for flat in flats:
            flat[n:].zero_()
        return flats


def _parts_of(flats: tuple[torch.Tensor, torch.Tensor], states: list[dict], params: list) -> bool:
    """Whether every state's error tensors are the parts of ``flats`` at its parameter's offset."""
    offset = 0
    for state, p in zip(states, params):
        for key, flat in zip(ERROR_BUFFERS, flats):
            tensor = state[key]
            if tensor.data_ptr() != flat.data_ptr() + offset * flat.element_size() or tensor.shape != p.shape:
                return False
        offset += p.numel()
    return True


class SkipHostAllReduceCallback(TrainerCallback):
    """``transformers.Trainer`` integration: at train begin, switch off the gradient all-reduce of the
    trainer's wrapped model (DDP under ``torchrun``, or the DeepSpeed engine), since :class:`OneBitAdam`
    averages by itself. Callbacks are not handed the wrapped model, hence the trainer reference::

        trainer = Trainer(model, args, optimizers=(OneBitAdam(model.parameters(), ...), None), ...)
        trainer.add_callback(SkipHostAllReduceCallback(trainer))
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if wrapped is not self.trainer.model:  # single process: nothing wraps the model
            skip_host_allreduce(wrapped)


def _fp32(p: torch.Tensor) -> torch.Tensor:
    """The weight to update: ``p`` itself in fp32, else an fp32 copy (written back by :func:`_store`)."""
    return p if p.dtype == torch.float32 else p.float()


def _decay(weight: torch.Tensor, group: dict) -> None:
    """Decoupled weight decay, ``w ← w·(1 − lr·wd)``; none at wd = 0 (a pass over the weights that
    would multiply by exactly 1)."""
    if group["weight_decay"]:
        weight.mul_(1 - group["lr"] * group["weight_decay"])


def _store(p: torch.Tensor, weight: torch.Tensor) -> None:
    if weight is not p:
        p.copy_(weight)  # the one rounding into p's dtype


def _flat(tensors: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Concatenate into the fp32 buffer ``out``, zero-padded to its length."""
    n = 0
    for t, part in zip(tensors, _split(out, tensors)):
        part.copy_(t)
        n += t.numel()
    out[n:].zero_()
    return out


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like each tensor of ``like`` (trailing padding ignored)."""
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out

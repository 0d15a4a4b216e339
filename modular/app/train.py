"""``modular train RECIPE.yaml...``: the recipe runner (inject → fine-tune → save), read top to bottom.

Runs the same way in one process, under ``torchrun --nproc_per_node N -m modular.app.train
RECIPE.yaml`` and under ``deepspeed --num_gpus N --module modular.app.train RECIPE.yaml``.
A re-run of the same recipe resumes from the last checkpoint in ``output_dir``; SIGTERM makes
the run save a checkpoint at the end of the current step and stop, so a killed run loses
nothing it had written. Outputs in ``output_dir``: ``checkpoint-*`` (Trainer), ``model/`` (the
final model, loadable with ``modular.load_model``), ``metrics.json`` (loss history, eval loss,
routing statistics, LISA schedule), ``lisa_schedule.json`` and ``loss.png``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from modular.config_io import ConfigError
from modular.surgery import injection_records

from .recipe import Recipe, describe, load_recipe
from .train_data import load_tokenizer, make_collator, tokenized_splits
from .train_model import build_model, fit_head, inject
from .train_outputs import accuracy, comm_stats, write_outputs

__all__ = ["run", "run_recipe"]


def _is_distributed_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _single_process_world() -> None:
    """Started without a launcher, a run with a DeepSpeed config is a world of one process, set
    up as ``deepspeed --num_gpus 1`` would (accelerate and DeepSpeed then find a process group)."""
    from finetune.launch import free_port

    if "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def _optimizer_args(recipe: Recipe, max_steps: int) -> dict:
    """Trainer keyword arguments that select the optimizer."""
    opt = recipe.optimizer
    if opt.name == "adamw":
        return {}
    from finetune.onebit_adam import OneBitAdam

    freeze_step = opt.freeze_step or max(1, round(0.15 * max_steps))
    kwargs = dict(lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay, freeze_step=freeze_step)
    return {"optimizer_cls_and_kwargs": (OneBitAdam, kwargs)}


class GracefulStop(TrainerCallback):
    """On SIGTERM, save a checkpoint after the current step and stop (``received``: a SIGTERM came
    in this process, so the recipes after this one do not start)."""

    received = False

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        print("modular train: SIGTERM received, saving a checkpoint and stopping", file=sys.stderr, flush=True)
        self.requested = GracefulStop.received = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        signal.signal(signal.SIGTERM, self._previous)


def _training_arguments(recipe: Recipe, resume: str | None = None):
    from transformers import TrainingArguments

    opt = recipe.optimizer
    settings = dict(
        output_dir=recipe.output_dir,
        learning_rate=opt.lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1],
        adam_epsilon=opt.eps,
        report_to=[],
        save_strategy="steps",
        save_steps=50,
        logging_steps=10,
        seed=0,
        resume_from_checkpoint=resume,  # read by LISA under ZeRO-1/2 before the engine is built
    )
    settings.update(recipe.training)
    if recipe.deepspeed is not None:
        settings.update(deepspeed=recipe.deepspeed, accelerator_config={"use_configured_state": True})
    elif not torch.cuda.is_available():
        settings.update(use_cpu=True, ddp_backend="gloo" if _is_distributed_launch() else None)
    try:
        return TrainingArguments(**settings)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{recipe.source}: training: {err}") from None


def run_recipe(recipe: Recipe) -> Path:
    """Run one recipe to the end (or resume it); returns the final model folder."""
    from transformers.trainer_utils import get_last_checkpoint

    from .trainer import ModularTrainer, remove_incomplete_checkpoint

    if recipe.deepspeed is not None and not torch.cuda.is_available():
        from finetune.launch import cpu_deepspeed_state

        _single_process_world()
        cpu_deepspeed_state()  # accelerate would otherwise see one process per rank on CPU
    print(f"modular train: {describe(recipe)}", flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        remove_incomplete_checkpoint(recipe.output_dir)  # a staging folder: never taken for a checkpoint
    last = get_last_checkpoint(recipe.output_dir) if Path(recipe.output_dir).is_dir() else None
    args = _training_arguments(recipe, last)  # bad `training:` values fail here, before any work
    torch.manual_seed(0)
    tokenizer = load_tokenizer(recipe)
    data = tokenized_splits(recipe, tokenizer)
    for split, rows in data.items():
        if len(rows) == 0:
            raise ValueError(f"{recipe.source}: data.{split} gives no examples (packed into {recipe.data.max_length}-token blocks); "
                             "give more text or a smaller max_length")
    model = build_model(recipe)
    calibration = [{"input_ids": torch.tensor(row["input_ids"])[None]} for row in data["train"].select(range(min(16, len(data["train"]))))]
    model = inject(model, recipe, calibration)
    injected = {r["kind"] for r in injection_records(model)}  # the recipe's and those the saved model carries

    collator = make_collator(recipe, tokenizer)
    probe = fit_head(model, recipe, data, collator)
    callbacks = [GracefulStop()]
    if "adamoe" in injected:
        from finetune.aux_loss import MoEAuxLossCallback

        callbacks.append(MoEAuxLossCallback())
    trainer = ModularTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("eval"),
        data_collator=collator,
        callbacks=callbacks,
        compute_metrics=accuracy if recipe.data.label_field else None,
        **_optimizer_args(recipe, args.max_steps),
    )
    if recipe.optimizer.name == "onebit_adam":
        from finetune.onebit_adam import SkipHostAllReduceCallback

        trainer.add_callback(SkipHostAllReduceCallback(trainer))
    if recipe.lisa is not None:
        from finetune.lisa import LisaCallback

        trainer.add_callback(LisaCallback(recipe.lisa, trainer=trainer))  # under ZeRO-1/2 it freezes before train()

    if last:
        print(f"modular train: resuming from {last}", flush=True)
    trainer.train(resume_from_checkpoint=last)
    if any(cb.requested for cb in callbacks if isinstance(cb, GracefulStop)):
        print("modular train: stopped on request; re-run the same command to resume", flush=True)
        return Path(get_last_checkpoint(recipe.output_dir) or recipe.output_dir)
    metrics = {k: v for k, v in trainer.evaluate().items() if k in ("eval_loss", "eval_accuracy")} if data.get("eval") is not None else {}
    if recipe.optimizer.name == "onebit_adam":
        metrics["onebit_adam_comm"] = comm_stats(trainer, args.max_steps)
    if probe is not None:
        metrics["head_probe"] = probe
    final = Path(recipe.output_dir) / "model"
    if trainer.is_world_process_zero():
        write_outputs(trainer, tokenizer, final, metrics, data.get("eval"))
    return final


def run(args: argparse.Namespace) -> int:
    """``modular train RECIPE...``: the recipes one after the other in the same processes (a
    launcher's start-up, e.g. DeepSpeed's, is paid once); all are checked before the first runs."""
    from finetune.launch import close_process_group

    recipes = [load_recipe(path) for path in args.recipes]
    for i, recipe in enumerate(recipes):
        if i:
            from accelerate.state import AcceleratorState

            # each recipe's Trainer builds its own Accelerator (DeepSpeed plugin included), which
            # accelerate allows once per state: start the next from a clean one (the process group stays)
            AcceleratorState._reset_state(reset_partial_state=False)
        run_recipe(recipe)
        if GracefulStop.received:
            break
    close_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modular.app.train")
    parser.add_argument("recipes", nargs="+", metavar="recipe")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

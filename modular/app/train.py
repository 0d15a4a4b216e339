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
import io
import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from modular.config_io import ConfigError
from modular.surgery import injection_records

from .recipe import Recipe, describe, load_recipe

__all__ = ["run", "run_recipe"]


def _is_distributed_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _single_process_world() -> None:
    """Started without a launcher, a run with a DeepSpeed config is a world of one process, set
    up as ``deepspeed --num_gpus 1`` would (accelerate and DeepSpeed then find a process group)."""
    from finetune.launch import free_port

    if "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def _build_model(recipe: Recipe) -> torch.nn.Module:
    """The recipe's model; for ``sequence_classification``, the family's classification class with
    a fresh head (a saved backbone keeps its injections, rebuilt by ``load_model``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from modular import load_model

    classify = recipe.model.task == "sequence_classification"
    auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    head = {"num_labels": recipe.model.num_labels} if classify else {}
    dtype = getattr(torch, recipe.model.dtype)
    if recipe.model.path is not None:
        return load_model(recipe.model.path, dtype=dtype, **({"model_class": auto, **head} if classify else {}))
    config = dict(recipe.model.config)
    return auto.from_config(AutoConfig.for_model(config.pop("model_type"), **config, **head), dtype=dtype)


def _tokenizer(recipe: Recipe):
    """The recipe's tokenizer; one whose ids do not fit the model's embedding table is refused."""
    from transformers import AutoTokenizer

    from .recipe import model_config

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.tokenizer or recipe.model.path)
    vocab_size = getattr(model_config(recipe), "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"{recipe.source}: model.tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"vocab_size {vocab_size}; use a tokenizer of at most {vocab_size} tokens or a model with a larger vocabulary")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _datasets(recipe: Recipe, tokenizer) -> dict:
    """Tokenised splits: packed ``max_length`` blocks of plain text, or prompt/completion rows."""
    from datasets import load_dataset

    from .recipe import DATA_SUFFIXES

    data = recipe.data
    files = {"train": data.train, **({"eval": data.eval} if data.eval else {})}
    raw = load_dataset(DATA_SUFFIXES[Path(data.train).suffix], data_files=files)
    fields = [data.prompt_field, data.completion_field] if data.is_prompt_completion else [data.text_field]
    fields += [data.label_field] if data.label_field else []
    missing = [f for f in fields if f not in raw["train"].column_names]
    if missing:
        raise ValueError(f"{recipe.source}: data field(s) {missing} not in the data's columns {raw['train'].column_names}")
    columns = raw["train"].column_names
    if data.is_prompt_completion:
        return raw.map(lambda batch: _prompt_completion_rows(batch, data, tokenizer), batched=True, remove_columns=columns)
    if data.label_field:
        _check_labels(raw, data.label_field, recipe.model.num_labels, recipe.source)
        return raw.map(lambda batch: {**tokenizer(batch[data.text_field], truncation=True, max_length=data.max_length),
                                      "labels": batch[data.label_field]}, batched=True, remove_columns=columns)

    def tokenize(batch):
        return tokenizer(batch[data.text_field], truncation=not data.packing, max_length=data.max_length)

    tokenized = raw.map(tokenize, batched=True, remove_columns=columns)
    if not data.packing:
        return tokenized

    def pack(batch):
        ids = [t for seq in batch["input_ids"] for t in seq + [tokenizer.eos_token_id or tokenizer.sep_token_id]]
        usable = len(ids) // data.max_length * data.max_length
        return {"input_ids": [ids[i : i + data.max_length] for i in range(0, usable, data.max_length)]}

    return tokenized.map(pack, batched=True, remove_columns=tokenized["train"].column_names)


def _check_labels(raw, field: str, num_labels: int, source: str) -> None:
    for split, rows in raw.items():
        bad = [y for y in rows[field] if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y < num_labels]
        if bad:
            raise ValueError(f"{source}: data.{split} field {field!r} holds {bad[0]!r}; expected class indices 0..{num_labels - 1} "
                             f"(model.num_labels {num_labels})")


def _prompt_completion_rows(batch: dict, data, tokenizer) -> dict:
    """prompt + completion + eos as one row; labels are -100 on the prompt, so only the
    completion is learned. Long prompts lose their beginning (the completion always fits)."""
    rows = {"input_ids": [], "labels": []}
    prompts = tokenizer(batch[data.prompt_field], add_special_tokens=False)["input_ids"]
    completions = tokenizer(batch[data.completion_field], add_special_tokens=False)["input_ids"]
    for prompt, completion in zip(prompts, completions):
        completion = (completion + [tokenizer.eos_token_id])[: data.max_length - 1]
        prompt = prompt[-(data.max_length - len(completion)) :]
        rows["input_ids"].append(prompt + completion)
        rows["labels"].append([-100] * len(prompt) + completion)
    return rows


def _inject(model: torch.nn.Module, recipe: Recipe, calibration: list[dict]) -> torch.nn.Module:
    """Apply the recipe's injections in order, each through its registry entry."""
    from modular.injections import get_injection

    for item in recipe.injections:
        kind = get_injection(item["kind"])
        model = kind.apply(model, kind.config(item["params"]), calibration if kind.needs_calibration else None)
    # A recipe fine-tunes the injected model: every parameter goes to the optimizer (LISA then picks
    # the layers that train). Some kinds leave their modules frozen (acmize: conversion is done).
    return model.requires_grad_(True)


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


def _collator(recipe: Recipe, tokenizer):
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding

    if recipe.data.label_field:
        return DataCollatorWithPadding(tokenizer)
    if recipe.data.is_prompt_completion:
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)  # keeps the -100 prompt labels
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def _accuracy(prediction) -> dict:
    """Classification runs: ``eval_accuracy`` next to ``eval_loss``."""
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


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
    tokenizer = _tokenizer(recipe)
    data = _datasets(recipe, tokenizer)
    for split, rows in data.items():
        if len(rows) == 0:
            raise ValueError(f"{recipe.source}: data.{split} gives no examples (packed into {recipe.data.max_length}-token blocks); "
                             "give more text or a smaller max_length")
    model = _build_model(recipe)
    calibration = [{"input_ids": torch.tensor(row["input_ids"])[None]} for row in data["train"].select(range(min(16, len(data["train"]))))]
    model = _inject(model, recipe, calibration)
    injected = {r["kind"] for r in injection_records(model)}  # the recipe's and those the saved model carries

    collator = _collator(recipe, tokenizer)
    probe = _fit_head(model, recipe, data, collator)
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
        compute_metrics=_accuracy if recipe.data.label_field else None,
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
        metrics["onebit_adam_comm"] = _comm_stats(trainer, args.max_steps)
    if probe is not None:
        metrics["head_probe"] = probe
    final = Path(recipe.output_dir) / "model"
    if trainer.is_world_process_zero():
        _write_outputs(trainer, tokenizer, final, metrics, data.get("eval"))
    return final


def _fit_head(model: torch.nn.Module, recipe: Recipe, data: dict, collator) -> dict | None:
    """``head_init: probe``: the classification head fitted on the frozen model (every rank fits
    the same one: same data, deterministic solver). Returns what was chosen."""
    if recipe.model.task != "sequence_classification" or recipe.model.head_init != "probe":
        return None
    from torch.utils.data import DataLoader

    from finetune.heads import fit_linear_probe

    def batches(split):
        return None if split not in data else DataLoader(data[split], batch_size=64, collate_fn=collator)

    probe = fit_linear_probe(model, batches("train"), batches("eval"))
    print(f"modular train: head fitted on the frozen model (L2 {probe['l2']:g}, train accuracy {probe['train_accuracy']:.3f})",
          flush=True)
    return probe


def _comm_stats(trainer, max_steps: int) -> dict:
    """1-bit Adam's bytes on the wire from this rank: the fp32 all-reduce of its warm-up steps and
    the compressed one after (since this process started: a resumed run counts its own part)."""
    optimizer = trainer.optimizer
    while not hasattr(optimizer, "comm_stats"):  # accelerate / DeepSpeed wrappers
        optimizer = optimizer.optimizer
    stats = optimizer.comm_stats
    return {"bytes_sent": dict(stats.bytes_sent), "calls": stats.calls, "freeze_step": optimizer.freeze_step,
            "steps": min(optimizer.global_step, max_steps)}


def _write_outputs(trainer, tokenizer, final: Path, metrics: dict, eval_data) -> None:
    from modular.checkpoint import atomic_output_dir, atomic_write_text

    model = trainer.model
    with atomic_output_dir(final, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    metrics["log_history"] = trainer.state.log_history
    if any(r["kind"] == "adamoe" for r in injection_records(model)) and eval_data is not None:
        from moe import mean_experts_per_token, routing_stats

        batch = trainer.data_collator([eval_data[i] for i in range(min(8, len(eval_data)))])
        with torch.no_grad():
            model.eval()(**{k: batch[k].to(model.device) for k in ("input_ids", "attention_mask") if k in batch})
        metrics["routing_stats"] = routing_stats(model)
        metrics["mean_experts_per_token"] = mean_experts_per_token(metrics["routing_stats"])
    schedule = Path(trainer.args.output_dir) / "lisa_schedule.json"
    if schedule.is_file():
        metrics["lisa_schedule"] = json.loads(schedule.read_text())
    out = Path(trainer.args.output_dir)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    _plot_loss(metrics["log_history"], out / "loss.png")
    print(f"modular train: model in {final}, metrics in {out / 'metrics.json'}", flush=True)


def _plot_loss(history: list[dict], path: Path) -> None:
    from modular.checkpoint import atomic_write_text
    from modular.plotting import pyplot

    from .report import draw_losses

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    draw_losses(ax, history)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write_text(path, image.getvalue())


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

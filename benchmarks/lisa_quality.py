"""LISA vs LoRA vs full fine-tuning of a pretrained causal LM on two labelled tasks: held-out test
accuracy, mean ± sd over seeds, each method at its validation-chosen learning rate.

Protocol (fixed before any test number was read):

1. Pretrained model: a llama (6 layers, hidden 192, BPE vocabulary 4096, untied head; ~4.3M
   parameters) trained on GCIDE dictionary paragraphs (the ``train`` stream of
   :func:`common.gcide_splits`, subject labels such as "(Zool.)" removed so that they do not give
   the ``domain`` task away) for ``--pretrain-steps``; cached, trained once.
2. Tasks (:func:`modular.app.tasks.text_tasks`, seed 0): ``pos`` (part of speech of a
   definition's headword) and ``domain`` (subject of a definition), as prompt → label word rows
   ("<definition> part of speech:" → " noun"); loss on the label word only, as ``modular train``
   trains prompt/completion rows. Each task's 1200 training examples are split 1000 train /
   200 validation; its 400 test examples are read only at the end.
3. Methods, every one with ``Trainer`` (AdamW, linear warm-up 10 %, cosine decay, batch 16,
   ``--steps`` steps):
   * ``lisa``: :class:`finetune.LisaCallback` with the library's ``LisaConfig()`` (γ = 2 of the
     6 layers, a new sample every 20 steps, embeddings and head always trained);
   * ``lora``: peft LoRA as users run it: r = 16, alpha = 32, dropout 0.05, every linear layer
     of the blocks (``"all-linear"``), base frozen;
   * ``full``: every parameter (the reference LISA's paper compares with).
4. Each method's learning rate is chosen from ``--lrs`` by the mean validation accuracy of the
   two tasks with seed 0 (ties: the lower validation loss); seeds 0..2 then run at that rate.
5. Test accuracy (argmax over the label words' first tokens at the end of the prompt,
   :class:`merging.label_words.LabelWordTask`) and test label loss (cross-entropy over the label
   words) are computed once per method and seed; the JSON gives mean ± sd over the seeds.

Pretrained and fine-tuned models are cached under ``benchmarks/out/lisa_quality/cache``
(safetensors, keyed by every setting that produced them); training runs ``--workers`` processes
at once.

    flock /tmp/modular-bench.lock .venv/bin/python benchmarks/lisa_quality.py
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from common import LMBlocks, cache_path, cached_model, gcide_splits, mean_sd, run_stages, settings_hash
from transformers.utils import logging as hf_logging

from modular.checkpoint import atomic_output_dir

OUT = Path(__file__).parent / "out" / "lisa_quality"
CACHE = OUT / "cache"
TASKS = ("pos", "domain")
METHODS = ("lisa", "lora", "full")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
CUES = {"pos": "part of speech:", "domain": "subject:"}
MODEL = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
             max_position_embeddings=256, tie_word_embeddings=False)


# ----------------------------------------------------------------------------- data
def task_data(validation: int) -> dict:
    """Per task: classes and prompt rows of the train / validation / test splits."""
    from modular.app.tasks import text_tasks

    out = {}
    for name, task in text_tasks(TASKS, seed=0).items():
        def rows(examples, task=task):
            return [{"prompt": f"{text} {CUES[task.name]}", "completion": f" {task.classes[y]}", "label": y} for text, y in examples]
        out[name] = {"classes": task.classes, "train": rows(task.train[validation:]), "validation": rows(task.train[:validation]),
                     "test": rows(task.test)}
    return out


def pretraining_text() -> list[str]:
    return [re.sub(r"\([A-Z][a-z]*\.\)", " ", p) for p in gcide_splits()["train"]]


def tokenizer_for(tasks: dict):
    """A BPE tokenizer trained on a quarter of the pretraining text (cached); the label words are
    made frequent enough to be tokens of their own."""
    from transformers import PreTrainedTokenizerFast

    from modular.app.corpora import train_tokenizer

    words = [w for t in tasks.values() for w in t["classes"]]
    folder = CACHE / f"tokenizer-{settings_hash({'words': words, 'vocab_size': 4096})}"
    if not folder.is_dir():
        with atomic_output_dir(folder, force=True) as tmp:
            train_tokenizer(pretraining_text()[::4] + words * 50, vocab_size=4096).save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _rows_dataset(rows: list[dict], tokenizer):
    from datasets import Dataset

    from modular.app.train_data import prompt_completion_rows

    spec = SimpleNamespace(prompt_field="prompt", completion_field="completion", max_length=96)
    columns = {"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}
    return Dataset.from_dict(prompt_completion_rows(columns, spec, tokenizer))


# ----------------------------------------------------------------------------- models
def empty_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **MODEL))


def _training_args(tag: str, steps: int, lr: float, seed: int, batch_size: int, weight_decay: float = 0.0):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(OUT / "trainer" / tag), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), weight_decay=weight_decay, logging_steps=max(1, steps // 5),
        report_to=[], save_strategy="no", use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=False, dataloader_num_workers=0,
    )


def pretrain(model, tokenizer, args) -> None:
    from transformers import Trainer

    ids = [t for text in pretraining_text() for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    blocks = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)
    start = time.perf_counter()
    Trainer(model=model, args=_training_args("pretrain", args.pretrain_steps, 2e-3, 0, 16, 0.01), train_dataset=LMBlocks(blocks)).train()
    print(f"[pretrain] {args.pretrain_steps} steps on {len(blocks)} blocks of 128 tokens in {time.perf_counter() - start:.0f} s", flush=True)


def pretrained(args, tokenizer, train: bool = False):
    settings = {"model": MODEL, "vocab": len(tokenizer), "pretrain_steps": args.pretrain_steps}
    return cached_model(CACHE, "pretrained", settings, lambda: empty_model(len(tokenizer)),
                        (lambda m: pretrain(m, tokenizer, args)) if train else _not_cached)[0]


def _not_cached(model) -> None:
    raise RuntimeError("the pretrained model should have been trained by the previous stage")


def _finetune_settings(args, task: str, method: str, lr: float, seed: int) -> dict:
    return {"pretrain_steps": args.pretrain_steps, "task": task, "method": method, "lr": lr, "seed": seed, "steps": args.steps,
            "lisa": asdict(_lisa_config(seed)) if method == "lisa" else None, "lora": LORA if method == "lora" else None}


def _lisa_config(seed: int):
    from finetune import LisaConfig

    return LisaConfig(seed=seed)


def finetune(model, rows: list[dict], tokenizer, args, method: str, lr: float, seed: int, tag: str) -> None:
    """Fine-tune ``model`` in place (LoRA: trained as adapters, then merged into the weights)."""
    from transformers import DataCollatorForSeq2Seq, Trainer

    from finetune import LisaCallback

    callbacks, trained = [], model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        trained = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    elif method == "lisa":
        callbacks = [LisaCallback(_lisa_config(seed))]
    start = time.perf_counter()
    Trainer(model=trained, args=_training_args(tag, args.steps, lr, seed, 16), train_dataset=_rows_dataset(rows, tokenizer),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100), callbacks=callbacks).train()
    if method == "lora":
        trained.merge_and_unload()
    model.requires_grad_(True)
    print(f"[{tag}] {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)


def finetuned(args, tokenizer, tasks: dict, task: str, method: str, lr: float, seed: int, train: bool = False):
    base_state = pretrained(args, tokenizer).state_dict()

    def empty():
        model = empty_model(len(tokenizer))
        model.load_state_dict(base_state)
        return model

    def fit(model):
        finetune(model, tasks[task]["train"], tokenizer, args, method, lr, seed, f"{task}-{method}-lr{lr:g}-s{seed}")

    return cached_model(CACHE, f"{task}-{method}", _finetune_settings(args, task, method, lr, seed), empty,
                        fit if train else _not_cached)[0]


# ----------------------------------------------------------------------------- jobs and scoring
def _setup(threads: int) -> None:
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()


def pretrain_job(args) -> None:
    _setup(args.threads)
    pretrained(args, tokenizer_for(task_data(args.validation)), train=True)


def finetune_job(args, task: str, method: str, lr: float, seed: int) -> None:
    _setup(args.threads)
    tasks = task_data(args.validation)
    finetuned(args, tokenizer_for(tasks), tasks, task, method, lr, seed, train=True)


@torch.no_grad()
def score(model, tokenizer, task: dict, split: str) -> tuple[float, float]:
    """(accuracy, mean cross-entropy over the label words) on ``split``."""
    from merging.label_words import LabelWordTask, class_logits

    rows = task[split]
    words = LabelWordTask(split, [r["prompt"] for r in rows], task["classes"], [r["label"] for r in rows])
    label_ids = torch.tensor(words.label_token_ids(tokenizer))
    model.eval()
    logits = torch.cat([class_logits(model(**batch), batch, label_ids) for batch in words.batches(tokenizer, 64)])
    labels = torch.tensor(words.labels)
    return (logits.argmax(-1) == labels).float().mean().item(), F.cross_entropy(logits.float(), labels).item()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")], default=[0, 1, 2])
    parser.add_argument("--lrs", type=lambda t: [float(s) for s in t.split(",")], default=[1e-4, 3e-4, 1e-3],
                        help="learning rates; each method's is chosen on validation (seed 0)")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps (batch 16: 2.4 epochs)")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--validation", type=int, default=200, help="training examples per task held out for validation")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    _setup(args.threads)
    started = time.time()
    tasks = task_data(args.validation)
    tokenizer = tokenizer_for(tasks)
    print(f"tasks {[f'{n}: {len(t[s])} {s}' for n, t in tasks.items() for s in ('train', 'validation', 'test')]}", flush=True)
    select_seed = args.seeds[0]

    def missing(jobs):
        return [(finetune_job, (args, *job)) for job in jobs
                if not cache_path(CACHE, f"{job[0]}-{job[1]}", _finetune_settings(args, *job)).is_file()]

    settings = {"model": MODEL, "vocab": len(tokenizer), "pretrain_steps": args.pretrain_steps}
    pretrain_jobs = [] if cache_path(CACHE, "pretrained", settings).is_file() else [(pretrain_job, (args,))]
    grid = [(t, m, lr, select_seed) for t in TASKS for m in METHODS for lr in args.lrs]
    run_stages([pretrain_jobs, missing(grid)], args.workers)
    base = pretrained(args, tokenizer)
    base_scores = {t: score(base, tokenizer, tasks[t], "validation") for t in TASKS}

    validation, chosen = {}, {}
    for method in METHODS:
        validation[method] = {}
        for lr in args.lrs:
            scores = [score(finetuned(args, tokenizer, tasks, t, method, lr, select_seed), tokenizer, tasks[t], "validation")
                      for t in TASKS]
            validation[method][lr] = {"accuracy": round(sum(s[0] for s in scores) / len(scores), 4),
                                      "loss": round(sum(s[1] for s in scores) / len(scores), 4)}
        chosen[method] = max(args.lrs, key=lambda lr, m=method: (validation[m][lr]["accuracy"], -validation[m][lr]["loss"]))
        print(f"[{method}] validation by lr {validation[method]} -> lr {chosen[method]:g}", flush=True)

    run_stages([missing([(t, m, chosen[m], s) for t in TASKS for m in METHODS for s in args.seeds])], args.workers)
    print(f"training done at {time.time() - started:.0f} s", flush=True)

    test = {}
    for method in METHODS:  # the test split, read once per method, task and seed
        test[method] = {}
        for t in TASKS:
            scores = [score(finetuned(args, tokenizer, tasks, t, method, chosen[method], s), tokenizer, tasks[t], "test")
                      for s in args.seeds]
            test[method][t] = {"accuracy": mean_sd([s[0] for s in scores]), "loss": mean_sd([s[1] for s in scores])}
        means = [sum(test[method][t]["accuracy"]["values"][i] for t in TASKS) / len(TASKS) for i in range(len(args.seeds))]
        test[method]["mean_accuracy"] = mean_sd(means)
        print(f"[{method}] test {test[method]}", flush=True)
    print(f"total {time.time() - started:.0f} s", flush=True)
    print(json.dumps({
        **{f"{m}_test_accuracy": test[m]["mean_accuracy"]["mean"] for m in METHODS},
        **{f"{m}_test_accuracy_sd": test[m]["mean_accuracy"]["sd"] for m in METHODS},
        "lisa_minus_lora": mean_sd([a - b for a, b in zip(test["lisa"]["mean_accuracy"]["values"],
                                                           test["lora"]["mean_accuracy"]["values"])]),
        "per_task": test, "chosen_lr": chosen, "validation_by_lr": validation,
        "pretrained_validation": {t: {"accuracy": round(a, 4), "loss": round(lo, 4)} for t, (a, lo) in base_scores.items()},
        "seeds": args.seeds,
        "config": {**vars(args), "lisa": asdict(_lisa_config(0)), "lora": LORA, "model": MODEL, "tasks": TASKS},
    }))


if __name__ == "__main__":
    main()

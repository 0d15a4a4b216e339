"""``modular demo``: the whole flow on an embedded default, CPU only, in one command.

1. data: real text and two classification tasks from the GCIDE dictionary (``modular.app.tasks``),
   a BPE tokenizer trained on that text;
2. pretrain: a small llama trained briefly on the text, with a few hundred labelled rows of each
   task mixed in, so the base is a weak generalist (``modular train``, one process);
3. inject: its MLPs upcycled into a 4-expert top-2 MoE, then AdaMoE null experts injected
   (the base of every task model and of the merges);
4. fine-tune: one model per task with LISA and 1-bit Adam under DeepSpeed ZeRO-0, two processes
   (``deepspeed --num_gpus 2 --module modular.app.train``);
5. merge: task arithmetic (λ 0.3, through the ``modular merge`` CLI) and AdaMerging, task-wise
   and layer-wise (entropy of each task's label-word distribution on its unlabelled test prompts);
6. evaluate every model on every task, and write ``report.html`` (``modular report``).

Every stage writes into its own folder and is skipped when its output exists, so re-running the
command after an interruption (Ctrl-C, SIGTERM) continues where it stopped; an interrupted
fine-tuning resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from modular.checkpoint import atomic_write_text

__all__ = ["DemoConfig", "run_demo"]

PROMPT_CUES = {"pos": "part of speech:", "domain": "subject:", "etymology": "origin:"}


@dataclass
class DemoConfig:
    """Sizes of the demo run; the defaults fit in about 10 minutes on 2 CPU cores."""

    tasks: list[str] = field(default_factory=lambda: ["pos", "domain"])
    pretrain_paragraphs: int = 40000
    pretrain_task_examples: int = 300  # labelled rows per task mixed into pretraining: a weak generalist base
    vocab_size: int = 4096
    model: dict = field(default_factory=lambda: dict(
        model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    ))
    pretrain_steps: int = 300
    num_experts: int = 4
    top_k: int = 2
    adamoe: dict = field(default_factory=lambda: dict(num_null_experts=4, top_k=3, null_logit_init="repeat_gate",
                                                   weighting="renormalized", aux_loss_coef=0.1))  # the paper's routing
    finetune_steps: int = 80
    lisa: dict = field(default_factory=lambda: dict(num_active_layers=2, interval_steps=20))
    finetune_lr: float = 1e-3
    processes: int = 2
    task_arithmetic_lambda: float = 0.3
    adamerging: dict = field(default_factory=lambda: dict(steps=100, lr=5e-3))  # AdaMergingConfig fields but granularity
    adamerging_granularities: list[str] = field(default_factory=lambda: ["task", "layer"])
    seed: int = 0


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


# ----------------------------------------------------------------------------- 1. data
def _strip_subject_labels(text: str) -> str:
    """The pretraining text must not give the ``domain`` labels away: drop marks like ``(Zool.)``."""
    return re.sub(r"\([A-Z][a-z]*\.\)", " ", text)


def prepare_data(cfg: DemoConfig, data_dir: Path) -> None:
    from .corpora import gcide_paragraphs, train_tokenizer
    from .tasks import text_tasks

    if (data_dir / "done").is_file():
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    paragraphs = gcide_paragraphs()
    random.Random(cfg.seed).shuffle(paragraphs)
    text = [_strip_subject_labels(p) for p in paragraphs[: cfg.pretrain_paragraphs]]

    tasks = text_tasks(tuple(cfg.tasks), seed=cfg.seed)
    words = [w for t in tasks.values() for w in t.classes]
    tokenizer = train_tokenizer(text + words * 50, vocab_size=cfg.vocab_size)  # label words frequent enough to be tokens
    tokenizer.save_pretrained(data_dir / "tokenizer")
    seen = []
    for name, task in tasks.items():
        _write_jsonl(data_dir / f"{name}_train.jsonl", _task_rows(task, task.train))
        _write_jsonl(data_dir / f"{name}_test.jsonl", _task_rows(task, task.test))
        (data_dir / f"{name}_classes.json").write_text(json.dumps(task.classes))
        seen += [r["prompt"] + r["completion"] for r in _task_rows(task, task.train[: cfg.pretrain_task_examples])]
        print(f"task {name}: classes {task.classes}, {len(task.train)} train / {len(task.test)} test examples")
    pretrain_text = text[:-500] + seen
    random.Random(cfg.seed).shuffle(pretrain_text)
    _write_jsonl(data_dir / "pretrain_train.jsonl", ({"text": t} for t in pretrain_text))
    _write_jsonl(data_dir / "pretrain_eval.jsonl", ({"text": t} for t in text[-500:]))
    (data_dir / "done").write_text("")


def _task_rows(task, examples: list[tuple[str, int]]) -> list[dict]:
    """Prompt (definition + the task's cue) → completion (the class word), plus the class index."""
    return [{"prompt": f"{text} {PROMPT_CUES[task.name]}", "completion": f" {task.classes[y]}", "label": y} for text, y in examples]


def _write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- 2. pretrain
def _write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def pretrain(cfg: DemoConfig, out: Path) -> Path:
    from .recipe import load_recipe
    from .train import run_recipe

    run_dir = out / "runs" / "pretrain"
    if (run_dir / "model" / "config.json").is_file():
        return run_dir / "model"
    vocab = len(_tokenizer(out))
    recipe = {
        "model": {"config": {**cfg.model, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
                  "tokenizer": "../../data/tokenizer"},
        "data": {"train": "../../data/pretrain_train.jsonl", "eval": "../../data/pretrain_eval.jsonl", "max_length": 128},
        "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.01},
        "training": {"max_steps": cfg.pretrain_steps, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 32,
                     "warmup_steps": 30, "lr_scheduler_type": "cosine", "logging_steps": 10, "save_steps": 100,
                     "eval_strategy": "no", "disable_tqdm": False},
        "output_dir": ".",
    }
    return run_recipe(load_recipe(_write_recipe(run_dir / "recipe.yaml", recipe)))


def _tokenizer(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out / "data" / "tokenizer")


# ----------------------------------------------------------------------------- 3. inject
def build_base(cfg: DemoConfig, pretrained: Path, out: Path) -> Path:
    """Upcycle the dense model into an MoE and inject AdaMoE: the shared base of all task models."""
    import torch

    from modular import load_model
    from modular.checkpoint import atomic_output_dir
    from moe import AdaMoEConfig, inject_adamoe, upcycle_to_moe

    base = out / "base"
    if (base / "config.json").is_file():
        return base
    dense = load_model(pretrained, dtype=torch.float32)
    model = upcycle_to_moe(dense, num_experts=cfg.num_experts, top_k=cfg.top_k, noise_std=0.01, seed=cfg.seed)
    inject_adamoe(model, AdaMoEConfig(**cfg.adamoe))
    with atomic_output_dir(base) as tmp:
        model.save_pretrained(tmp)
        _tokenizer(out).save_pretrained(tmp)
    print(f"base: {cfg.num_experts} experts, top-{cfg.top_k}, AdaMoE {cfg.adamoe} -> {base}")
    return base


# ----------------------------------------------------------------------------- 4. fine-tune
def finetune_task(cfg: DemoConfig, task: str, base: Path, out: Path) -> Path:
    """One task model, trained by ``cfg.processes`` DeepSpeed processes (resumes if interrupted)."""
    from finetune.launch import free_port

    run_dir = out / "runs" / task
    if (run_dir / "model" / "config.json").is_file():
        return run_dir / "model"
    recipe = {
        "model": {"path": "../../base"},
        "data": {"train": f"../../data/{task}_train.jsonl", "eval": f"../../data/{task}_test.jsonl",
                 "prompt_field": "prompt", "completion_field": "completion", "max_length": 96},
        "lisa": {**cfg.lisa, "seed": cfg.seed},
        "optimizer": {"name": "onebit_adam", "lr": cfg.finetune_lr, "weight_decay": 0.0},
        "deepspeed": "onebit_zero0",
        "training": {"max_steps": cfg.finetune_steps, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
                     "logging_steps": 5, "save_steps": 40, "warmup_steps": 10, "disable_tqdm": False},
        "output_dir": ".",
    }
    path = _write_recipe(run_dir / "recipe.yaml", recipe)
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [str(launcher), "--num_gpus", str(cfg.processes), "--master_port", str(free_port()),
               "--module", "modular.app.train", str(path)]
    print("$ " + " ".join(command), flush=True)
    threads = str(max(1, (os.cpu_count() or 1) // cfg.processes))  # one rank per core: oversubscribed gloo ranks crawl
    proc = subprocess.run(command, cwd=run_dir, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads})
    if not (run_dir / "model" / "config.json").is_file():
        raise RuntimeError(f"fine-tuning {task} stopped before the end (exit status {proc.returncode}); re-run `modular demo` to resume it")
    if proc.returncode != 0:
        print(f"warning: the launcher exited with status {proc.returncode} after the model was written to {run_dir / 'model'}")
    return run_dir / "model"


# ----------------------------------------------------------------------------- 5. merge
def _label_word_task(out: Path, task: str, with_labels: bool = True):
    from merging.label_words import LabelWordTask

    rows = _read_jsonl(out / "data" / f"{task}_test.jsonl")
    classes = json.loads((out / "data" / f"{task}_classes.json").read_text())
    return LabelWordTask(task, [r["prompt"] for r in rows], classes, [r["label"] for r in rows] if with_labels else None)


def merge_task_arithmetic(cfg: DemoConfig, base: Path, task_models: dict[str, Path], out: Path) -> Path:
    """Through the ``modular merge`` CLI and a mergekit-style YAML, as a user would."""
    from .cli import main as modular_main

    target = out / "merges" / "task_arithmetic"
    if (target / "config.json").is_file():
        return target
    config = {
        "base_model": str(base),
        "merge_method": "task_arithmetic",
        "parameters": {"lambda": cfg.task_arithmetic_lambda},
        "models": [{"model": str(path)} for path in task_models.values()],
    }
    path = _write_recipe(out / "merges" / "task_arithmetic.yaml", config)
    if modular_main(["merge", str(path), "--out", str(target)]) != 0:
        raise RuntimeError(f"modular merge {path} failed")
    return target


def merge_adamerging(cfg: DemoConfig, base: Path, task_models: dict[str, Path], out: Path, granularity: str) -> Path:
    """AdaMerging (``granularity``-wise) on the unlabelled test prompts (their labels are not read)."""
    import torch

    from merging import AdaMergingConfig, adamerge_folders

    target = out / "merges" / f"adamerging-{granularity}"
    if (target / "config.json").is_file():
        return target
    tokenizer = _tokenizer(out)
    tasks = [_label_word_task(out, name, with_labels=False).entropy_task(tokenizer) for name in task_models]
    torch.manual_seed(cfg.seed)
    adamerge_folders(base, task_models, tasks, AdaMergingConfig(**cfg.adamerging, granularity=granularity), out=target)
    return target


# ----------------------------------------------------------------------------- 6. evaluate
def evaluate(cfg: DemoConfig, models: dict[str, Path], out: Path) -> Path:
    """Accuracy of every model on every task, and AdaMoE routing on each task's prompts."""
    import torch
    from tqdm.auto import tqdm

    from modular import load_model
    from moe import mean_experts_per_token, routing_stats

    tokenizer = _tokenizer(out)
    tasks = {name: _label_word_task(out, name) for name in cfg.tasks}
    encoded = {name: task.batches(tokenizer, batch_size=64) for name, task in tasks.items()}  # once for all models
    table: dict[str, dict] = {}
    for label, path in tqdm(models.items(), desc="evaluate", unit="model"):
        model = load_model(path, dtype=torch.float32)
        accuracy = {name: task.accuracy(model, tokenizer, batches=encoded[name]) for name, task in tasks.items()}
        experts = []
        for batches in encoded.values():
            with torch.no_grad():
                model(**batches[0])
            experts.append(mean_experts_per_token(routing_stats(model)))
        table[label] = {"accuracy": accuracy, "average": sum(accuracy.values()) / len(accuracy),
                        "mean_experts_per_token": sum(experts) / len(experts), "path": str(path)}
    result = {"tasks": cfg.tasks, "base_top_k": cfg.top_k, "models": table, "config": asdict(cfg)}
    path = out / "evaluation.json"
    path.write_text(json.dumps(result, indent=2))
    return path


# ----------------------------------------------------------------------------- the flow
def run_demo(out: Path, cfg: DemoConfig | None = None) -> Path:
    from .report import write_report

    cfg = cfg or DemoConfig()
    start = time.time()
    out = out.resolve()
    _stage("1/6 data: GCIDE text, tasks and tokenizer")
    prepare_data(cfg, out / "data")
    _stage(f"2/6 pretrain a small llama on GCIDE text ({cfg.pretrain_steps} steps)")
    pretrained = pretrain(cfg, out)
    _stage(f"3/6 inject: upcycle to {cfg.num_experts} experts (top-{cfg.top_k}), AdaMoE null experts")
    base = build_base(cfg, pretrained, out)
    task_models = {}
    for i, task in enumerate(cfg.tasks):
        _stage(f"4/6 fine-tune task {task!r} ({i + 1}/{len(cfg.tasks)}): LISA + 1-bit Adam, DeepSpeed, {cfg.processes} processes")
        task_models[task] = finetune_task(cfg, task, base, out)
    _stage("5/6 merge: task arithmetic and AdaMerging")
    merges = {"task arithmetic": merge_task_arithmetic(cfg, base, task_models, out)}
    for granularity in cfg.adamerging_granularities:
        merges[f"AdaMerging ({granularity}-wise)"] = merge_adamerging(cfg, base, task_models, out, granularity)
    _stage("6/6 evaluate every model on every task, write the report")
    evaluation = evaluate(cfg, {"base (AdaMoE injected)": base, **{f"task model: {t}": p for t, p in task_models.items()}, **merges}, out)
    report = write_report([out], out / "report.html")
    _summary(json.loads(evaluation.read_text()), report, time.time() - start)
    return report


def _summary(evaluation: dict, report: Path, seconds: float) -> None:
    tasks = evaluation["tasks"]
    print(f"\nmodular demo: done in {seconds / 60:.1f} min")
    print(f"{'model':<28}" + "".join(f"{t:>10}" for t in tasks) + f"{'average':>10}{'experts/token':>15}")
    for label, row in evaluation["models"].items():
        print(f"{label:<28}" + "".join(f"{row['accuracy'][t]:>10.3f}" for t in tasks)
              + f"{row['average']:>10.3f}{row['mean_experts_per_token']:>15.2f}")
    print(f"(base MoE: top-{evaluation['base_top_k']} experts per token)")
    print(f"report: {report}")


def run(args: argparse.Namespace) -> int:
    from modular.config_io import from_dict, read_yaml

    cfg = from_dict(DemoConfig, read_yaml(args.config), args.config) if args.config else DemoConfig()
    run_demo(Path(args.out), cfg)
    return 0

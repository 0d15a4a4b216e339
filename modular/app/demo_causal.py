"""``modular demo`` with ``track: causal`` (``examples/demo/causal.yaml``): the decoder flow.

1. data: GCIDE text, the tasks as "definition + cue → class word" prompt / completion rows
   (train / validation / test), a BPE tokenizer trained on the text;
2. pretrain a small llama on the text with a few hundred labelled rows of every task mixed in, so
   the common base already answers in label words (``modular train``, one process);
3. upcycle its MLPs into experts (``moe.upcycle_to_moe``) and inject AdaMoE null experts;
4. fine-tune one model per task with LISA and 1-bit Adam under DeepSpeed, 2 processes;
5. merge: task arithmetic and TIES through ``modular merge`` (λ chosen on validation), AdaMerging
   task- and layer-wise over each task's label words on its unlabelled validation prompts
   (library defaults: agreement with each task model's label-word predictions);
6. evaluate every model on every task by its label words (test split, once).
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from pathlib import Path

from modular.checkpoint import atomic_write_text

from . import demo_common as common
from .demo_common import DemoConfig, Stages

__all__ = ["run_causal"]

PROMPT_CUES = {"pos": "part of speech:", "domain": "subject:", "field": "field:", "etymology": "origin:", "software": "section:"}


def _strip_subject_labels(text: str) -> str:
    """The pretraining text must not give the subject labels away: drop marks like ``(Zool.)``."""
    return re.sub(r"\([A-Z][a-z]*\.\)", " ", text)


def _rows(task: str, class_names: list[str], examples) -> list[dict]:
    return [{"prompt": f"{text} {PROMPT_CUES[task]}", "completion": f" {class_names[y]}", "label": y} for text, y in examples]


def prepare_data(cfg: DemoConfig, data_dir: Path) -> None:
    from .corpora import gcide_paragraphs, train_tokenizer
    from .tasks import text_tasks

    if (data_dir / "done").is_file():
        return
    settings = cfg.causal
    paragraphs = gcide_paragraphs()
    random.Random(cfg.seed).shuffle(paragraphs)
    text = [_strip_subject_labels(p) for p in paragraphs[: settings.pretrain_paragraphs]]
    tasks = text_tasks(tuple(cfg.tasks), train=cfg.train_examples, validation=cfg.validation_examples,
                       test=cfg.test_examples, seed=cfg.seed)
    words = [w for t in tasks.values() for w in t.classes]
    tokenizer = train_tokenizer(text + words * 50, vocab_size=settings.vocab_size)  # label words frequent enough to be tokens
    tokenizer.save_pretrained(data_dir / "tokenizer")
    seen = []
    for name, task in tasks.items():
        for split in ("train", "validation", "test"):
            common.write_jsonl(data_dir / f"{name}_{split}.jsonl", _rows(name, task.classes, getattr(task, split)))
        atomic_write_text(data_dir / f"{name}_classes.json", json.dumps(task.classes))
        seen += [r["prompt"] + r["completion"] for r in _rows(name, task.classes, task.train[: settings.pretrain_task_examples])]
        print(f"task {name}: classes {task.classes}, {len(task.train)} train / {len(task.validation)} validation / {len(task.test)} test")
    pretrain_text = text[:-500] + seen
    random.Random(cfg.seed).shuffle(pretrain_text)
    common.write_jsonl(data_dir / "pretrain_train.jsonl", ({"text": t} for t in pretrain_text))
    common.write_jsonl(data_dir / "pretrain_eval.jsonl", ({"text": t} for t in text[-500:]))
    atomic_write_text(data_dir / "done", "")


def _tokenizer(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out / "data" / "tokenizer")


def pretrain(cfg: DemoConfig, out: Path) -> Path:
    from .recipe import load_recipe
    from .train import run_recipe

    run_dir = out / "runs" / "pretrain"
    if (run_dir / "metrics.json").is_file():
        return run_dir / "model"
    settings = cfg.causal
    recipe = {
        "model": {"config": {**settings.model, "vocab_size": len(_tokenizer(out)), "bos_token_id": 1, "eos_token_id": 2,
                             "pad_token_id": 0}, "tokenizer": "../../data/tokenizer"},
        "data": {"train": "../../data/pretrain_train.jsonl", "eval": "../../data/pretrain_eval.jsonl", "max_length": 128},
        "optimizer": {"name": "adamw", "lr": settings.pretrain_lr, "weight_decay": 0.01},
        "training": {**common.training_arguments(cfg, settings.pretrain_steps), "per_device_train_batch_size": 32,
                     "warmup_steps": max(1, settings.pretrain_steps // 10), "lr_scheduler_type": "cosine", "logging_steps": 10},
        "output_dir": ".",
    }
    return run_recipe(load_recipe(common.write_yaml(run_dir / "recipe.yaml", recipe)))


def build_base(cfg: DemoConfig, pretrained: Path, out: Path) -> Path:
    """Upcycle the dense model into experts and inject AdaMoE: the shared base of all task models."""
    import torch

    from modular import load_model
    from modular.checkpoint import atomic_output_dir
    from moe import AdaMoEConfig, UpcycleConfig, inject_adamoe, upcycle_to_moe

    base = out / "base"
    if (base / "config.json").is_file():
        return base
    dense = load_model(pretrained, dtype=torch.float32)
    model = upcycle_to_moe(dense, UpcycleConfig(**{"seed": cfg.seed, **cfg.causal.upcycle}))
    inject_adamoe(model, AdaMoEConfig(**cfg.adamoe))
    with atomic_output_dir(base) as tmp:
        model.save_pretrained(tmp)
        _tokenizer(out).save_pretrained(tmp)
    return base


def finetune_recipe(cfg: DemoConfig, task: str) -> dict:
    return {
        "model": {"path": "../../base"},
        "data": {"train": f"../../data/{task}_train.jsonl", "eval": f"../../data/{task}_validation.jsonl",
                 "prompt_field": "prompt", "completion_field": "completion", "max_length": 96},
        "lisa": {"seed": cfg.seed, **cfg.lisa},
        "optimizer": {"name": "onebit_adam", "lr": cfg.causal.finetune_lr},
        "deepspeed": "onebit_zero0",
        "training": common.training_arguments(cfg, cfg.finetune_steps),
        "output_dir": ".",
    }


class LabelWordEvaluator:
    """Every task's label-word accuracy of a model folder, on validation or test prompts."""

    def __init__(self, cfg: DemoConfig, out: Path):
        from merging.label_words import LabelWordTask

        self.tokenizer = _tokenizer(out)
        self.tasks = {split: {t: LabelWordTask(t, [r["prompt"] for r in rows], common.classes(out, t), [r["label"] for r in rows])
                              for t in cfg.tasks for rows in [common.read_jsonl(out / "data" / f"{t}_{split}.jsonl")]}
                      for split in ("validation", "test")}
        self.batches = {split: {t: task.batches(self.tokenizer, 64) for t, task in tasks.items()} for split, tasks in self.tasks.items()}

    def accuracy(self, folder: Path, split: str) -> dict:
        import torch

        from modular import load_model

        model = load_model(folder, dtype=torch.float32)
        return {t: task.accuracy(model, self.tokenizer, batches=self.batches[split][t]) for t, task in self.tasks[split].items()}

    def test(self, folder: Path) -> dict:
        import torch

        from modular import load_model
        from moe import mean_experts_per_token, routing_stats

        row = {"accuracy": self.accuracy(folder, "test")}
        model = load_model(folder, dtype=torch.float32)
        experts = []
        for batches in self.batches["test"].values():
            with torch.no_grad():
                model(**batches[0])
            experts.append(mean_experts_per_token(routing_stats(model)))
        row["mean_experts_per_token"] = sum(experts) / len(experts)
        return row


def _merge_score(method: str, out: Path, task_models: dict[str, Path], evaluator: LabelWordEvaluator):
    """λ -> mean validation accuracy of the merge written to a temporary folder (the same writer as
    ``modular merge``; the checkpoint's fused-expert names need the loader to read them back)."""
    from merging import TaskVector, merge

    task_vectors = [TaskVector.from_models(out / "base", p, label=t) for t, p in task_models.items()]

    def score(lam: float) -> float:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            folder = merge(method, out / "base", task_vectors, lambda_=lam, out=Path(tmp) / "m", progress=False)
            accuracy = evaluator.accuracy(folder, "validation")
        return sum(accuracy.values()) / len(accuracy)

    return score


def _adamerging(cfg: DemoConfig, out: Path, task_models: dict[str, Path], granularity: str) -> Path:
    """AdaMerging on the entropy over each task's label words (its unlabelled validation prompts)."""
    import torch

    from merging import AdaMergingConfig, adamerge_folders
    from merging.label_words import LabelWordTask

    target = out / "merges" / f"adamerging_{granularity}"
    if (target / "config.json").is_file():
        return target
    tokenizer = _tokenizer(out)
    tasks = [LabelWordTask(t, [r["prompt"] for r in common.read_jsonl(out / "data" / f"{t}_validation.jsonl")], common.classes(out, t)).entropy_task(tokenizer)
             for t in task_models]
    settings = {k: v for k, v in cfg.adamerging.items() if k not in ("batch_size", "max_length")}
    torch.manual_seed(cfg.seed)
    adamerge_folders(out / "base", task_models, tasks, AdaMergingConfig(**settings, granularity=granularity), out=target, force=True)
    return target


def run_causal(cfg: DemoConfig, out: Path, stage: Stages) -> dict:
    from tqdm.auto import tqdm

    stage("1/6 data: GCIDE text, prompt/completion tasks (train / validation / test), tokenizer")
    prepare_data(cfg, out / "data")
    stage(f"2/6 pretrain a small llama on GCIDE text ({cfg.causal.pretrain_steps} steps)")
    pretrained = pretrain(cfg, out)
    stage("3/6 inject: upcycle to experts, AdaMoE null experts")
    base = build_base(cfg, pretrained, out)
    stage(f"4/6 fine-tune {', '.join(cfg.tasks)}: LISA + 1-bit Adam, DeepSpeed, {cfg.processes} processes")
    task_models = common.finetune(cfg, {task: finetune_recipe(cfg, task) for task in cfg.tasks}, out)
    stage("5/6 merge: task arithmetic and TIES (λ on validation, modular merge), AdaMerging on label words")
    evaluator = LabelWordEvaluator(cfg, out)
    merges, grids = common.static_merges(cfg, task_models, out, lambda method: _merge_score(method, out, task_models, evaluator))
    for granularity in cfg.adamerging_granularities:
        merges[f"adamerging_{granularity}"] = _adamerging(cfg, out, task_models, granularity)
    stage("6/6 evaluate every model on every task (test split), write the report")
    models = {"base (upcycled, AdaMoE)": base, **{f"task model: {t}": p for t, p in task_models.items()},
              **{common.MERGE_LABELS[k]: p for k, p in merges.items()}}
    table = {}
    for label, path in tqdm(models.items(), desc="evaluate", unit="model"):
        table[label] = evaluator.test(path)
        # which merge, and which settings of this track, a user would pick without the test split
        validation = table[label]["validation"] = evaluator.accuracy(path, "validation")
        table[label]["validation_average"] = sum(validation.values()) / len(validation)
    return common.finish_table(cfg, table, base_label="base (upcycled, AdaMoE)", grids=grids, track="causal",
                        extra={"base_top_k": cfg.causal.upcycle.get("top_k")})

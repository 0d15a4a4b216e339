"""``modular merge CONFIG.yaml --out DIR`` and ``modular task-vector extract|apply``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import MergeConfig, load_merge_config
from .merge import merge
from .streaming import CheckpointSource, parse_size
from .task_vector import TaskVector

__all__ = ["add_parser", "add_task_vector_parser", "run_merge"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge fine-tuned models (task arithmetic, TIES, DARE, AdaMerging) from a YAML config")
    p.add_argument("config", help="YAML config (mergekit-like; see merging/config.py and examples/merge.yaml)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=lambda args: _merge_command(args))


def _merge_command(args: argparse.Namespace) -> int:
    config = load_merge_config(args.config)
    out = run_merge(config, args.out, force=args.force, progress=not args.no_progress, config_text=Path(args.config).read_text())
    print(f"merged model written to {out}")
    return 0


def run_merge(config: MergeConfig, out, *, force: bool = False, progress: bool = True, config_text: str | None = None) -> Path:
    """Run one parsed config; returns the output folder."""
    base = CheckpointSource(config.base_model)
    task_vectors = [TaskVector.from_models(base, m.model, label=m.model) for m in config.models]  # checks shapes
    tokenizer = None if config.tokenizer_source == "base" else config.tokenizer_source
    common = dict(
        out=out, force=force, dtype=config.dtype, tokenizer_source=tokenizer, max_shard_bytes=parse_size(config.out_shard_size),
        card={"Configuration": f"```yaml\n{config_text.strip()}\n```"} if config_text else None, progress=progress,
    )
    if config.merge_method != "adamerging":
        return merge(config.merge_method, base, task_vectors, weights=config.per_model("weight", 1.0), **common, **config.method_params())
    return _run_adamerging(config, common)


def _run_adamerging(config: MergeConfig, common: dict) -> Path:
    """Causal-LM AdaMerging: next-token entropy on each model's unlabelled prompts. Runs on the
    loaded models (their parameter names) and saves with ``save_pretrained`` (merging.model_merge)."""
    from transformers import AutoTokenizer

    from .adamerging import EntropyTask
    from .model_merge import adamerge_folders, save_merged_model

    section = config.adamerging
    tokenizer_source = common["tokenizer_source"] or config.base_model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tasks = []
    for entry in config.models:
        data = Path(entry.data)
        if not data.is_file():
            raise FileNotFoundError(f"models[{entry.model}].data: {str(data)!r} does not exist")
        prompts = [line.strip() for line in data.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"adamerging needs unlabelled data: {str(data)!r} has no prompts")
        batches = [
            dict(tokenizer(prompts[i : i + section.batch_size], return_tensors="pt", padding=True, truncation=True, max_length=section.max_length))
            for i in range(0, len(prompts), section.batch_size)
        ]
        tasks.append(EntropyTask(entry.model, batches))
    finetuned = {entry.model: entry.model for entry in config.models}
    model, result = adamerge_folders(config.base_model, finetuned, tasks, section.method_config(), progress=common["progress"])
    return save_merged_model(model, result, common["out"], tokenizer_source=tokenizer_source, force=common["force"], card=common["card"])


def add_task_vector_parser(subparsers) -> None:
    p = subparsers.add_parser("task-vector", help="extract a task vector (fine-tuned − base, or a LoRA adapter) or apply one")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ex = sub.add_parser("extract", help="τ = fine-tuned − base (or the dense delta of a LoRA adapter), saved as safetensors")
    src = ex.add_mutually_exclusive_group(required=True)
    src.add_argument("--finetuned", help="fine-tuned model folder (needs --base)")
    src.add_argument("--lora", help="PEFT LoRA adapter folder")
    ex.add_argument("--base", help="base model folder")
    ex.add_argument("--out", required=True)
    ex.add_argument("--force", action="store_true")
    ex.set_defaults(func=_extract)
    ap = sub.add_parser("apply", help="write base + scale · τ as a model folder")
    ap.add_argument("--base", required=True)
    ap.add_argument("--task-vector", required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--force", action="store_true")
    ap.set_defaults(func=_apply)


def _extract(args: argparse.Namespace) -> int:
    if args.finetuned and not args.base:
        raise ValueError("task-vector extract --finetuned needs --base")
    tv = TaskVector.from_lora(args.lora) if args.lora else TaskVector.from_models(args.base, args.finetuned)
    print(f"task vector ({len(tv.names())} tensors) written to {tv.save(args.out, force=args.force)}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    tv = TaskVector.load(args.task_vector)
    print(f"model written to {tv.apply(args.base, args.out, scale=args.scale, force=args.force)}")
    return 0

"""``modular merge CONFIG.yaml OUT`` and ``modular task-vector extract|apply``."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["apply_task_vector", "extract_task_vector", "run_merge_command"]


def run_merge_command(args: argparse.Namespace) -> int:
    from merging import load_merge_config, run_merge

    out = args.out or args.out_path
    if out is None or (args.out and args.out_path and args.out != args.out_path):
        raise ValueError("give the output folder once: modular merge CONFIG OUT (or --out OUT)")
    config = load_merge_config(args.config)
    out = run_merge(config, out, force=args.force, progress=not args.no_progress, config_text=Path(args.config).read_text(),
                    random_seed=args.random_seed, compute_dtype=args.compute_dtype, out_shard_size=args.out_shard_size)
    print(f"merged model written to {out}")
    return 0


def extract_task_vector(args: argparse.Namespace) -> int:
    from merging import TaskVector

    if args.finetuned and not args.base:
        raise ValueError("task-vector extract --finetuned needs --base")
    tv = TaskVector.from_lora(args.lora) if args.lora else TaskVector.from_models(args.base, args.finetuned)
    print(f"task vector ({len(tv.names())} tensors) written to {tv.save(args.out, force=args.force)}")
    return 0


def apply_task_vector(args: argparse.Namespace) -> int:
    from merging import TaskVector, merge

    tv = TaskVector.load(args.task_vector)
    out = merge("task_arithmetic", args.base, [tv], lambda_=args.scale, out=args.out, force=args.force)
    print(f"model written to {out}")
    return 0

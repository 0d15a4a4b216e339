"""The ``modular`` command: every subcommand's options, in one place.

Each subcommand runs a function of its own module, imported only when that subcommand runs, so
``modular --help`` and ``modular SUBCOMMAND --help`` start fast. Other packages can add
subcommands through the ``modular.commands`` entry-point group (``name = package.module:add_parser``,
where ``add_parser(subparsers)`` adds one subparser and sets ``func(args) -> int``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from importlib.metadata import entry_points

__all__ = ["build_parser", "main"]


def _runs(target: str):
    """``func`` for a subparser: import ``module:function`` when the subcommand runs."""
    module, function = target.split(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


def _add_builtin(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole flow (inject, LISA + 1-bit Adam under DeepSpeed, merge, report) on CPU")
    p.add_argument("--out", default="demo-output", help="output folder; a re-run continues an interrupted demo (default: demo-output)")
    p.add_argument("--config", help="YAML overriding DemoConfig fields (sizes, steps, tasks); default: the embedded settings")
    p.set_defaults(func=_runs("modular.app.demo:run"))

    p = subparsers.add_parser("train", help="fine-tune a model from a recipe YAML (inject, LISA, 1-bit Adam, DeepSpeed)")
    p.add_argument("recipes", nargs="+", metavar="RECIPE",
                   help="recipe file(s) (see docs/recipes.md); several run one after the other in the same processes")
    p.set_defaults(func=_runs("modular.app.train:run"))

    p = subparsers.add_parser("merge", help="merge models from a mergekit YAML config (TIES, DARE, linear, SLERP, ..., AdaMerging)")
    p.add_argument("config", help="YAML config, mergekit's schema (see docs/merging.md)")
    p.add_argument("out_path", nargs="?", metavar="OUT", help="output folder, written atomically (as mergekit-yaml's OUT_PATH)")
    p.add_argument("--out", help="output folder (instead of OUT)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--random-seed", type=int, default=0, help="seed of DARE/DELLA masks; mergekit's option (same seed, same masks)")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16", "float64", "mergekit"],
                   help="dtype the merge computes in (default: the config's compute_dtype, float32); "
                        "mergekit = the config's dtype, as mergekit computes")
    p.add_argument("--out-shard-size", help="largest output shard, e.g. 500MB or 5GB (default: the config's, 500MB)")
    p.add_argument("--lora-merge-cache", metavar="DIR", help="accepted for mergekit commands; not needed (adapters are merged in memory)")
    p.set_defaults(func=_runs("modular.app.merge:run_merge_command"))

    p = subparsers.add_parser("task-vector", help="extract a task vector (fine-tuned − base, or a LoRA adapter) or apply one")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ex = actions.add_parser("extract", help="τ = fine-tuned − base (or the dense delta of a LoRA adapter), saved as safetensors")
    source = ex.add_mutually_exclusive_group(required=True)
    source.add_argument("--finetuned", help="fine-tuned model folder (needs --base)")
    source.add_argument("--lora", help="PEFT LoRA adapter folder")
    ex.add_argument("--base", help="base model folder")
    ex.add_argument("--out", required=True, help="a folder, or one FILE.safetensors")
    ex.add_argument("--force", action="store_true")
    ex.set_defaults(func=_runs("modular.app.merge:extract_task_vector"))
    ap = actions.add_parser("apply", help="write base + scale · τ as a model folder")
    ap.add_argument("--base", required=True)
    ap.add_argument("--task-vector", required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--force", action="store_true")
    ap.set_defaults(func=_runs("modular.app.merge:apply_task_vector"))

    p = subparsers.add_parser("report", help="render an HTML report (plots inlined) of training runs, merges and evaluations")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="folders with metrics.json / adamerging_coefficients.json / evaluation.json")
    p.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
    p.add_argument("--force", action="store_true", help="replace an existing report")
    p.set_defaults(func=_runs("modular.app.report:run"))

    p = subparsers.add_parser("moe-stats", help="routing statistics of an AdaMoE model (JSON + PNG plot)")
    p.add_argument("model", help="folder written by save_pretrained (AdaMoE-injected)")
    p.add_argument("--out", help="PNG path (default: MODEL/routing_stats.png)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the random token batch routed")
    p.set_defaults(func=_runs("modular.app.moe_stats:run"))

    p = subparsers.add_parser("doctor", help="show versions, devices and backends available to modular-llm")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_runs("modular.app.doctor:run"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modular",
        description="modular-llm: inject adaptive computation into HF models, fine-tune with LISA + 1-bit Adam, merge with AdaMerging.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_builtin(subparsers)
    for ep in sorted(entry_points(group="modular.commands"), key=lambda e: e.name):
        ep.load()(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds as Ctrl-C does (temporary outputs removed)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # `modular train` installs its own graceful stop
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        name, code = ("SIGTERM", 128 + signal.SIGTERM) if isinstance(err, Terminated) else ("Ctrl-C", 128 + signal.SIGINT)
        print(f"modular {args.command}: stopped by {name}; unfinished outputs were removed", file=sys.stderr)
        return code
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        # Bad input: one clear line, no traceback. Set MODULAR_DEBUG=1 for the traceback.
        if os.environ.get("MODULAR_DEBUG"):
            raise
        print(f"modular {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

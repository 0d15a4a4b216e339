"""What both tracks of ``modular demo`` share: the settings, stage timing, files, the fine-tune
launcher (DeepSpeed, restartable), the λ choice on validation, ``modular merge`` runs and the table."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from modular.checkpoint import atomic_write_text

__all__ = ["CausalSettings", "DemoConfig", "MERGE_LABELS", "Stages", "choose_lambda", "chosen_lambda", "classes", "finetune", "finish_table",
           "read_jsonl", "run_merge_yaml", "static_merges", "training_arguments", "write_jsonl", "write_yaml"]


@dataclass
class CausalSettings:
    """The decoder track: a small llama pretrained on GCIDE text, upcycled into experts with AdaMoE,
    tasks answered with label words (``modular.app.demo_causal``)."""

    pretrain_paragraphs: int = 40000
    pretrain_task_examples: int = 300  # labelled rows per task mixed into pretraining
    vocab_size: int = 4096
    model: dict = field(default_factory=lambda: dict(
        model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    ))
    pretrain_steps: int = 300
    pretrain_lr: float = 2e-3
    upcycle: dict = field(default_factory=lambda: dict(num_experts=4, top_k=2, noise_std=0.01))
    finetune_lr: float = 1e-3


@dataclass
class DemoConfig:
    """Settings of ``modular demo`` (``--config`` YAML overrides them). Method settings not listed
    here are the library's defaults; what the demo sets is sizes, the split of the model between
    experts and ACMs, and the λ grid that the validation split chooses from."""

    track: Literal["encoder", "causal"] = "encoder"
    base_model: str | None = None  # encoder track: a BERT-family folder; default the packaged all-MiniLM-L6-v2
    tasks: list[str] = field(default_factory=lambda: ["pos", "domain", "software"])
    train_examples: int = 600
    validation_examples: int = 150
    test_examples: int = 300
    max_length: int = 48
    calibration_sentences: int = 256  # GCIDE paragraphs the injections are calibrated on
    experts: dict = field(default_factory=lambda: dict(num_experts=8, top_k=4, layers=[3, 4, 5]))  # FFNExpertsConfig
    acm: dict = field(default_factory=lambda: dict(distill_steps=100, gate_steps=100))  # ACMConfig, the other FFNs
    adamoe: dict = field(default_factory=dict)  # AdaMoEConfig on the experts blocks
    finetune_steps: int = 75
    per_device_batch_size: int = 8
    lisa: dict = field(default_factory=dict)  # LisaConfig
    processes: int = 2
    lambda_grid: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0])
    adamerging: dict = field(default_factory=dict)  # the `adamerging:` YAML section
    adamerging_granularities: list[str] = field(default_factory=lambda: ["task", "layer"])
    causal: CausalSettings = field(default_factory=CausalSettings)
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise ValueError(f"tasks: merging needs at least 2 tasks, got {self.tasks!r}")
        for name in ("train_examples", "validation_examples", "test_examples", "finetune_steps", "processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lambda_grid:
            raise ValueError("lambda_grid: give at least one λ")
        bad = set(self.adamerging_granularities) - {"task", "layer"}
        if bad:
            raise ValueError(f"adamerging_granularities: {sorted(bad)} not allowed; expected 'task' and/or 'layer'")


MERGE_LABELS = {"task_arithmetic": "task arithmetic", "ties": "TIES",
                "adamerging_task": "AdaMerging (task-wise)", "adamerging_layer": "AdaMerging (layer-wise)"}


class Stages:
    """Prints each stage's title and keeps how long each took in this invocation (``timings.json``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._title, self._start = None, time.time()

    def __call__(self, title: str) -> None:
        self._stop()
        self._title, self._start = title, time.time()
        print(f"\n=== {title} ===", flush=True)

    def _stop(self) -> None:
        if self._title is not None:
            self.seconds[self._title] = round(time.time() - self._start, 1)

    def save(self, path: Path) -> None:
        self._stop()
        self._title = None
        atomic_write_text(path, json.dumps(self.seconds, indent=2))


def write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_yaml(path: Path, doc: dict, header: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, header + yaml.safe_dump(doc, sort_keys=False))


def classes(out: Path, task: str) -> list[str]:
    return json.loads((out / "data" / f"{task}_classes.json").read_text())


def training_arguments(cfg: DemoConfig, steps: int) -> dict:
    return {"max_steps": steps, "per_device_train_batch_size": cfg.per_device_batch_size, "per_device_eval_batch_size": 64,
            "logging_steps": 5, "save_strategy": "no", "seed": cfg.seed, "data_seed": cfg.seed, "disable_tqdm": False}


def finetune(cfg: DemoConfig, recipes: dict[str, dict], out: Path) -> dict[str, Path]:
    """The task models (``runs/<task>/model``), trained by ``cfg.processes`` DeepSpeed processes:
    one launch for every task not done yet, the recipes run one after the other (the start-up is
    paid once). Runs without a ``done`` mark are left from an interrupted launch: its processes
    are stopped if they still live, and the runs are redone from scratch, so that a re-run ends
    with the same models."""
    from finetune.launch import free_port

    runs = out / "runs"
    todo = [task for task in recipes if not (runs / task / "done").is_file()]
    if todo:
        pgid = runs / "launcher.pgid"
        if pgid.is_file():
            _stop_group(int(pgid.read_text()))
        for task in todo:
            shutil.rmtree(runs / task, ignore_errors=True)
        paths = [str(write_yaml(runs / task / "recipe.yaml", recipes[task])) for task in todo]
        launcher = Path(sys.executable).parent / "deepspeed"
        command = [str(launcher), "--num_gpus", str(cfg.processes), "--master_port", str(free_port()),
                   "--module", "modular.app.train", *paths]
        print("$ " + " ".join(command), flush=True)
        threads = str(max(1, (os.cpu_count() or 1) // cfg.processes))  # one rank per core: oversubscribed gloo ranks crawl
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads}
        # its own process group, so that a later run can stop what an interrupted one left behind
        proc = subprocess.Popen(command, cwd=runs, env=env, start_new_session=True)
        atomic_write_text(pgid, str(proc.pid))
        try:
            status = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: stop the launcher and its ranks too
            _stop_group(proc.pid, proc)
            raise
        missing = [task for task in todo if not (runs / task / "metrics.json").is_file()]
        if missing:
            raise RuntimeError(f"fine-tuning {', '.join(missing)} stopped before the end (exit status {status}); re-run `modular demo`")
        if status != 0:
            print(f"warning: the launcher exited with status {status} after every model was written")
        for task in todo:
            atomic_write_text(runs / task / "done", "")
        pgid.unlink()
    return {task: runs / task / "model" for task in recipes}


def _stop_group(pgid: int, child: subprocess.Popen | None = None) -> None:
    """SIGKILL the process group ``pgid`` and wait (up to 30 s: unreaped zombies stay members)
    until none of its processes runs; ``child``: our own process at its head, reaped here."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
        if child is not None:
            child.wait()
        for _ in range(150):
            os.killpg(pgid, 0)
            time.sleep(0.2)


def run_merge_yaml(out: Path, name: str, doc: dict, header: str) -> Path:
    """Write ``merges/NAME.yaml`` (paths relative to ``out``) and run ``modular merge`` on it from ``out``."""
    from .cli import main as modular_main

    target = out / "merges" / name
    if (target / "config.json").is_file():
        return target
    rerun = f"# rerun by hand: cd {out} && modular merge merges/{name}.yaml --out merges/{name} --force\n"
    write_yaml(out / "merges" / f"{name}.yaml", doc, header + rerun)
    with contextlib.chdir(out):
        if modular_main(["merge", f"merges/{name}.yaml", "--out", f"merges/{name}", "--force", "--no-progress"]) != 0:
            raise RuntimeError(f"modular merge merges/{name}.yaml failed")
    return target


def static_merges(cfg: DemoConfig, task_models: dict[str, Path], out: Path, score_for) -> tuple[dict[str, Path], dict]:
    """Task arithmetic and TIES, each at the λ of ``cfg.lambda_grid`` with the best mean validation
    accuracy (``score_for(method)(λ)``), through ``modular merge``; and the grids' scores."""
    merges, grids = {}, {}
    for method in ("task_arithmetic", "ties"):
        lam, grids[method] = choose_lambda(method, out, cfg.lambda_grid, score_for(method))
        header = f"# λ chosen on the validation split from {cfg.lambda_grid} (mean accuracy {grids[method][lam]:.3f})\n"
        doc = {"merge_method": method, "base_model": "base", "parameters": {"lambda": lam},
               "models": [{"model": str(path.relative_to(out))} for path in task_models.values()]}
        merges[method] = run_merge_yaml(out, method, doc, header)
    return merges, grids


def choose_lambda(method: str, out: Path, grid: list[float], score) -> tuple[float, dict]:
    """The λ of ``grid`` with the best mean validation accuracy (``score(λ)``; ties: the smaller
    λ), and every grid point's score (kept in ``merges/METHOD_lambda_grid.json``)."""
    path = out / "merges" / f"{method}_lambda_grid.json"
    if path.is_file():
        scores = {float(k): v for k, v in json.loads(path.read_text()).items()}
    else:
        scores = {lam: score(lam) for lam in grid}
        atomic_write_text(path, json.dumps(scores, indent=2))
    best = chosen_lambda(scores)
    print(f"{method}: mean validation accuracy by λ {', '.join(f'{k:g}: {v:.3f}' for k, v in scores.items())} -> λ {best:g}")
    return best, scores


def chosen_lambda(scores: dict[float, float]) -> float:
    """The λ with the best score; ties: the smaller λ."""
    return max(sorted(scores), key=lambda lam: scores[lam])


def finish_table(cfg: DemoConfig, table: dict, *, base_label: str, grids: dict, track: str, extra: dict | None = None) -> dict:
    """Averages, accuracy normalised by each task's own task model, and the share of each task
    model's gain over the base that a model recovers."""
    tasks = cfg.tasks
    own = {t: table[f"task model: {t}"]["accuracy"][t] for t in tasks}
    base = table[base_label]["accuracy"]
    for row in table.values():
        acc = row["accuracy"]
        row["average"] = sum(acc.values()) / len(tasks)
        row["normalized"] = {t: acc[t] / own[t] if own[t] else float("nan") for t in tasks}
        row["normalized_average"] = sum(row["normalized"].values()) / len(tasks)
        row["recovered"] = {t: (acc[t] - base[t]) / (own[t] - base[t]) if own[t] != base[t] else float("nan") for t in tasks}
    return {"track": track, "tasks": tasks, "models": table, "lambda_grids": grids, "config": asdict(cfg), **(extra or {})}

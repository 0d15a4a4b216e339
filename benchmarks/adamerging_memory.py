"""Peak memory of layer-wise AdaMerging at LLM scale: streamed, in memory, and the dense-stacked way.

K = 4 task models of a llama-architecture causal LM (~320M parameters, random weights: memory
does not depend on the values) in bf16, saved as checkpoint folders next to their base (a
subprocess writes them to a temporary folder first); the task vectors are read from the folders
tensor by tensor (``TaskVector.from_models``), as a user's would be. Each variant runs in its own
subprocess (peak RSS is per process), loads the base with ``modular.load_model`` and runs a few
steps of layer-wise AdaMerging with the library's defaults otherwise:

* ``stream`` (this library, ``stream_task_vectors=True``): θ_0 (the model) only; the K deltas of a
  tensor are read from the folders each time a step needs them (merging/jit_merge.py forms the
  merged weights per module just in time). This is ``peak_mb``.
* ``jit`` (this library's default, in memory): θ_0 + the K deltas held in the model's dtype,
  (1 + K)× one model before the interpreter, the libraries and the activations.
* ``stacked`` (how it worked before, reimplemented minimally here): the K deltas stacked per
  tensor into (K, ...) in the model's dtype, θ_0 + Σ λ τ rebuilt for every parameter each step
  and run through ``torch.func.functional_call`` (the merged copy lives until backward); the
  paper's entropy objective. The old code also held K eager float32 deltas on top of the stack
  (adamerge_folders), which this minimal version leaves out: it is a lower bound of the old peak.

    OMP_NUM_THREADS=1 .venv/bin/python -u benchmarks/adamerging_memory.py
    OMP_NUM_THREADS=1 .venv/bin/python -u benchmarks/adamerging_memory.py --jobs 3   # the variants at once

Last line: JSON with ``model_mb`` (parameter bytes), ``k``, ``peak_mb`` (peak RSS of the streamed
process), ``baseline_mb`` (its RSS after the imports, before the model exists),
``seconds_per_step``, ``in_memory_peak_mb`` / ``in_memory_seconds_per_step`` (the default),
``stacked_peak_mb``, ``stacked_seconds_per_step``, ``bound_mb`` = (1 + k) × model_mb,
``within_bound`` and ``config``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

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


def write_task_models(folder: Path, k: int, scale: float = 1e-3) -> None:
    """``folder/base`` and ``folder/task{t}`` (base + seeded random bf16 deltas), save_pretrained folders."""
    model = random_model(torch.bfloat16)
    model.save_pretrained(folder / "base")
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    for t in range(k):
        for name, tensor in model.state_dict().items():
            generator = torch.Generator().manual_seed(zlib.crc32(f"{t}:{name}".encode()))
            tensor.copy_(base[name] + torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * scale)
        model.save_pretrained(folder / f"task{t}")


def unlabelled_tasks(k: int, batch: int, length: int, vocab: int):
    from merging import EntropyTask

    generator = torch.Generator().manual_seed(1)
    return [EntropyTask(f"task{t}", [{"input_ids": torch.randint(4, vocab, (batch, length), generator=generator),
                                      "attention_mask": torch.ones(batch, length, dtype=torch.long)} for _ in range(2)])
            for t in range(k)]


def run_library(model, tvs, tasks, steps: int, stream: bool, init: str) -> list[float]:
    """Library AdaMerging (defaults, layer-wise); the wall time of each step, from the callback."""
    from merging import AdaMergingConfig, adamerge

    stamps = []
    config = AdaMergingConfig(granularity="layer", steps=steps, stream_task_vectors=stream,
                              init=init if init == "search" else float(init))
    adamerge(model, tvs, tasks, config, progress=False, callback=lambda step, snapshot: stamps.append(time.perf_counter()))
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
    from merging import TaskVector
    from modular import load_model

    baseline = rss_mb()
    folder = Path(args.folder)
    model = load_model(folder / "base").eval()
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    tvs = [TaskVector.from_models(folder / "base", folder / f"task{t}", label=f"task{t}") for t in range(args.k)]
    tasks = unlabelled_tasks(args.k, args.batch, args.length, CONFIG["vocab_size"])
    if args.variant == "stacked":
        times = run_stacked(model, tvs, tasks, args.steps)
    else:
        times = run_library(model, tvs, tasks, args.steps, stream=args.variant == "stream", init=args.init)
    return {"variant": args.variant, "model_mb": round(model_mb, 1), "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(model.dtype), "peak_mb": round(peak_rss_mb(), 1), "baseline_mb": round(baseline, 1),
            "seconds_per_step": round(statistics.median(times), 2) if times else None}


def _init_argument(text: str) -> str:
    """``--init``: 'search' or a number, checked before any work (kept as given: it is echoed in the config)."""
    if text != "search":
        try:
            float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not 'search' or a number") from None
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["all", "stream", "jit", "stacked"], default="all")
    parser.add_argument("--folder", help="where the task models are (written first when --variant all)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="sequences per task per step")
    parser.add_argument("--length", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init", default="search", type=_init_argument, help="AdaMerging's init: 'search' (the default: 10 forwards "
                        "without gradients before the steps, each reading the task vectors when streamed) or a number")
    parser.add_argument("--jobs", type=int, default=1, help="variants run at once (peak RSS is per process; "
                        "seconds per step are then contended)")
    parser.add_argument("--write-models", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_models:
        write_task_models(Path(args.write_models), args.k)
        return
    if args.k < 1 or args.steps < 2 or args.jobs < 1:
        parser.error(f"--k and --jobs must be >= 1 and --steps >= 2 (the first step is not timed); "
                     f"got {args.k}, {args.jobs}, {args.steps}")
    if args.variant != "all":
        if not args.folder:
            parser.error(f"--variant {args.variant} needs --folder (the task models written by --variant all)")
        print(json.dumps(one_variant(args)))
        return
    out = {}
    with tempfile.TemporaryDirectory(prefix="adamerging_memory-") as folder:
        subprocess.run([sys.executable, "-u", __file__, "--write-models", folder, f"--k={args.k}"], check=True)
        variants = ["stream", "jit", "stacked"]
        for start in range(0, len(variants), args.jobs):
            running = {variant: subprocess.Popen(
                [sys.executable, "-u", __file__, "--variant", variant, "--folder", folder,
                 *(f"--{k}={getattr(args, k)}" for k in ("k", "steps", "batch", "length", "threads", "init"))],
                stdout=subprocess.PIPE, text=True) for variant in variants[start : start + args.jobs]}
            for variant, process in running.items():
                stdout, _ = process.communicate()
                if process.returncode:
                    raise SystemExit(f"variant {variant} failed with exit status {process.returncode}")
                out[variant] = json.loads(stdout.strip().splitlines()[-1])
                print(f"{variant}: {out[variant]}", flush=True)
    stream, jit, stacked = out["stream"], out["jit"], out["stacked"]
    bound = (1 + args.k) * stream["model_mb"]
    print(json.dumps({
        "model_mb": stream["model_mb"], "k": args.k, "peak_mb": stream["peak_mb"], "baseline_mb": stream["baseline_mb"],
        "seconds_per_step": stream["seconds_per_step"], "in_memory_peak_mb": jit["peak_mb"],
        "in_memory_seconds_per_step": jit["seconds_per_step"], "stacked_peak_mb": stacked["peak_mb"],
        "stacked_seconds_per_step": stacked["seconds_per_step"], "bound_mb": round(bound, 1),
        "within_bound": stream["peak_mb"] <= bound, "in_memory_within_bound": jit["peak_mb"] <= bound,
        "config": {"model": {"architecture": "LlamaForCausalLM", "dtype": stream["dtype"], "parameters": stream["parameters"],
                             **CONFIG},
                   "adamerging": "library defaults, granularity layer (peak_mb: stream_task_vectors=True)", "init": args.init,
                   "steps": args.steps, "batch": args.batch, "length": args.length, "threads": args.threads, "jobs": args.jobs,
                   "task_vectors": "TaskVector.from_models over save_pretrained folders", "stacked_objective": "entropy"},
    }))


if __name__ == "__main__":
    main()

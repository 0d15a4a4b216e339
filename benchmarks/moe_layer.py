"""Experts implementations side by side, forward + backward: HF ``eager``, ``grouped_mm`` (transformers'
default) and ``batched_mm`` against ours (``modular``), with and without null picks.

One Mixtral experts block (8 experts, hidden 512, ffn 1024, fp32 on the CPU), 4096 tokens, top-2,
2 threads, one fixed routing (distinct experts per token). ``modular_null50`` is the same routing
with half of the (token, expert) pairs sent to the null sentinel. ``grouped_mm`` and ``batched_mm``
do not skip the sentinel outside expert parallelism (they compute garbage rows for it), so they are
timed on the routing without nulls only; ``batched_mm`` gathers one weight matrix per pair and is
skipped (``null``, with the reason) when that would take more than half the free memory. Timings
are medians over interleaved repeats (every variant once per round, so machine drift hits all alike).

``--device cuda --dtype bfloat16`` runs the same comparison on a GPU (``make gpu-check``), adding
megablocks when it is installed.

    flock /tmp/modular-bench.lock .venv/bin/python benchmarks/moe_layer.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import moe  # noqa: F401  (registers the "modular" and "megablocks" experts implementations)


def fwd_bwd(experts, impl, hidden, index, weights, grad, sync):
    experts.config._experts_implementation = impl
    hidden = hidden.detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out = experts(hidden, index, weights)
    out.backward(grad)
    sync()
    return [out.detach(), hidden.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad]


def batched_mm_bytes(experts, pairs: int) -> int:
    """What ``batched_mm`` gathers: one (out, in) weight matrix per pair, for the larger projection."""
    return pairs * max(experts.gate_up_proj[0].numel(), experts.down_proj[0].numel()) * experts.gate_up_proj.element_size()


def free_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def megablocks_available() -> bool:
    try:
        moe.experts._megablocks_gmm()
        return True
    except ImportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k)
    experts = MixtralExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    experts = experts.to(device, dtype)
    hidden = torch.randn(args.tokens, args.hidden).to(device, dtype)
    index = torch.rand(args.tokens, args.experts).argsort(-1)[:, : args.top_k].to(device)  # distinct experts per token
    weights = torch.softmax(torch.randn(args.tokens, args.top_k), -1).to(device, dtype)
    index_null50 = index.clone()
    index_null50.view(-1)[torch.randperm(index.numel())[: index.numel() // 2]] = args.experts  # the sentinel
    grad = torch.randn(args.tokens, args.hidden).to(device, dtype)

    variants = {"eager": ("eager", index), "grouped_mm": ("grouped_mm", index), "modular": ("modular", index),
                "modular_null50": ("modular", index_null50), "eager_null50": ("eager", index_null50)}
    skipped = {}
    need = batched_mm_bytes(experts, index.numel())
    if need > free_bytes(args.device) // 2:
        skipped["batched_mm"] = f"gathers one weight matrix per (token, expert) pair: {need / 2**30:.1f} GiB"
    else:
        variants["batched_mm"] = ("batched_mm", index)
    if megablocks_available():
        variants.update(megablocks=("megablocks", index), megablocks_null50=("megablocks", index_null50))
    else:
        skipped["megablocks"] = "not installed (pip install 'modular-llm[megablocks]'; CUDA only)"

    print(f"correctness vs eager (forward output and every gradient), {args.tokens} tokens", flush=True)
    diffs = {}
    for name, (impl, idx) in variants.items():
        if impl != "eager":
            want = fwd_bwd(experts, "eager", hidden, idx, weights, grad, sync)
            got = fwd_bwd(experts, impl, hidden, idx, weights, grad, sync)
            diffs[name] = max((a.float() - b.float()).abs().max().item() for a, b in zip(want, got))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for impl, idx in variants.values():  # warm-up
        fwd_bwd(experts, impl, hidden, idx, weights, grad, sync)
    for _ in tqdm(range(args.repeats), desc="interleaved rounds"):
        for name, (impl, idx) in variants.items():
            start = time.perf_counter()
            fwd_bwd(experts, impl, hidden, idx, weights, grad, sync)
            times[name].append((time.perf_counter() - start) * 1000)
    ms = {f"{name}_ms": round(statistics.median(t), 2) for name, t in times.items()}
    ms.update({f"{name}_ms": None for name in skipped})
    result = {
        **ms,
        "max_abs_diff_vs_eager": max(diffs.values()),
        "max_abs_diff_vs_eager_by_variant": diffs,
        "modular_over_best_hf": round(ms["modular_ms"] / min(ms["eager_ms"], ms["grouped_mm_ms"]), 3),
        "null50_over_modular": round(ms["modular_null50_ms"] / ms["modular_ms"], 3),
        "skipped": skipped,
        "config": vars(args),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Experts implementations side by side: HF ``eager`` vs ours (``modular``), forward + backward.

One Mixtral experts block (8 experts, hidden 512, ffn 1024, fp32), 4096 tokens, top-2, 2
threads, one fixed routing; ``modular_null50`` is the same routing with half of the (token,
expert) assignments sent to the null sentinel. Timings are medians over interleaved repeats
(every variant once per round, so machine drift hits all alike).

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

import moe  # noqa: F401  (registers the "modular" experts implementation)


def fwd_bwd(experts, impl, hidden, index, weights, grad):
    experts.config._experts_implementation = impl
    hidden = hidden.detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out = experts(hidden, index, weights)
    out.backward(grad)
    return [out.detach(), hidden.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k)
    experts = MixtralExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    hidden = torch.randn(args.tokens, args.hidden)
    index = torch.rand(args.tokens, args.experts).argsort(-1)[:, : args.top_k]  # distinct experts per token
    weights = torch.softmax(torch.randn(args.tokens, args.top_k), -1)
    index_null50 = index.clone()
    index_null50.view(-1)[torch.randperm(index.numel())[: index.numel() // 2]] = args.experts  # the sentinel
    grad = torch.randn(args.tokens, args.hidden)

    variants = {
        "eager": ("eager", index), "modular": ("modular", index),
        "modular_null50": ("modular", index_null50), "eager_null50": ("eager", index_null50),
    }
    print(f"correctness vs eager (forward output and every gradient), {args.tokens} tokens", flush=True)
    diff = 0.0
    for idx in (index, index_null50):
        want, got = fwd_bwd(experts, "eager", hidden, idx, weights, grad), fwd_bwd(experts, "modular", hidden, idx, weights, grad)
        diff = max(diff, *((a - b).abs().max().item() for a, b in zip(want, got)))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for impl, idx in variants.values():  # warm-up
        fwd_bwd(experts, impl, hidden, idx, weights, grad)
    for _ in tqdm(range(args.repeats), desc="interleaved rounds"):
        for name, (impl, idx) in variants.items():
            start = time.perf_counter()
            fwd_bwd(experts, impl, hidden, idx, weights, grad)
            times[name].append((time.perf_counter() - start) * 1000)
    ms = {f"{name}_ms": round(statistics.median(t), 2) for name, t in times.items()}
    result = {
        **ms,
        "max_abs_diff_vs_eager": diff,
        "modular_over_eager": round(ms["modular_ms"] / ms["eager_ms"], 3),
        "null50_over_modular": round(ms["modular_null50_ms"] / ms["modular_ms"], 3),
        "config": vars(args),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

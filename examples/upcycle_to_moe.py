"""Sparse upcycling: a dense llama becomes a Mixtral whose experts are copies of its MLPs, then
AdaMoE goes on top.

    .venv/bin/python examples/upcycle_to_moe.py

1. a tiny dense llama (mistral, qwen2 and qwen3 work the same way: the registry names the MoE
   family each one upcycles into);
2. ``upcycle_to_moe`` with identical experts: same logits as the dense model;
3. with noise on the copies (so experts can specialise) and AdaMoE null experts injected.
"""

import torch

from modular.testing import tiny_model
from moe import AdaMoEConfig, inject_adamoe, routing_stats, upcycle_to_moe

ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
dense = tiny_model("llama")
with torch.no_grad():
    dense_logits = dense(ids).logits

moe = upcycle_to_moe(dense, num_experts=8, top_k=2)
with torch.no_grad():
    diff = (moe(ids).logits - dense_logits).abs().max().item()
print(f"{dense.config.model_type} -> {moe.config.model_type}: max |logit difference| {diff:.2e}")

moe = upcycle_to_moe(dense, num_experts=8, top_k=2, noise_std=1e-3)
inject_adamoe(moe, AdaMoEConfig(num_null_experts=16, top_k=4))
with torch.no_grad():
    diff = (moe(ids).logits - dense_logits).abs().max().item()
print(f"with noisy experts and AdaMoE: max |logit difference| {diff:.2e}")
print("routing:", [(s["router"], s["experts_per_token"], round(s["null_share"], 2)) for s in routing_stats(moe)])

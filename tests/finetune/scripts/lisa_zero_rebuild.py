"""``finetune.lisa_zero.rebuild_zero_optimizer`` on a raw bf16 ZeRO-2 engine (2 gloo ranks), run by
tests/finetune/test_lisa_distributed.py.

``deepspeed --num_gpus 2 lisa_zero_rebuild.py OUT.json``: a tiny llama in bf16 (DeepSpeed's bf16 on, so
ZeRO keeps fp32 master weights) trains 2 steps with embeddings, head, final norm and layer 0; then the
optimizer is rebuilt three times: adding layer 1 (the flat buffers grow: every slice moves between
ranks), switching to layer 2 alone (they shrink again) and to layer 3 (same size: slices stay put).
After each rebuild every rank records whether the staying parameters' full fp32 master weights and
moments are unchanged, whether the new layers' moments are zero, and how many elements its partitions
hold; a final step must train. Rank 0 writes OUT.json.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from finetune import close_process_group, deepspeed_config
from finetune.lisa_zero import rebuild_zero_optimizer
from modular.testing import tiny_model

KEYS = ("exp_avg", "exp_avg_sq")


def full_state(engine, p) -> dict[str, torch.Tensor]:
    """``p``'s fp32 master and moments at full size, assembled from the ranks' slices of the flat state
    (DeepSpeed's own ``safe_get_full_optimizer_state`` has no views for groups after the first)."""
    basic, mapping = engine.basic_optimizer, getattr(p, "_hp_mapping", None)
    out = {}
    for key in ("master", *KEYS):
        full = torch.zeros(p.numel())
        if mapping is not None:
            flat = basic.param_groups[mapping.param_group_index]["params"][0]
            source = flat if key == "master" else basic.state[flat][key]
            address, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            full.narrow(0, lp.start, lp.numel).copy_(source.narrow(0, address.start, address.numel))
        dist.all_reduce(full)
        out[key] = full
    return out


def step(engine, rank: int, seed: int) -> float:
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed + rank))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model = tiny_model("llama", num_hidden_layers=4).train()
    layers = [list(layer.parameters()) for layer in model.model.layers]
    fixed = [p for n, p in model.named_parameters() if not n.startswith("model.layers.")]
    for params in layers[1:]:
        for p in params:
            p.requires_grad_(False)
    config = deepspeed_config("zero2", train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
                              train_batch_size=4, gradient_clipping=1.0)
    config["bf16"] = {"enabled": True}
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": [p for p in model.parameters() if p.requires_grad and p.dim() == 1],
                                    "weight_decay": 0.0}], lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    out = {"param_dtypes": sorted({str(p.dtype) for p in model.parameters()}), "losses": [], "rebuilds": []}
    for seed in range(2):
        out["losses"].append(step(engine, rank, seed))
    for active in ([0, 1], [2], [3]):
        staying = fixed + (layers[0] if 0 in active else [])
        before = {id(p): full_state(engine, p) for p in staying}
        weights = [p.detach().clone() for p in model.parameters()]
        for i, params in enumerate(layers):
            for p in params:
                p.requires_grad_(i in active)
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [[p for p in trainable if p.dim() > 1], [p for p in trainable if p.dim() == 1]]
        rebuild_zero_optimizer(engine, None, groups, staying)
        new_layers = [p for i in active if i != 0 for p in layers[i]]
        basic = engine.basic_optimizer
        out["rebuilds"].append({
            "active": active,
            "staying_state_kept": all(torch.equal(before[id(p)][k], v) for p in staying for k, v in full_state(engine, p).items()),
            "new_moments_zero": all(not full_state(engine, p)[k].any() for p in new_layers for k in KEYS),
            "weights_kept": all(torch.equal(a, b) for a, b in zip(weights, model.parameters())),
            "held": sum(g["params"][0].numel() for g in basic.param_groups),
            "trainable": sum(p.numel() for p in trainable),
        })
    held = torch.tensor([r["held"] for r in out["rebuilds"]])
    dist.all_reduce(held)
    out["held_all_ranks"] = held.tolist()
    before = [p.detach().clone() for p in layers[3]]
    out["losses"].append(step(engine, rank, 10))
    out["last_layer_trained"] = not all(torch.equal(a, b) for a, b in zip(before, layers[3]))
    out["frozen_unchanged"] = all(p.grad is None for p in layers[0])
    if rank == 0:
        Path(sys.argv[-1]).write_text(json.dumps(out))
    close_process_group()


if __name__ == "__main__":
    main()

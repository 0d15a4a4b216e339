"""OneBitAdam as a DeepSpeed client optimizer (ZeRO 0, gloo), run by tests/finetune/test_onebit_distributed.py.

``deepspeed --num_gpus 2 onebit_deepspeed_train.py [--bf16] OUT.json``: a tiny llama trains 6 steps with
``freeze_step=2``; DeepSpeed's gradient all-reduce is switched off, every rank checks that its
gradients are local and that parameters agree bit for bit after each step. Rank 0 writes OUT.json.
``--bf16``: the model's weights are bf16 (DeepSpeed's own bf16 stays off) and layer 1 is frozen
after step 2, as LISA would.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from finetune import OneBitAdam, close_process_group, deepspeed_config, skip_host_allreduce
from modular.testing import tiny_model


def same_on_all_ranks(tensors) -> bool:
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    config = deepspeed_config("onebit_zero0", train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
                              train_batch_size=4, gradient_clipping=0.0)
    bf16 = "--bf16" in sys.argv
    model = tiny_model("llama").train().to(torch.bfloat16 if bf16 else torch.float32)
    frozen = list(model.model.layers[1].parameters())
    optimizer = OneBitAdam(model.parameters(), lr=1e-2, freeze_step=2, block_size=64)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    skip_host_allreduce(engine)
    out = {"identical": [], "local_grads": [], "fp32_bytes": [], "compressed_bytes": [], "losses": [],
           "optimizer_class": type(engine.optimizer).__name__, "zero_stage": engine.zero_optimization_stage()}
    for step in range(6):
        if bf16 and step == 2:
            for p in frozen:
                p.requires_grad_(False)
            frozen_at_2 = [p.detach().clone() for p in frozen]
        ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(100 * step + rank))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        out["local_grads"].append(not same_on_all_ranks([p.grad for p in model.parameters() if p.grad is not None]))
        fp32, comp = dict(engine.optimizer.comm_stats.bytes_sent).values()
        engine.step()
        stats = engine.optimizer.comm_stats.bytes_sent
        out["fp32_bytes"].append(stats["fp32"] - fp32)
        out["compressed_bytes"].append(stats["compressed"] - comp)
        out["identical"].append(same_on_all_ranks(model.parameters()))
        out["losses"].append(loss.item())
    out["n_params"] = sum(p.numel() for p in model.parameters())
    out["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    out["state_dtypes"] = sorted({str(v.dtype) for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v)})
    if bf16:
        out["frozen_unchanged"] = all(torch.equal(a, b) for a, b in zip(frozen_at_2, frozen))
    if rank == 0:
        with open(sys.argv[-1], "w") as f:
            json.dump(out, f)
    close_process_group()


if __name__ == "__main__":
    main()

"""2-process checks of OneBitAdam and the compressed all-reduce, run by tests/finetune/test_onebit_distributed.py.

Started with ``torchrun --nproc_per_node 2 onebit_torchrun_checks.py OUT.json``; rank 0 writes the
measured numbers to OUT.json, the test asserts on them. Every rank compares its parameters with the
other rank's after every step.
"""

import copy
import io
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from finetune import Communicator, OneBitAdam, close_process_group, skip_host_allreduce


def same_on_all_ranks(tensors) -> bool:
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def batch(step: int, rank: int, size: int = 8):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(size, 12, generator=g)
    return x, x.sin().sum(dim=1, keepdim=True)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def check_comm_convergence(rank: int) -> dict:
    """Same inputs every round: the running mean of the compressed averages approaches the true mean."""
    n, rounds = 1000, 120  # 1000 is not a multiple of world * block: exercises padding
    x = torch.randn(n, generator=torch.Generator().manual_seed(rank))
    true_mean = x.clone()
    dist.all_reduce(true_mean)
    true_mean /= dist.get_world_size()
    result = {}
    for name, feedback in (("with_feedback", True), ("without_feedback", False)):
        comm = Communicator(block_size=64)
        padded, _ = comm.padded_length(n)
        werr, serr = torch.zeros(padded), torch.zeros(padded)
        total = torch.zeros(padded)
        for i in range(rounds):
            if not feedback:
                werr.zero_(), serr.zero_()
            out = comm.compressed_all_reduce(torch.cat([x, x.new_zeros(padded - n)]), werr, serr)
            total += out
            if i + 1 == rounds // 2:
                half = total[:n] / (i + 1)
                result[f"{name}_half"] = ((half - true_mean).norm() / true_mean.norm()).item()
        running = total[:n] / rounds
        result[name] = ((running - true_mean).norm() / true_mean.norm()).item()
        result[f"{name}_single_round"] = ((out[:n] - true_mean).norm() / true_mean.norm()).item()
        result[f"{name}_identical"] = same_on_all_ranks([out])
        if name == "with_feedback":
            result["compressed_bytes_per_call"] = comm.stats.bytes_sent["compressed"] / rounds
            result["fp32_bytes_per_call"] = n * 4
    return result


def check_ddp_training(rank: int) -> dict:
    """DDP with its all-reduce skipped: warm-up equals AdamW on the global batch; ranks stay identical."""
    model = make_model()
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    skip_host_allreduce(ddp)
    opt = OneBitAdam(ddp.parameters(), lr=1e-2, weight_decay=0.01, freeze_step=4, block_size=64)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
    out = {"identical": [], "warmup_max_diff_vs_adamw": 0.0, "local_grads_differ": None, "bytes": []}
    for step in range(10):
        x, y = batch(step, rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        if step == 0:
            out["local_grads_differ"] = not same_on_all_ranks([p.grad for p in model.parameters()])
        before = opt.comm_stats.total_bytes
        opt.step()
        out["bytes"].append(opt.comm_stats.total_bytes - before)
        out["identical"].append(same_on_all_ranks(model.parameters()))
        if step < 4:  # reference: AdamW on both ranks' batches together
            xs, ys = zip(*(batch(step, r) for r in range(dist.get_world_size())))
            ref_opt.zero_grad()
            torch.nn.functional.mse_loss(reference(torch.cat(xs)), torch.cat(ys)).backward()
            ref_opt.step()
            diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))
            out["warmup_max_diff_vs_adamw"] = max(out["warmup_max_diff_vs_adamw"], diff)
    out["n_params"] = sum(p.numel() for p in model.parameters())
    return out


def check_lisa(rank: int) -> dict:
    """Params without grad are skipped; a layer whose state was popped gets its own fp32 warm-up."""
    model = make_model()
    layers = [model[0], model[2], model[4]]
    opt = OneBitAdam(model.parameters(), lr=1e-2, freeze_step=2, param_warmup_steps=3, block_size=64)
    # step -> active layers (same on all ranks, as LISA samples them); layer 1 is off at steps 0-3,
    # its state popped at step 4 and it comes back at step 4 -> 3 fp32 warm-up steps for it alone.
    plan = [(0, 2), (0, 2), (0, 2), (0, 2), (0, 1, 2), (0, 1, 2), (0, 1, 2), (0, 1, 2), (0, 1, 2)]
    out = {"identical": [], "skipped_unchanged": [], "fp32_bytes": [], "compressed_bytes": [], "layer1_steps": []}
    for step, active in enumerate(plan):
        for i, layer in enumerate(layers):
            layer.requires_grad_(i in active)
            if i not in active:
                for p in layer.parameters():
                    p.grad = None
        if step == 4:
            for p in layers[1].parameters():
                opt.state.pop(p, None)
        frozen = [p.detach().clone() for i, layer in enumerate(layers) if i not in active for p in layer.parameters()]
        x, y = batch(step, rank)
        torch.nn.functional.mse_loss(model(x), y).backward()
        fp32, comp = opt.comm_stats.bytes_sent["fp32"], opt.comm_stats.bytes_sent["compressed"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["fp32_bytes"].append(opt.comm_stats.bytes_sent["fp32"] - fp32)
        out["compressed_bytes"].append(opt.comm_stats.bytes_sent["compressed"] - comp)
        now = [p for i, layer in enumerate(layers) if i not in active for p in layer.parameters()]
        out["skipped_unchanged"].append(all(torch.equal(a, b) for a, b in zip(frozen, now)))
        out["identical"].append(same_on_all_ranks(model.parameters()))
        out["layer1_steps"].append(opt.state[layers[1].weight].get("step", 0) if layers[1].weight in opt.state else 0)
    out["layer1_numel"] = sum(p.numel() for p in layers[1].parameters())
    return out


def run(model, opt, steps, rank):
    for step in steps:
        x, y = batch(step, rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def check_resume(rank: int) -> dict:
    """10 steps straight == 5 steps, save (model + per-rank optimizer state), load in fresh objects, 5 steps."""
    kwargs = dict(lr=1e-2, weight_decay=0.01, freeze_step=3, block_size=64)
    straight = make_model()
    opt = OneBitAdam(straight.parameters(), **kwargs)
    run(straight, opt, range(10), rank)

    first = make_model()
    opt1 = OneBitAdam(first.parameters(), **kwargs)
    run(first, opt1, range(5), rank)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    state_keys = sorted(opt1.state_dict()["state"][0])
    error_norm = opt1.state_dict()["state"][0]["worker_error"].norm().item()
    buf.seek(0)
    saved = torch.load(buf)
    resumed = make_model(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = OneBitAdam(resumed.parameters(), **kwargs)
    opt2.load_state_dict(saved["opt"])
    run(resumed, opt2, range(5, 10), rank)
    return {
        "bitwise_equal": all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters())),
        "state_keys": state_keys,
        "worker_error_norm_at_save": error_norm,
    }


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {
        "comm": check_comm_convergence(rank),
        "ddp": check_ddp_training(rank),
        "lisa": check_lisa(rank),
        "resume": check_resume(rank),
    }
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    close_process_group()


if __name__ == "__main__":
    main()

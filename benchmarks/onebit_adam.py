"""1-bit Adam vs AdamW: bytes on the wire and convergence, 2 gloo processes on CPU.

A small llama (byte-level vocabulary) is trained on real English text — paragraphs of the GCIDE
dictionary (Debian package ``dict-gcide``, read by :mod:`modular.app.corpora`; no network) — twice, from the
same pretrained base, with the same seeds, data, steps and lr schedule:

* **AdamW**: gradients averaged by an fp32 all-reduce (what DDP does), then ``torch.optim.AdamW``;
* **OneBitAdam**: ``freeze_step`` = 15 % of the steps of fp32 warm-up, then 1-bit momentum.

Both exchange through :class:`finetune.comm.Communicator`, which counts the bytes handed to every
collective. Output: progress lines, a PNG of both loss curves under ``benchmarks/out/onebit_adam/``,
and one JSON line with ``fp32_bytes_per_step``, ``compressed_bytes_per_step``, ``adamw_total_bytes``,
``onebit_total_bytes``, ``adamw_eval_loss``, ``onebit_eval_loss`` (per rank; eval loss on held-out text).

    flock /tmp/modular-bench.lock .venv/bin/python benchmarks/onebit_adam.py [--steps 300]
"""

import argparse
import json
import math
import os
import random
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modular.app.corpora import gcide_paragraphs

OUT = Path(__file__).parent / "out" / "onebit_adam"


def gcide_text(max_bytes: int, seed: int) -> bytes:
    """GCIDE dictionary paragraphs (definitions, quotations) in a seeded random order, UTF-8, up to max_bytes."""
    paragraphs = gcide_paragraphs()
    random.Random(seed).shuffle(paragraphs)  # file order is alphabetical: shuffle so every split sees all letters
    return "\n".join(paragraphs).encode("utf-8")[:max_bytes]


def build_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def batch(data: torch.Tensor, seq: int, size: int, seed: int) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq, (size,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([data[s:s + seq] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, eval_batches) -> float:
    model.eval()
    loss = sum(model(input_ids=b, labels=b).loss.item() for b in eval_batches) / len(eval_batches)
    model.train()
    return loss


def pretrain(args, data: torch.Tensor) -> dict:
    """The shared starting point: plain AdamW on ``data``, computed identically on every rank (no
    communication), so both fine-tuning runs start from the same weights."""
    model = build_model(args.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    for step in range(args.pretrain_steps):
        ids = batch(data, args.seq_len, 2 * args.batch_size, seed=args.seed * 100003 + 7 * 10**6 + step)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return model.state_dict()


def train(rank: int, world: int, method: str, args, train_data, eval_batches, base: dict) -> dict:
    from finetune import Communicator, OneBitAdam

    model = build_model(args.seed).train()
    model.load_state_dict(base)
    params = list(model.parameters())
    kw = dict(lr=args.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=args.weight_decay)
    if method == "adamw":
        opt, comm = torch.optim.AdamW(params, **kw), Communicator()
    else:
        opt = OneBitAdam(params, freeze_step=args.freeze_step, block_size=args.block_size, **kw)
        comm = opt.communicator
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    curve, bytes_per_step, start = [], [], time.time()
    for step in range(args.steps):
        ids = batch(train_data, args.seq_len, args.batch_size, seed=args.seed * 100003 + step * world + rank)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        before = comm.stats.total_bytes
        if method == "adamw":  # what DDP does: fp32 all-reduce of the flattened gradients
            flat = comm.all_reduce_mean(torch.cat([p.grad.reshape(-1) for p in params]))
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
        opt.step()
        sched.step()
        bytes_per_step.append(comm.stats.total_bytes - before)
        if step % args.eval_every == 0 or step == args.steps - 1:
            curve.append((step, loss.item(), evaluate(model, eval_batches)))
            if rank == 0:
                print(f"[{method}] step {step:4d} train {loss.item():.4f} eval {curve[-1][2]:.4f} "
                      f"bytes/step {bytes_per_step[-1]} ({time.time() - start:.0f}s)", flush=True)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    other = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(other, flat)
    return {"curve": curve, "bytes_per_step": bytes_per_step, "ranks_identical": all(torch.equal(o, other[0]) for o in other),
            "seconds": time.time() - start}


def worker(rank: int, world: int, port: int, args, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    text = torch.frombuffer(bytearray(gcide_text(args.text_bytes, args.seed)), dtype=torch.uint8).long()
    # [pretraining text | fine-tuning text | held-out eval text]
    pre_end, eval_start = int(args.pretrain_fraction * text.numel()), int(0.95 * text.numel())
    pre_data, train_data, eval_data = text[:pre_end], text[pre_end:eval_start], text[eval_start:]
    eval_batches = [batch(eval_data, args.seq_len, 16, seed=10**6 + i) for i in range(args.eval_batches)]
    if rank == 0:
        print(f"text: {text.numel()} bytes of GCIDE paragraphs; {sum(p.numel() for p in build_model(0).parameters())} params",
              flush=True)
    base = pretrain(args, pre_data)
    if rank == 0:
        print(f"base model: {args.pretrain_steps} AdamW steps on {pre_data.numel()} bytes, eval {evaluate_base(base, eval_batches):.4f}",
              flush=True)
    results = {method: train(rank, world, method, args, train_data, eval_batches, base) for method in ("adamw", "onebit")}
    if rank == 0:
        torch.save(results, result_path)
    dist.destroy_process_group()


def evaluate_base(state: dict, eval_batches) -> float:
    model = build_model(0)
    model.load_state_dict(state)
    return evaluate(model, eval_batches)


def plot(results: dict, freeze_step: int, path: Path) -> None:
    from modular.plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, style in (("adamw", "-"), ("onebit", "--")):
        steps, train_loss, eval_loss = zip(*results[method]["curve"])
        ax.plot(steps, eval_loss, style, label=f"{method} eval")
        ax.plot(steps, train_loss, style, alpha=0.35, label=f"{method} train")
    ax.axvline(freeze_step, color="grey", lw=0.8, label="freeze_step")
    ax.set(xlabel="step", ylabel="loss (nats/byte)", title="AdamW vs 1-bit Adam, 2 gloo ranks, GCIDE text")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup-fraction", type=float, default=0.15)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pretrain-steps", type=int, default=200,
                        help="AdamW steps (uncounted, identical on all ranks) before the compared runs; 0 = from scratch")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--pretrain-fraction", type=float, default=0.5, help="share of the text used for pretraining")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--text-bytes", type=int, default=2_000_000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=1024, help="elements per 1-bit scale")
    args = parser.parse_args(argv)
    args.freeze_step = max(1, round(args.warmup_fraction * args.steps))
    OUT.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_path, plot_path = str(OUT / f"results_lr{args.lr:g}.pt"), OUT / f"loss_curves_lr{args.lr:g}.png"
    mp.spawn(worker, args=(2, port, args, result_path), nprocs=2)
    results = torch.load(result_path)
    plot(results, args.freeze_step, plot_path)
    adamw, onebit = results["adamw"], results["onebit"]
    compressed_steps = onebit["bytes_per_step"][args.freeze_step:]
    summary = {
        "fp32_bytes_per_step": adamw["bytes_per_step"][-1],
        "compressed_bytes_per_step": compressed_steps[-1],
        "adamw_total_bytes": sum(adamw["bytes_per_step"]),
        "onebit_total_bytes": sum(onebit["bytes_per_step"]),
        "adamw_eval_loss": adamw["curve"][-1][2],
        "onebit_eval_loss": onebit["curve"][-1][2],
        "per_step_ratio": adamw["bytes_per_step"][-1] / compressed_steps[-1],
        "total_ratio": sum(adamw["bytes_per_step"]) / sum(onebit["bytes_per_step"]),
        "eval_loss_rel_diff": onebit["curve"][-1][2] / adamw["curve"][-1][2] - 1,
        "ranks_identical": adamw["ranks_identical"] and onebit["ranks_identical"],
        "steps": args.steps, "freeze_step": args.freeze_step, "pretrain_steps": args.pretrain_steps, "world_size": 2,
        "adamw_seconds": round(adamw["seconds"], 1), "onebit_seconds": round(onebit["seconds"], 1),
        "lr": args.lr, "plot": str(plot_path),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(main() and 0)

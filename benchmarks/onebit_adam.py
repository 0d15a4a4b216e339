"""1-bit Adam vs AdamW: bytes on the wire and convergence, 2 gloo processes on CPU, two model sizes,
mean ± sd over seeds.

Protocol (fixed before any test number was read):

* Text: GCIDE dictionary paragraphs (Debian package ``dict-gcide``, :func:`common.gcide_splits`;
  no network), bytes as tokens. The ``train`` stream's first half pretrains the shared base
  model (``--pretrain-steps`` AdamW steps, identical on both ranks, uncounted), its second half
  is the fine-tuning data; ``validation`` and ``test`` are the other two streams (earlier
  versions of this benchmark evaluated on the last 5 % of a shuffled mix of all paragraphs).
* Models: byte-level llamas of two sizes (``SIZES``: 0.9M and 3.3M parameters).
* Per size and seed, from the same base with the same data, steps and lr schedule, twice:
  **AdamW** with gradients averaged by an fp32 all-reduce (what DDP does), and
  **OneBitAdam** with ``freeze_step`` = 15 % of the steps of fp32 warm-up, then 1-bit momentum.
  Both exchange through :class:`finetune.comm.Communicator`, which counts the bytes handed to
  every collective.
* Each optimizer's learning rate is chosen from ``--lrs`` by its final validation loss with the
  first seed (per size); every seed then runs at those rates. Test loss is computed once per
  optimizer, size and seed, from the final weights (cached as safetensors, so a re-run only
  evaluates).

Output: progress lines, a PNG of both validation curves per size under
``benchmarks/out/onebit_adam/``, and one JSON line with ``fp32_bytes_per_step``,
``compressed_bytes_per_step``, ``adamw_total_bytes``, ``onebit_total_bytes`` and per size the
test losses (mean ± sd), their relative difference and the config.

    flock /tmp/modular-bench.lock .venv/bin/python benchmarks/onebit_adam.py
"""

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import gcide_splits, mean_sd, settings_hash
from safetensors.torch import load_file, save_file

OUT = Path(__file__).parent / "out" / "onebit_adam"
CACHE = OUT / "cache"
METHODS = ("adamw", "onebit")
SIZES = {
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "medium": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8),
}


def text_streams(pretrain_fraction: float) -> dict[str, torch.Tensor]:
    """Byte tensors: ``pretrain`` and ``finetune`` (the train stream split), ``validation``, ``test``."""
    def as_bytes(paragraphs: list[str]) -> torch.Tensor:
        return torch.frombuffer(bytearray("\n".join(paragraphs).encode("utf-8")), dtype=torch.uint8).long()

    splits = gcide_splits()
    train = as_bytes(splits["train"])
    cut = int(pretrain_fraction * train.numel())
    return {"pretrain": train[:cut], "finetune": train[cut:], "validation": as_bytes(splits["validation"]),
            "test": as_bytes(splits["test"])}


def build_model(size: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, **SIZES[size])
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def batch(data: torch.Tensor, seq: int, size: int, seed: int) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq, (size,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([data[s:s + seq] for s in starts.tolist()])


def eval_batches(data: torch.Tensor, args) -> list[torch.Tensor]:
    return [batch(data, args.seq_len, 16, seed=10**6 + i) for i in range(args.eval_batches)]


@torch.no_grad()
def evaluate(model, batches) -> float:
    was_training = model.training
    model.eval()
    loss = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    model.train(was_training)
    return loss


def pretrain(args, size: str, seed: int, data: torch.Tensor) -> dict:
    """The shared starting point: plain AdamW on ``data``, computed identically on every rank (no
    communication), so both fine-tuning runs start from the same weights."""
    model = build_model(size, seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    for step in range(args.pretrain_steps):
        ids = batch(data, args.seq_len, 2 * args.batch_size, seed=seed * 100003 + 7 * 10**6 + step)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return model.state_dict()


def train(rank: int, world: int, method: str, args, size: str, seed: int, lr: float, streams, base: dict) -> dict:
    from finetune import Communicator, OneBitAdam

    model = build_model(size, seed).train()
    model.load_state_dict(base)
    params = list(model.parameters())
    kw = dict(lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=args.weight_decay)
    if method == "adamw":
        opt, comm = torch.optim.AdamW(params, **kw), Communicator()
    else:
        opt = OneBitAdam(params, freeze_step=args.freeze_step, block_size=args.block_size, **kw)
        comm = opt.communicator
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    validation = eval_batches(streams["validation"], args)
    curve, bytes_per_step, start = [], [], time.time()
    for step in range(args.steps):
        ids = batch(streams["finetune"], args.seq_len, args.batch_size, seed=seed * 100003 + step * world + rank)
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
            curve.append((step, loss.item(), evaluate(model, validation)))
            if rank == 0:
                print(f"[{size} {method} lr {lr:g} seed {seed}] step {step:4d} train {loss.item():.4f} "
                      f"validation {curve[-1][2]:.4f} bytes/step {bytes_per_step[-1]} ({time.time() - start:.0f}s)", flush=True)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    other = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(other, flat)
    record = {"curve": curve, "bytes_per_step": bytes_per_step, "seconds": round(time.time() - start, 1),
              "ranks_identical": all(torch.equal(o, other[0]) for o in other)}
    return record, {k: v.contiguous() for k, v in model.state_dict().items()}


def run_key(args, size: str, seed: int, lr: float, method: str) -> Path:
    settings = {k: getattr(args, k) for k in ("steps", "freeze_step", "batch_size", "seq_len", "pretrain_steps", "pretrain_lr",
                                              "pretrain_fraction", "weight_decay", "eval_every", "eval_batches", "block_size")}
    return CACHE / f"{size}-{method}-{settings_hash({**settings, 'size': size, 'seed': seed, 'lr': lr, 'method': method})}"


def worker(rank: int, world: int, port: int, args, size: str, seed: int, lr: float, methods: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    streams = text_streams(args.pretrain_fraction)
    base = pretrain(args, size, seed, streams["pretrain"])
    for method in methods:
        record, state = train(rank, world, method, args, size, seed, lr, streams, base)
        if rank == 0:  # weights, then the record: a run counts as cached once its JSON exists
            path = run_key(args, size, seed, lr, method)
            CACHE.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file(state, str(tmp))
            os.replace(tmp, path.with_suffix(".safetensors"))
            path.with_suffix(".json").write_text(json.dumps(record))
    dist.destroy_process_group()


def run(args, size: str, seed: int, lr: float, methods: list[str]) -> dict[str, dict]:
    """Records of ``methods`` at (size, seed, lr), from the cache or from 2 gloo processes."""
    todo = [m for m in methods if not run_key(args, size, seed, lr, m).with_suffix(".json").is_file()]
    if todo:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(2, port, args, size, seed, lr, todo), nprocs=2)
    return {m: json.loads(run_key(args, size, seed, lr, m).with_suffix(".json").read_text()) for m in methods}


def test_loss(args, size: str, seed: int, lr: float, method: str, batches) -> float:
    model = build_model(size, seed)
    model.load_state_dict(load_file(run_key(args, size, seed, lr, method).with_suffix(".safetensors")))
    return evaluate(model, batches)


def _or_inf(loss: float) -> float:
    """A diverged (NaN) run ranks last."""
    return loss if math.isfinite(loss) else math.inf


def plot(records: dict, freeze_step: int, path: Path, title: str) -> None:
    from modular.plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, style in (("adamw", "-"), ("onebit", "--")):
        steps, train_loss, val_loss = zip(*records[method]["curve"])
        ax.plot(steps, val_loss, style, label=f"{method} validation")
        ax.plot(steps, train_loss, style, alpha=0.35, label=f"{method} train")
    ax.axvline(freeze_step, color="grey", lw=0.8, label="freeze_step")
    ax.set(xlabel="step", ylabel="loss (nats/byte)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=lambda t: t.split(","), default=list(SIZES))
    parser.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
    parser.add_argument("--lrs", type=lambda t: [float(x) for x in t.split(",")], default=[1e-3, 2e-3],
                        help="learning rates; each optimizer's is chosen on validation (first seed, per size)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup-fraction", type=float, default=0.15)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pretrain-steps", type=int, default=200,
                        help="AdamW steps (uncounted, identical on all ranks) before the compared runs; 0 = from scratch")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--pretrain-fraction", type=float, default=0.5, help="share of the train stream used for pretraining")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=1024, help="elements per 1-bit scale")
    args = parser.parse_args(argv)
    unknown = set(args.sizes) - set(SIZES)
    if unknown:
        parser.error(f"--sizes: unknown {sorted(unknown)}; known: {', '.join(SIZES)}")
    args.freeze_step = max(1, round(args.warmup_fraction * args.steps))
    OUT.mkdir(parents=True, exist_ok=True)
    test_batches = eval_batches(text_streams(args.pretrain_fraction)["test"], args)
    first, summary = args.seeds[0], {}
    for size in args.sizes:
        grid = {lr: run(args, size, first, lr, list(METHODS)) for lr in args.lrs}
        chosen = {m: min(args.lrs, key=lambda lr, m=m: _or_inf(grid[lr][m]["curve"][-1][2])) for m in METHODS}
        records = {s: {m: run(args, size, s, chosen[m], [m])[m] for m in METHODS} for s in args.seeds}
        test = {m: mean_sd([test_loss(args, size, s, chosen[m], m, test_batches) for s in args.seeds]) for m in METHODS}
        rel = mean_sd([o / a - 1 for a, o in zip(test["adamw"]["values"], test["onebit"]["values"])])
        plot(records[first], args.freeze_step, OUT / f"curves_{size}.png", f"{size}: AdamW vs 1-bit Adam, 2 gloo ranks, GCIDE")
        adamw, onebit = records[first]["adamw"], records[first]["onebit"]
        print(f"[{size}] chosen lr {chosen}; test {test}; 1-bit / AdamW - 1 = {rel}", flush=True)
        summary[size] = {
            "n_params": sum(p.numel() for p in build_model(size, 0).parameters()),
            "adamw_test_loss": test["adamw"], "onebit_test_loss": test["onebit"], "test_loss_rel_diff": rel,
            "chosen_lr": chosen, "validation_by_lr": {lr: {m: round(grid[lr][m]["curve"][-1][2], 4) for m in METHODS} for lr in args.lrs},
            "fp32_bytes_per_step": adamw["bytes_per_step"][-1], "compressed_bytes_per_step": onebit["bytes_per_step"][-1],
            "adamw_total_bytes": sum(adamw["bytes_per_step"]), "onebit_total_bytes": sum(onebit["bytes_per_step"]),
            "ranks_identical": all(r[m]["ranks_identical"] for r in records.values() for m in METHODS),
            "seconds": {m: records[first][m]["seconds"] for m in METHODS}, "plot": str(OUT / f"curves_{size}.png"),
        }
        summary[size]["per_step_ratio"] = round(summary[size]["fp32_bytes_per_step"] / summary[size]["compressed_bytes_per_step"], 2)
        summary[size]["total_ratio"] = round(summary[size]["adamw_total_bytes"] / summary[size]["onebit_total_bytes"], 3)
    print(json.dumps({**summary, "seeds": args.seeds, "config": {**vars(args), "sizes": {s: SIZES[s] for s in args.sizes}}}))
    return summary


if __name__ == "__main__":
    sys.exit(main() and 0)

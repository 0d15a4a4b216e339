"""1-bit Adam under DeepSpeed (ZeRO stage 0) on CPU with gloo, or on GPUs with NCCL.

    deepspeed --num_gpus 2 examples/onebit_adam_deepspeed.py --steps 40 --freeze-step 8

Reads top to bottom: build a model, hand :class:`finetune.OneBitAdam` to ``deepspeed.initialize`` as
the client optimizer with the packaged ``finetune/configs/onebit_zero0.json``, switch DeepSpeed's own
gradient all-reduce off (the optimizer averages: fp32 in warm-up, 1-bit momentum afterwards), train,
and print the bytes each rank handed to collectives. Optimizer state is rank-local (error buffers),
so it is saved per rank.
"""

import argparse

import torch
import torch.distributed as dist

from finetune import OneBitAdam, close_process_group, deepspeed_config, skip_host_allreduce
from modular.testing import tiny_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--freeze-step", type=int, default=8, help="fp32 warm-up steps (paper: 15-25 %% of training)")
    parser.add_argument("--out", default=None, help="folder for per-rank optimizer state")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()

    try:
        import deepspeed
    except ImportError as e:  # optional dependency
        raise SystemExit("this example needs DeepSpeed: DS_BUILD_OPS=0 pip install 'modular-llm[deepspeed]'") from e
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()

    # "auto" entries of the packaged config are for transformers.Trainer; a raw engine needs numbers.
    config = deepspeed_config("onebit_zero0", train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1,
                              train_batch_size=4 * dist.get_world_size(), gradient_clipping=1.0)

    model = tiny_model("llama").train()
    optimizer = OneBitAdam(model.parameters(), lr=3e-3, freeze_step=args.freeze_step)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    skip_host_allreduce(engine)  # ZeRO 0 only; the optimizer does the averaging

    for step in range(args.steps):
        ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(step * 1000 + rank))
        ids = ids.to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step}: loss {loss.item():.3f}, bytes sent {dict(optimizer.comm_stats.bytes_sent)}", flush=True)

    if args.out:
        torch.save(optimizer.state_dict(), f"{args.out}/onebit_adam_rank{rank}.pt")
    if rank == 0:
        print("final bytes per kind (rank 0):", dict(optimizer.comm_stats.bytes_sent))
    close_process_group()  # ranks leave together; gloo can abort a process that exits with its group alive


if __name__ == "__main__":
    main()

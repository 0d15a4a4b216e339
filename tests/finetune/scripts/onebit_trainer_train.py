"""OneBitAdam inside ``transformers.Trainer`` under ``torchrun`` (DDP on gloo), run by test_onebit_distributed.py.

``torchrun --nproc_per_node 2 onebit_trainer_train.py OUT.json``: 6 steps, ``freeze_step=2``; the
callback switches DDP's all-reduce off, a checking callback records that gradients are local before
each optimizer step and that parameters agree bit for bit after it. Rank 0 writes OUT.json.
"""

import json
import sys
import tempfile

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

from finetune import OneBitAdam, SkipHostAllReduceCallback, close_process_group
from modular.testing import tiny_model


def same_on_all_ranks(tensors) -> bool:
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


class Check(TrainerCallback):
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.out = {"local_grads": [], "identical": [], "bytes": []}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.out["local_grads"].append(not same_on_all_ranks([p.grad for p in self.model.parameters()]))
        self.before = dict(self.optimizer.comm_stats.bytes_sent)

    def on_step_end(self, args, state, control, **kwargs):
        self.out["identical"].append(same_on_all_ranks(self.model.parameters()))
        now = self.optimizer.comm_stats.bytes_sent
        self.out["bytes"].append({k: now[k] - self.before[k] for k in now})


def main() -> None:
    model = tiny_model("llama").train()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (24, 16), generator=torch.Generator().manual_seed(0))]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, use_cpu=True, ddp_backend="gloo", max_steps=6, per_device_train_batch_size=2,
            learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=100,
            disable_tqdm=True, seed=0,
        )
        optimizer = OneBitAdam(model.parameters(), lr=1e-2, freeze_step=2, block_size=64)
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
        check = Check(model, optimizer)
        trainer.add_callback(SkipHostAllReduceCallback(trainer))
        trainer.add_callback(check)
        trainer.train()
        check.out["wrapped"] = type(trainer.model_wrapped).__name__
        check.out["world_size"] = dist.get_world_size()
    if dist.get_rank() == 0:
        with open(sys.argv[-1], "w") as f:
            json.dump(check.out, f)
    close_process_group()


if __name__ == "__main__":
    main()

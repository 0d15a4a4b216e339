"""LISA under DeepSpeed ZeRO-2 through ``transformers.Trainer``, run by tests/finetune/test_lisa_distributed.py.

``deepspeed --num_gpus 2 lisa_ds_train.py [CONFIG] OUT_DIR`` (CONFIG: a packaged config name, default zero2;
``ddp`` under ``torchrun --nproc_per_node 2`` for plain DDP): a 4-layer tiny llama trains 6 steps with
γ=1, K=2 (3 periods). Each rank records, for every step, which layers changed and which sample
ids its data loader yielded, and writes ``OUT_DIR/rank<r>.json``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

from finetune import LisaCallback, close_process_group, deepspeed_config_path
from finetune.launch import cpu_deepspeed_state, deepspeed_shm_buffer
from modular.registry import architecture_of
from modular.testing import tiny_model


class LayerChangeRecorder(TrainerCallback):
    """After every optimizer step: indices of decoder layers whose weights changed, and whether embeddings did."""

    def __init__(self, model, lisa: LisaCallback):
        self.arch, self.lisa, self.steps = architecture_of(model), lisa, []

    def _snapshot(self):
        return [torch.cat([p.detach().reshape(-1) for p in layer.parameters()]).clone() for layer in self.arch.layers]

    def on_step_begin(self, args, state, control, **kwargs):
        self.before = self._snapshot()
        self.embed_before = self.arch.input_embeddings.weight.detach().clone()

    def on_step_end(self, args, state, control, **kwargs):
        changed = [i for i, (a, b) in enumerate(zip(self.before, self._snapshot())) if not torch.equal(a, b)]
        self.steps.append({"step": state.global_step, "active": list(self.lisa.active_layers), "changed": changed,
                           "embeddings_changed": not torch.equal(self.embed_before, self.arch.input_embeddings.weight)})


def main() -> None:
    out_dir = Path(sys.argv[-1])
    config = sys.argv[-2] if len(sys.argv) > 2 and not sys.argv[-2].startswith("--") else "zero2"  # launcher adds --local_rank
    ddp = config == "ddp"  # torchrun + DDP instead of DeepSpeed
    if not ddp:
        cpu_deepspeed_state()
    model = tiny_model("llama", num_hidden_layers=4).train()
    # Sample i is a sequence whose tokens all equal 3 + i: the collator reads the id back.
    data = [{"input_ids": [3 + i] * 8} for i in range(48)]
    seen: list[int] = []

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        seen.extend(int(x) - 3 for x in ids[:, 0])
        return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(
        output_dir=str(out_dir / "run"), deepspeed=None if ddp else deepspeed_config_path(config), max_steps=6,
        per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.0, lr_scheduler_type="constant",
        logging_steps=100, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
        accelerator_config={"use_configured_state": not ddp}, use_cpu=ddp, ddp_backend="gloo" if ddp else None,
    )
    lisa = LisaCallback(num_active_layers=1, interval_steps=2, seed=3)
    recorder = LayerChangeRecorder(model, lisa)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[lisa, recorder])
    trainer.train()
    rank = dist.get_rank()
    doc = {"rank": rank, "world_size": dist.get_world_size(), "accelerate_num_processes": trainer.accelerator.num_processes,
           "args_world_size": args.world_size, "zero_stage": None if ddp else trainer.model_wrapped.zero_optimization_stage(),
           "steps": recorder.steps, "seen": seen, "schedule": lisa.schedule,
           "is_main": trainer.is_world_process_zero(), "schedule_file": (out_dir / "run" / "lisa_schedule.json").exists(),
           "shm_buffer": str(deepspeed_shm_buffer(rank)), "shm_buffer_during_run": deepspeed_shm_buffer(rank).exists()}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(doc))
    close_process_group()


if __name__ == "__main__":
    main()

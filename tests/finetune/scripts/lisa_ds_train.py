"""LISA under DeepSpeed ZeRO-1/2 through ``transformers.Trainer``, run by tests/finetune/test_lisa_distributed.py.

``deepspeed --num_gpus 2 lisa_ds_train.py CONFIG OUT_DIR [RESUME]`` (CONFIG: a packaged config name;
``ddp`` under ``torchrun --nproc_per_node 2`` for plain DDP): a 4-layer tiny llama trains 6 steps with
γ=1, K=2 (3 periods), saving checkpoints after steps 3 (mid-period) and 4 (a period boundary). Each rank records, for every step, which layers
changed, which sample ids its data loader yielded and how many fp32 master / moment elements its ZeRO
partitions hold, and writes ``OUT_DIR/rank<r>.json`` and its final weights ``OUT_DIR/rank<r>.safetensors``.
With RESUME (a checkpoint folder) the run resumes from it.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from finetune import LisaCallback, close_process_group, deepspeed_config_path
from finetune.launch import cpu_deepspeed_state, deepspeed_shm_buffer
from modular.registry import architecture_of
from modular.testing import tiny_model

SAVE_AT = (3, 4)


class LayerChangeRecorder(TrainerCallback):
    """After every optimizer step: indices of decoder layers whose weights changed, whether embeddings did,
    and (ZeRO) the sizes of this rank's fp32 partitions."""

    def __init__(self, trainer, lisa: LisaCallback):
        self.trainer, self.arch, self.lisa, self.steps = trainer, architecture_of(trainer.model), lisa, []

    def _snapshot(self):
        return [torch.cat([p.detach().reshape(-1) for p in layer.parameters()]).clone() for layer in self.arch.layers]

    def on_step_begin(self, args, state, control, **kwargs):
        self.before = self._snapshot()
        self.embed_before = self.arch.input_embeddings.weight.detach().clone()

    def on_step_end(self, args, state, control, **kwargs):
        changed = [i for i, (a, b) in enumerate(zip(self.before, self._snapshot())) if not torch.equal(a, b)]
        record = {"step": state.global_step, "active": list(self.lisa.active_layers), "changed": changed,
                  "embeddings_changed": not torch.equal(self.embed_before, self.arch.input_embeddings.weight)}
        engine = self.trainer.model_wrapped
        if hasattr(engine, "basic_optimizer") and hasattr(engine.optimizer, "single_partition_of_fp32_groups"):
            basic = engine.basic_optimizer
            flats = [g["params"][0] for g in basic.param_groups]
            record["master_numel"] = sum(f.numel() for f in flats)
            record["moment_numel"] = sum(basic.state[f]["exp_avg"].numel() for f in flats if f in basic.state)
            record["trainable_numel"] = sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad)
            record["num_groups"] = len(flats)
            record["zero_params_are_trainable"] = all(p.requires_grad for g in engine.optimizer.bit16_groups for p in g)
        self.steps.append(record)
        control.should_save = state.global_step in SAVE_AT


def main() -> None:
    args_in = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds --local_rank
    config, out_dir, resume = args_in[0], Path(args_in[1]), (args_in[2] if len(args_in) > 2 else None)
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
        per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.01, lr_scheduler_type="linear",
        logging_steps=100, save_strategy="no", report_to=[], seed=0,
        dataloader_num_workers=0, accelerator_config={"use_configured_state": not ddp}, use_cpu=ddp,
        ddp_backend="gloo" if ddp else None, resume_from_checkpoint=resume,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    lisa = LisaCallback(num_active_layers=1, interval_steps=2, seed=3, trainer=trainer)
    recorder = LayerChangeRecorder(trainer, lisa)
    trainer.add_callback(lisa)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume)
    rank = dist.get_rank()
    doc = {"rank": rank, "world_size": dist.get_world_size(), "accelerate_num_processes": trainer.accelerator.num_processes,
           "args_world_size": args.world_size, "zero_stage": None if ddp else trainer.model_wrapped.zero_optimization_stage(),
           "steps": recorder.steps, "seen": seen, "schedule": lisa.schedule,
           "is_main": trainer.is_world_process_zero(), "schedule_file": (out_dir / "run" / "lisa_schedule.json").exists(),
           "shm_buffer": str(deepspeed_shm_buffer(rank)), "shm_buffer_during_run": deepspeed_shm_buffer(rank).exists()}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(doc))
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(out_dir / f"rank{rank}.safetensors"))
    close_process_group()


if __name__ == "__main__":
    main()

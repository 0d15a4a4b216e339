"""Fine-tune a causal LM with LISA (layerwise sampling) under transformers.Trainer, optionally DeepSpeed.

    .venv/bin/python examples/lisa_trainer.py [--out DIR] [--model PATH] [--steps 20]
    deepspeed --num_gpus 2 examples/lisa_trainer.py --deepspeed zero2     (CPU: gloo, 2 processes)

1. a model: ``--model PATH`` (anything ``modular.load_model`` reads) or a small llama from config;
2. text: docstrings of a few standard-library modules, as bytes (same text wherever this Python runs);
3. ``LisaCallback``: embeddings and head train always, 2 sampled decoder layers per period of 5 steps;
4. ``Trainer(deepspeed=...)`` with a packaged config from ``finetune/configs/`` when asked;
5. the schedule lands in ``OUT/lisa_schedule.json`` (one entry per period) — plot it or diff it.
"""

import argparse
import ast
import json
import logging
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from finetune import LisaCallback, deepspeed_config_path
from finetune.launch import cpu_deepspeed_state
from modular import load_model
from modular.testing import tiny_model

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
parser.add_argument("--model", default=None, help="model folder; default: a 6-layer llama built from config")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--deepspeed", default=None, choices=["zero0", "zero1", "zero2"], help="packaged DeepSpeed config")
parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
args = parser.parse_args()
out = Path(args.out or tempfile.mkdtemp(prefix="lisa-example-"))
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # LISA logs one line per period

# 1. model (byte-level vocabulary for the built-in one: ids 0..255 are bytes)
model = load_model(args.model) if args.model else tiny_model("llama", num_hidden_layers=6, vocab_size=256)
model.train()

# 2. text -> 64-byte training chunks
SOURCES = ["argparse", "json/__init__", "random", "textwrap", "dataclasses"]
stdlib = Path(ast.__file__).parent
text = "\n".join(ast.get_docstring(node) or "" for name in SOURCES
                 for node in ast.walk(ast.parse((stdlib / f"{name}.py").read_text()))
                 if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)))
data = text.encode()
chunks = [{"input_ids": list(data[i:i + 64])} for i in range(0, len(data) - 64, 64)]


def collate(rows):
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids}


# 3-4. LISA + Trainer (+ DeepSpeed). On CPU, accelerate needs its state set up for a DeepSpeed run.
if args.deepspeed and not torch.cuda.is_available():
    cpu_deepspeed_state()
training_args = TrainingArguments(
    output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=4, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=5, save_strategy="no", report_to=[], use_cpu=not args.deepspeed,
    deepspeed=deepspeed_config_path(args.deepspeed) if args.deepspeed else None,
    accelerator_config={"use_configured_state": bool(args.deepspeed and not torch.cuda.is_available())},
)
trainer = Trainer(model=model, args=training_args, train_dataset=chunks, data_collator=collate)
# With the trainer, under ZeRO-1/2 LISA freezes the inactive layers before the engine is built and
# rebuilds DeepSpeed's optimizer over the active ones at each switch.
lisa = LisaCallback(num_active_layers=2, interval_steps=5, seed=0, trainer=trainer)
trainer.add_callback(lisa)
trainer.train()

# 5. the schedule saved with the run
if trainer.is_world_process_zero():
    schedule = json.loads((out / "lisa_schedule.json").read_text())
    for period in schedule["periods"]:
        print(f"period {period['period']} from step {period['start_step']}: layers {period['layers']}")
    print(f"schedule: {out / 'lisa_schedule.json'}")

"""AdaMoE on an HF MoE model: inject null experts, fine-tune with Trainer, look at the routing,
save and load back.

    .venv/bin/python examples/inject_adamoe.py [WORKDIR]    (default: a temporary folder)

1. a tiny Mixtral (any registered MoE family works: qwen2_moe, qwen3_moe, olmoe);
2. ``inject_adamoe``: 16 null experts, top-4 (the official defaults); the model starts out
   computing exactly what it computed before (anchored null logits);
3. a few ``Trainer`` steps with ``MoEAuxLossCallback`` adding the AdaMoE load-balancing loss
   (coefficient raised so that a few steps show the effect);
4. ``routing_stats`` + plot: true experts per token went down;
5. ``save_pretrained`` -> ``modular.load_model`` -> same logits; ``modular moe-stats`` on it.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from finetune import MoEAuxLossCallback
from modular import load_model
from modular.testing import tiny_model
from moe import AdaMoEConfig, inject_adamoe, mean_experts_per_token, plot_routing_stats, routing_stats

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="adamoe-example-"))
ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))

# 1-2. inject
model = tiny_model("mixtral")
with torch.no_grad():
    before = model(ids, labels=ids).loss.item()
inject_adamoe(model, AdaMoEConfig(num_null_experts=16, top_k=4, aux_loss_coef=1e-2))
with torch.no_grad():
    after = model(ids, labels=ids).loss.item()
print(f"loss before injection {before:.4f}, after {after:.4f}; experts/token {mean_experts_per_token(routing_stats(model)):.2f}")

# 3. fine-tune: the callback adds the load-balancing loss to Trainer's loss
data = torch.randint(3, 128, (64, 16), generator=torch.Generator().manual_seed(1)).tolist()
args = TrainingArguments(output_dir=str(OUT / "trainer"), max_steps=20, per_device_train_batch_size=8,
                         learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=10)
Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": data, "labels": data}),
        callbacks=[MoEAuxLossCallback()]).train()

# 4. routing after fine-tuning
model.eval()
with torch.no_grad():
    expected = model(ids).logits
stats = routing_stats(model)
print(f"after fine-tuning: true experts/token per layer {[round(s['experts_per_token'], 2) for s in stats]}")
print("plot:", plot_routing_stats(stats, OUT / "routing.png"))

# 5. round trip and the CLI
model.save_pretrained(OUT / "model")
loaded = load_model(OUT / "model")
with torch.no_grad():
    assert torch.allclose(loaded(ids).logits, expected, atol=1e-6)
print("save -> modular.load_model: same logits")
subprocess.run([sys.executable, "-m", "modular.app.cli", "moe-stats", str(OUT / "model")], check=True)

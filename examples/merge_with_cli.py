"""Merge two fine-tuned models with TIES from a YAML config, then AdaMerging from Python.

    .venv/bin/python examples/merge_with_cli.py [WORKDIR]    (default: a temporary folder)

1. build a tiny base llama and two "fine-tuned" variants in WORKDIR;
2. `modular merge merge.yaml --out WORKDIR/ties` (the CLI) with examples/merge.yaml, its model
   paths pointed at WORKDIR;
3. the same merge from Python, and the outputs compared;
4. layer-wise AdaMerging on unlabelled prompts (next-token entropy), coefficients plotted.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from merging import EntropyTask, TaskVector, adamerge, merge
from modular import load_model
from modular.testing import tiny_model

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="merge-example-"))

# 1. models: a base and two variants that moved away from it in different directions
tiny_model("llama").save_pretrained(OUT / "base")
for seed, name in ((1, "ft-a"), (2, "ft-b")):
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(OUT / name)

# 2. the CLI, on examples/merge.yaml with its paths pointed at OUT
config = yaml.safe_load((Path(__file__).parent / "merge.yaml").read_text())
config["base_model"] = str(OUT / "base")
for entry in config["models"]:
    entry["model"] = str(OUT / Path(entry["model"]).name)
(OUT / "merge.yaml").write_text(yaml.safe_dump(config))
subprocess.run([sys.executable, "-m", "modular.app.cli", "merge", str(OUT / "merge.yaml"), "--out", str(OUT / "ties"), "--force", "--no-progress"],
               check=True)

# 3. the same from Python: task vectors are read tensor by tensor, nothing is loaded whole
base = OUT / "base"
task_vectors = [TaskVector.from_models(base, OUT / name) for name in ("ft-a", "ft-b")]
merged = merge("ties", base, task_vectors, density=0.2, lambda_=1.0, combine="mergekit", progress=False)
from_cli = load_model(OUT / "ties").state_dict()
assert all(torch.equal(from_cli[name], tensor) for name, tensor in merged.items())
print("CLI and Python merges agree")

# 4. AdaMerging: one λ per task and parameter tensor, learned on unlabelled token sequences
prompts = [{"input_ids": torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(k))} for k in range(2)]
result = adamerge(load_model(base), task_vectors, [EntropyTask(f"task{k}", [prompts[k]]) for k in range(2)], steps=20, lr=0.01, progress=False)
result.save_json(OUT / "adamerging.json")
result.plot(OUT / "adamerging.png")
result.merge(base, out=OUT / "adamerged", force=True, progress=False)
print(f"AdaMerging: entropy {result.entropy[0]:.4f} -> {result.entropy[-1]:.4f}; model in {OUT / 'adamerged'}")

"""Resume under the ``deepspeed`` launcher (2 gloo ranks), run by tests/test_faults.py.

``deepspeed --num_gpus 2 resume_deepspeed.py ROOT NAME...``: for each NAME, the recipe
``ROOT/ref-NAME/recipe.yaml`` runs uninterrupted; its ``checkpoint-3`` is then copied into
``ROOT/resumed-NAME/run`` (as a run killed after step 3 leaves it) and the same recipe there
resumes from it. The test compares the two final models. All runs share the launch (and its
process group); accelerate's per-process state is reset between them, since it holds one
DeepSpeed plugin per process.
"""

import argparse
import shutil
from pathlib import Path

import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState

from finetune.launch import close_process_group
from modular.app.recipe import load_recipe
from modular.app.train import run_recipe

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
parser.add_argument("root", type=Path)
parser.add_argument("names", nargs="+")
args = parser.parse_args()
root = args.root


def run(recipe: Path) -> None:
    AcceleratorState._reset_state()
    GradientState._reset_state()
    run_recipe(load_recipe(recipe))
    dist.barrier()


for name in args.names:
    run(root / f"ref-{name}" / "recipe.yaml")
    if dist.get_rank() == 0:
        shutil.copytree(root / f"ref-{name}" / "run" / "checkpoint-3", root / f"resumed-{name}" / "run" / "checkpoint-3")
    run(root / f"resumed-{name}" / "recipe.yaml")
close_process_group()

"""Run ``modular ARGS...`` in a forked process stopped at a chosen point, for tests/test_faults.py
to kill there.

``start(point, marker, args, log)`` forks (the child shares the parent's imports, so a run
starts in a fraction of a second); when the child reaches ``point`` it creates the file
``marker`` and waits for the signal the test sends (``point=None``: it runs to the end). The
child computes with one thread: a forked OpenMP pool deadlocks, and every run of a test uses
the same thread count, so their results can be compared bit for bit. Points:

* ``step:N``: in the optimizer step after ``N`` steps (forward and backward done, weights not updated);
* ``checkpoint:N``: while saving the checkpoint of step ``N`` (weights written, optimizer not yet);
* ``final``: while saving the final model (weights written to the temporary folder, tokenizer not yet);
* ``shard:N``: after ``N`` tensors of a sharded safetensors output are written.
"""

import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import PreTrainedModel

from modular.app.cli import main
from modular.app.trainer import ModularTrainer
from modular.checkpoint import ShardedWriter


def _stop_here(marker: Path) -> None:
    marker.write_text("reached")
    while True:
        time.sleep(0.05)


def _after(cls, method: str, reached, marker: Path) -> None:
    """Wrap ``cls.method``: run it, then stop when ``reached(self, *args)``."""
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if reached(self, *args):
            _stop_here(marker)
        return result

    setattr(cls, method, wrapped)


def _install(point: str, marker: Path) -> None:
    kind, _, value = point.partition(":")
    if kind == "step":
        _after(ModularTrainer, "training_step", lambda self, *a: self.state.global_step == int(value), marker)
    elif kind == "checkpoint":
        _after(ModularTrainer, "_save", lambda self, *a: self.state.global_step == int(value), marker)
    elif kind == "final":
        _after(PreTrainedModel, "save_pretrained", lambda self, folder, *a: ".model.tmp-" in str(folder), marker)
    elif kind == "shard":
        _after(ShardedWriter, "add", lambda self, *a: self.position == int(value), marker)
    else:
        raise ValueError(f"unknown fault point {point!r}")


def _child(point: str | None, marker: Path, args: list[str], log: Path) -> None:
    torch.set_num_threads(1)
    with open(log, "w", buffering=1) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.stdout = sys.stderr = out
        if point is not None:
            _install(point, marker)
        try:
            code = main(args)
        except BaseException:
            traceback.print_exc()
            code = 1
        out.flush()
    os._exit(code)


def start(point: str | None, marker: Path, args: list[str], log: Path) -> multiprocessing.Process:
    """Fork ``modular ARGS`` (output to ``log``), to stop at ``point`` (``None``: to run to the end)."""
    process = multiprocessing.get_context("fork").Process(target=_child, args=(point, marker, args, log))
    process.start()
    return process

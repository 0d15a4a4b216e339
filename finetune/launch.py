"""Running under a multi-process launcher (``torchrun``, ``deepspeed``) on CPU or GPU: the
rendezvous port, accelerate's process state for DeepSpeed on CPU, and a clean exit of the
process group."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch.distributed as dist

__all__ = ["close_process_group", "cpu_deepspeed_state", "deepspeed_shm_buffer", "free_port"]


def free_port() -> int:
    """A free loopback TCP port, for the rendezvous of a local multi-process run."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_deepspeed_state():
    """Set up accelerate's process state for a ``deepspeed``-launched run on CPU (gloo).

    Without CUDA, ``TrainingArguments(deepspeed=...)`` lets accelerate pick no backend, so it
    records ``num_processes=1`` on every rank: each rank then loads *all* batches and DeepSpeed's
    batch-size check fails (read in accelerate's ``state.py``; ``use_cpu=True`` instead drops
    DeepSpeed). Call this first in the training script and pass
    ``accelerator_config={"use_configured_state": True}`` to ``TrainingArguments``: the state
    then has backend gloo, the launcher's world size and ``DistributedType.DEEPSPEED``.
    Returns the ``accelerate.PartialState``.
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch --use_deepspeed` sets
    return PartialState(backend="gloo")


def close_process_group() -> None:
    """Let the ranks leave together and close gloo cleanly. A process that exits with its group
    still alive can abort in gloo's destructor ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        _remove_deepspeed_shm_buffer(dist.get_rank())
        dist.destroy_process_group()


def deepspeed_shm_buffer(rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce (``ops/csrc/cpu/comm/shm.cpp``) creates for ``rank``."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"
    return Path("/dev/shm") / name


def _remove_deepspeed_shm_buffer(rank: int) -> None:
    # DeepSpeed never unlinks it: ~70 MB of RAM per rank and run stay in /dev/shm until reboot.
    # Every rank mapped the others' buffers during init, so after the barrier the name is unused.
    deepspeed_shm_buffer(rank).unlink(missing_ok=True)

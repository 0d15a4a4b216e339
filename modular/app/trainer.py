"""``ModularTrainer``: the ``transformers.Trainer`` of ``modular train``, with checkpoints that
resume exactly.

What plain ``Trainer`` gets wrong for this project's models, and what is done instead:

* **Weights on resume.** ``Trainer`` saves a checkpoint with ``save_pretrained`` (which reverts
  transformers' weight conversions: Mixtral's fused ``mlp.experts.gate_up_proj`` is written as
  ``block_sparse_moe.experts.<e>.w1``/``w3``) but reads it back with a plain ``load_state_dict``
  under the model's own names, so fused experts and routers silently keep their initial values.
  Here a checkpoint is read by :func:`modular.load_checkpoint_into`, the one loader's logic:
  injections rebuilt, conversions applied, every tensor accounted for.
* **Half-written checkpoints.** A run killed while saving left ``checkpoint-N`` incomplete, and
  the next run resumed from it. Each checkpoint is written under ``.checkpoint-staging/`` (every
  rank's files) and renamed into place once all ranks are done; a staging folder found at start
  is what a killed save left, and is removed.
* **Per-rank 1-bit Adam state.** ``Trainer`` (and DeepSpeed ZeRO-0) save the optimizer of rank 0
  only; :class:`finetune.onebit_adam.OneBitAdam`'s error-feedback buffers differ per rank, so
  every rank also writes its own buffers (safetensors) and reads them back on resume.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from modular.loading import load_checkpoint_into

__all__ = ["STAGING_DIR", "ModularTrainer", "remove_incomplete_checkpoint"]

STAGING_DIR = ".checkpoint-staging"


def remove_incomplete_checkpoint(output_dir: str | os.PathLike) -> None:
    """Remove the staging folder a save killed midway left in ``output_dir`` (main process only)."""
    staging = Path(output_dir) / STAGING_DIR
    if staging.exists():
        print(f"modular train: removing {staging}, an incomplete checkpoint of a run killed while saving",
              file=sys.stderr, flush=True)
        shutil.rmtree(staging)


class ModularTrainer(Trainer):
    """``Trainer`` whose checkpoints are written atomically and read back as ``modular.load_model`` reads."""

    _staging: Path | None = None

    # -- weights ----------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        load_checkpoint_into(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:  # DeepSpeed reads its own engine checkpoint, by module names
            return super()._load_best_model()
        load_checkpoint_into(self.model, self.state.best_model_checkpoint)

    # -- atomic checkpoints -----------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        self._staging = run_dir / STAGING_DIR
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every rank's files are in the staging folder
        if self.args.should_save:
            self._publish_checkpoint(run_dir)
        self.accelerator.wait_for_everyone()  # no rank starts the next save in the staging folder before

    def _publish_checkpoint(self, run_dir: Path) -> None:
        staging = run_dir / STAGING_DIR
        written = staging / f"checkpoint-{self.state.global_step}"
        final = run_dir / written.name
        if final.exists():  # a re-run that reached the same step again: the new one wins
            shutil.rmtree(final)
        written.rename(final)
        staging.rmdir()
        if self.state.best_model_checkpoint == str(written):  # the state saved in it named the staging path
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(final / "trainer_state.json"))
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    # -- per-rank optimizer state -------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        onebit = _onebit_adam(self.optimizer)
        if onebit is not None and self.args.world_size > 1:
            from safetensors.torch import save_file

            save_file(_error_buffers(onebit, self.model), str(_error_file(output_dir, self.args.process_index)))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        onebit = _onebit_adam(self.optimizer)
        if checkpoint is not None and onebit is not None and self.args.world_size > 1:
            _restore_error_buffers(onebit, self.model, _error_file(checkpoint, self.args.process_index))


def _onebit_adam(optimizer):
    """The :class:`OneBitAdam` under accelerate's / DeepSpeed's wrappers, or ``None``."""
    from finetune.onebit_adam import OneBitAdam

    while optimizer is not None and not isinstance(optimizer, OneBitAdam):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _error_file(checkpoint: str | os.PathLike, rank: int) -> Path:
    return Path(checkpoint) / f"onebit_adam_errors_rank{rank}.safetensors"


def _error_buffers(optimizer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's 1-bit Adam error-feedback buffers, by ``<parameter name>:<buffer>`` (copies: the
    optimizer keeps them as parts of one flat buffer, and safetensors refuses shared storage)."""
    from finetune.onebit_adam import ERROR_BUFFERS

    names = {p: n for n, p in model.named_parameters()}
    return {f"{names[p]}:{key}": state[key].detach().to("cpu", copy=True)
            for p, state in optimizer.state.items() for key in ERROR_BUFFERS if key in state}


def _restore_error_buffers(optimizer, model: torch.nn.Module, file: Path) -> None:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: this rank's 1-bit Adam error buffers are missing from the checkpoint "
                                "(it was written by another number of processes?)")
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    for key, tensor in load_file(str(file)).items():
        name, buffer = key.rsplit(":", 1)
        optimizer.state[params[name]][buffer] = tensor.to(params[name].device)

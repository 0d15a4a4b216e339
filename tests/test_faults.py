"""Fault injection: `modular train` and `modular merge` killed at several points, then re-run.

Each killed run is a forked ``modular`` command stopped at a known point (tests/fault_points.py)
and killed there (SIGKILL, or SIGTERM); the re-run must end with exactly the weights of an
uninterrupted run, leave no temporary folder behind and never touch its inputs.
docs/faults.md lists every fault tried and what happens.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from finetune.launch import free_port
from modular.app.cli import main
from modular.checkpoint import SafetensorsCheckpoint
from tests.app.test_train_recipe import TINY_RUN_RECIPE
from tests.fault_points import start
from tests.tiny_inputs import digest, write_merge_models, write_recipe_data

RESUME_DEEPSPEED = Path(__file__).parent / "fault_scripts" / "resume_deepspeed.py"


@pytest.fixture
def data_dir(tmp_path):
    return write_recipe_data(tmp_path)


def _recipe(folder: Path, **sections) -> Path:
    """``TINY_RUN_RECIPE`` with ``sections`` replaced, in ``folder``; data and tokenizer one level up."""
    recipe = {**TINY_RUN_RECIPE, **sections}
    recipe["model"] = {**recipe["model"], "tokenizer": "../tok"}
    recipe["data"] = {**recipe["data"], "train": "../train.jsonl", "eval": "../eval.jsonl"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = SafetensorsCheckpoint(a), SafetensorsCheckpoint(b)
    assert first.names() == second.names()
    differ = [n for n in first.names() if not torch.equal(first.get(n), second.get(n))]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name == ".checkpoint-staging")


def _run_until(point: str, marker: Path, args: list[str], kill=signal.SIGKILL, timeout=300) -> subprocess.CompletedProcess:
    """Run ``modular ARGS`` stopped at ``point``; once there, send ``kill``; return its exit code and output."""
    log = marker.with_suffix(".log")
    process = start(point, marker, args, log)
    deadline = time.time() + timeout
    while not marker.exists() and process.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"never reached {point}: {log.read_text()[-3000:]}"
    marker.unlink()
    os.kill(process.pid, kill)
    process.join(60)
    return subprocess.CompletedProcess(args, process.exitcode, log.read_text())


def _run(args: list[str], log: Path, timeout=300) -> subprocess.CompletedProcess:
    """Run ``modular ARGS`` to the end in a forked child (one thread, as the killed runs)."""
    process = start(None, log.with_suffix(".marker"), args, log)
    process.join(timeout)
    return subprocess.CompletedProcess(args, process.exitcode, log.read_text())


# --------------------------------------------------------------------------- training


TRAINING = {"max_steps": 6, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2}
ACM = [{"acm": {"num_learners": 4, "distill_steps": 2, "gate_steps": 2, "gate_hidden_size": 8}}]


def test_train_killed_mid_step_mid_checkpoint_and_mid_final_save_ends_bit_identical(data_dir):
    """upcycle + AdaMoE + LISA + AdamW: SIGKILL in step 4, while saving checkpoint-4, while saving the
    final model; each re-run resumes, and the last one's model equals an uninterrupted run's bit for bit."""
    lisa = {"num_active_layers": 1, "interval_steps": 3}  # checkpoint-2 lies inside LISA's first period
    reference = _recipe(data_dir / "reference", training=TRAINING, lisa=lisa)
    assert _run(["train", str(reference)], data_dir / "reference.log").returncode == 0
    recipe = _recipe(data_dir / "killed", training=TRAINING, lisa=lisa)
    run, marker = recipe.parent / "run", data_dir / "reached"

    killed = _run_until("step:3", marker, ["train", str(recipe)])
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]

    killed = _run_until("checkpoint:4", marker, ["train", str(recipe)])
    assert f"resuming from {run / 'checkpoint-2'}" in killed.stdout
    assert _leftovers(run) == [".checkpoint-staging"]  # checkpoint-4 half written, not in place
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]

    killed = _run_until("final", marker, ["train", str(recipe)])
    assert "removing" in killed.stdout and "incomplete checkpoint" in killed.stdout
    assert f"resuming from {run / 'checkpoint-2'}" in killed.stdout
    assert [name.split("-")[0] for name in _leftovers(run)] == [".model.tmp"] and not (run / "model").exists()

    done = _run(["train", str(recipe)], data_dir / "done.log")
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"resuming from {run / 'checkpoint-6'}" in done.stdout
    assert _leftovers(run) == []
    assert_same_weights(run / "model", reference.parent / "run" / "model")


def test_resume_of_an_acm_model_is_exact(data_dir):
    """The ACM injection (learners and gates, rebuilt on load) resumes bit for bit, with LISA and
    1-bit Adam in one process (its compressed stage from step 2 on)."""
    acm = {"injections": ACM, "lisa": {"num_active_layers": 2, "interval_steps": 3}, "training": {**TRAINING, "max_steps": 4},
           "optimizer": {"name": "onebit_adam", "lr": 1e-3, "freeze_step": 1}}
    reference = _recipe(data_dir / "reference", **acm)
    assert _run(["train", str(reference)], data_dir / "reference.log").returncode == 0
    run = reference.parent / "run"
    resumed = _recipe(data_dir / "resumed", **acm)
    shutil.copytree(run / "checkpoint-2", resumed.parent / "run" / "checkpoint-2")
    done = _run(["train", str(resumed)], data_dir / "resumed.log")
    assert done.returncode == 0 and "resuming from" in done.stdout, done.stdout[-3000:]
    assert_same_weights(resumed.parent / "run" / "model", run / "model")
    final, at_2 = SafetensorsCheckpoint(run / "model"), SafetensorsCheckpoint(run / "checkpoint-2")
    acm = [n for n in final.names() if n.endswith((".w_in", ".gate.net.0.weight"))]
    assert acm and any(not torch.equal(final.get(n), at_2.get(n)) for n in acm)  # the ACMs train after the resume


def test_best_model_at_end_is_read_through_the_loader(data_dir):
    """`load_best_model_at_end` reads an earlier checkpoint back: fused experts and routers included."""
    training = {**TRAINING, "max_steps": 4, "eval_strategy": "steps", "eval_steps": 2, "load_best_model_at_end": True,
                "metric_for_best_model": "eval_loss", "greater_is_better": True}  # the worse (first) checkpoint wins
    recipe = _recipe(data_dir / "best", training=training)
    done = _run(["train", str(recipe)], data_dir / "best.log")
    assert done.returncode == 0, done.stdout[-3000:]
    run = recipe.parent / "run"
    assert json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["best_model_checkpoint"] == str(run / "checkpoint-2")
    assert_same_weights(run / "model", run / "checkpoint-2")


@pytest.mark.distributed
def test_resume_under_deepspeed_two_ranks_is_exact(data_dir):
    """2 gloo ranks under `deepspeed`, LISA: upcycle + AdaMoE with ZeRO-0 + 1-bit Adam (per-rank error
    buffers), and ACM with ZeRO-2 + AdamW."""
    configs = {
        "onebit": dict(optimizer={"name": "onebit_adam", "lr": 1e-3, "freeze_step": 2}, deepspeed="onebit_zero0"),
        "zero2": dict(optimizer={"name": "adamw", "lr": 1e-3}, deepspeed="zero2", injections=ACM),
    }
    training = {**TRAINING, "per_device_train_batch_size": 2, "save_steps": 3}
    for name, sections in configs.items():
        for kind in ("ref", "resumed"):
            _recipe(data_dir / f"{kind}-{name}", training=training, **sections)
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(RESUME_DEEPSPEED),
                           str(data_dir), *configs], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((data_dir / "ref-zero2" / "run" / "checkpoint-3" / "global_step3").glob("zero_pp_rank_1_*optim_states.pt"))
    assert sorted(p.name for p in (data_dir / "ref-onebit" / "run" / "checkpoint-3").glob("onebit_adam_errors_rank*")) == [
        "onebit_adam_errors_rank0.safetensors", "onebit_adam_errors_rank1.safetensors"]
    for name in configs:
        assert_same_weights(data_dir / f"resumed-{name}" / "run" / "model", data_dir / f"ref-{name}" / "run" / "model")


# --------------------------------------------------------------------------- merging


@pytest.fixture
def llama_folders(tmp_path):
    root = write_merge_models(tmp_path / "models")
    return root / "base", [root / "ft1", root / "ft2"]


@pytest.fixture
def merge_config(tmp_path, llama_folders):
    base, fts = llama_folders
    config = {"merge_method": "ties", "base_model": str(base), "out_shard_size": "20KB",
              "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.5}} for f in fts],
              "parameters": {"lambda": 0.9}}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM])
def test_merge_killed_while_writing_shards(kill, merge_config, llama_folders, tmp_path):
    base, fts = llama_folders
    inputs = {p: digest(p) for p in (base, *fts)}
    out, marker = tmp_path / "merged", tmp_path / "reached"
    killed = _run_until("shard:5", marker, ["merge", str(merge_config), "--out", str(out), "--no-progress"], kill=kill)
    if kill == signal.SIGTERM:  # cleans up like Ctrl-C: nothing left, exit 128 + 15
        assert killed.returncode == 143 and "stopped by SIGTERM" in killed.stdout
        assert _leftovers(tmp_path) == []
    else:  # a killed process cannot clean up: its temporary folder stays until the next run
        assert killed.returncode == -signal.SIGKILL
        (stale,) = _leftovers(tmp_path)
        assert stale.startswith(".merged.tmp-") and any((tmp_path / stale).glob("model-*.safetensors"))
    assert not out.exists()
    with pytest.warns(UserWarning, match="removed 1 temporary output") if kill == signal.SIGKILL else contextlib.nullcontext():
        assert main(["merge", str(merge_config), "--out", str(out), "--no-progress"]) == 0
    assert _leftovers(tmp_path) == []
    reference = tmp_path / "reference"
    assert main(["merge", str(merge_config), "--out", str(reference), "--no-progress"]) == 0
    assert_same_weights(out, reference)
    assert {p: digest(p) for p in inputs} == inputs


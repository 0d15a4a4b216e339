"""LISA in 2 gloo processes with transformers.Trainer: ``deepspeed --num_gpus 2`` (ZeRO-1/2) and ``torchrun`` (DDP).

Under ZeRO the optimizer is rebuilt over the active parameters at each switch (finetune/lisa_zero.py): the
tests check that each rank's fp32 partitions hold only the active parameters, that the weights equal a
one-process AdamW reference with the same semantics (moments of the staying embeddings / head carried
over, zero moments for a newly active layer, one step count per group), and that resuming from a
checkpoint mid-period and at a period boundary ends with the same weights.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, get_scheduler

from finetune.launch import free_port
from finetune.lisa import sample_active_layers
from modular.registry import architecture_of
from modular.testing import tiny_model

SCRIPT = Path(__file__).parent / "scripts" / "lisa_ds_train.py"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.distributed

STEPS, K, SEED, LR, WEIGHT_DECAY, MAX_GRAD_NORM = 6, 2, 3, 1e-2, 0.01, 1.0  # as in the script


def _launch(launcher: list[str], config: str, out: Path, resume: Path | None = None) -> list[dict]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    command = [*launcher, str(SCRIPT), config, str(out), *([str(resume)] if resume else [])]
    proc = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=420)
    files = [out / f"rank{r}.json" for r in range(2)]
    assert proc.returncode == 0 and all(f.exists() for f in files), proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(f.read_text()) for f in files]


def _deepspeed(config: str, out: Path, resume: Path | None = None) -> list[dict]:
    return _launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())], config, out, resume)


def _weights(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    out = tmp_path_factory.mktemp("lisa_zero2")
    return out, _deepspeed("zero2", out)


def _expected_schedule():
    return [sample_active_layers(SEED, p, 4, 1) for p in range(STEPS // K)]


def reference_weights(seen: list[list[int]]) -> dict[str, torch.Tensor]:
    """The same training in one process with torch AdamW and ZeRO-LISA's semantics.

    Gradients: mean of the two ranks' batch losses (the ranks' batches are read back from the run).
    At each period start a newly active layer gets zero moments and its group's step count; embeddings
    and head keep theirs; gradient clipping and weight decay act on the trainable parameters only.
    """
    model = tiny_model("llama", num_hidden_layers=4).train()
    arch = architecture_of(model)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, foreach=False)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=STEPS)
    for step in range(STEPS):
        active = set(_expected_schedule()[step // K])
        for i, layer in enumerate(arch.layers):
            for p in layer.parameters():
                p.requires_grad_(i in active)
                p.grad = None
                if step % K == 0:  # a fresh period: fresh moments, the group's step count
                    optimizer.state.pop(p, None)
                    if i in active and step > 0:
                        optimizer.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p),
                                              "exp_avg_sq": torch.zeros_like(p)}
        loss = 0.0
        for rank_seen in seen:
            ids = torch.tensor([[3 + i] * 8 for i in rank_seen[2 * step: 2 * step + 2]])
            loss = loss + model(input_ids=ids, labels=ids).loss / len(seen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in model.named_parameters()}


def test_no_deepspeed_shared_memory_left_behind(zero2):
    # DeepSpeed's CPU all-reduce creates one ~70 MB /dev/shm file per rank and never removes it;
    # close_process_group does.
    _, ranks = zero2
    assert [d["shm_buffer_during_run"] for d in ranks] == [True, True]
    assert [Path(d["shm_buffer"]).exists() for d in ranks] == [False, False]


def test_zero2_trains_active_layers_only_on_both_ranks(zero2):
    _, ranks = zero2
    expected = _expected_schedule()
    assert expected[0] == expected[2] != expected[1], "schedule must switch away and back (re-activation)"
    for doc in ranks:
        assert doc["zero_stage"] == 2 and doc["world_size"] == 2
        assert [s["active"] for s in doc["steps"]] == [expected[i // K] for i in range(STEPS)]
        for step in doc["steps"]:
            assert step["changed"] == step["active"], step
            assert step["embeddings_changed"]
    assert ranks[0]["schedule"] == ranks[1]["schedule"]
    # The schedule is written by the main process only, and one rank is main.
    assert ranks[0]["schedule_file"] and [d["is_main"] for d in ranks] == [True, False]


def test_zero2_partitions_hold_only_the_active_parameters(zero2):
    _, ranks = zero2
    for step in range(STEPS):
        records = [doc["steps"][step] for doc in ranks]
        trainable = records[0]["trainable_numel"]  # embeddings + head + final norm + one layer
        assert all(r["zero_params_are_trainable"] for r in records)
        # Each rank holds its half of the trainable elements (groups padded to 2 x world = 4 elements).
        held = sum(r["master_numel"] for r in records)
        assert trainable <= held < trainable + 4 * records[0]["num_groups"], records
        assert [r["moment_numel"] for r in records] == [r["master_numel"] for r in records]
    model = tiny_model("llama", num_hidden_layers=4)
    layer_numel = sum(p.numel() for p in architecture_of(model).layers[0].parameters())
    assert ranks[0]["steps"][0]["trainable_numel"] == sum(p.numel() for p in model.parameters()) - 3 * layer_numel


def test_zero2_weights_match_one_process_reference(zero2):
    out, ranks = zero2
    want = reference_weights([doc["seen"] for doc in ranks])
    for rank in range(2):
        got = _weights(out, rank)
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-4, msg=f"rank {rank}: {name}")


def test_ranks_see_different_batches(zero2):
    # accelerate must record both processes (finetune.launch.cpu_deepspeed_state: it can record one on CPU).
    _, ranks = zero2
    assert [d["accelerate_num_processes"] for d in ranks] == [2, 2]
    seen = [set(d["seen"]) for d in ranks]
    assert not seen[0] & seen[1]
    assert len(seen[0]) >= 12 and len(seen[1]) >= 12  # 6 steps x batch 2 each


@pytest.mark.parametrize("checkpoint", ["checkpoint-3", "checkpoint-4"])  # mid-period, period boundary
def test_zero2_resume_ends_with_the_same_weights(zero2, checkpoint, tmp_path):
    out, ranks = zero2
    resumed = _deepspeed("zero2", tmp_path, resume=out / "run" / checkpoint)
    done = int(checkpoint.split("-")[1])
    assert [s["active"] for s in resumed[0]["steps"]] == [s["active"] for s in ranks[0]["steps"][done:]]
    full, again = _weights(out), _weights(tmp_path)
    for name, value in full.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=1e-6, msg=name)


def test_zero1_weights_match_one_process_reference(tmp_path):
    ranks = _deepspeed("zero1", tmp_path)
    want = reference_weights([doc["seen"] for doc in ranks])
    assert all(r["master_numel"] < r["trainable_numel"] for r in ranks[0]["steps"])
    for name, value in want.items():
        torch.testing.assert_close(_weights(tmp_path)[name], value, rtol=0, atol=1e-4, msg=name)


def test_ddp_under_torchrun_trains_active_layers_only(tmp_path):
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    docs = _launch(launcher, "ddp", tmp_path)
    expected = _expected_schedule()
    for doc in docs:
        assert doc["accelerate_num_processes"] == 2
        assert [s["changed"] for s in doc["steps"]] == [expected[i // K] for i in range(STEPS)]
    assert not set(docs[0]["seen"]) & set(docs[1]["seen"])


def test_rebuild_on_a_bf16_engine_keeps_the_staying_state(tmp_path):
    # A raw bf16 ZeRO-2 engine (DeepSpeed's bf16 runs on CPU through deepspeed.initialize): the flat
    # buffers grow (slices move between ranks), shrink, then keep their size (slices stay put).
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out.json"
    command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(SCRIPT.parent / "lisa_zero_rebuild.py"), str(out)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    doc = json.loads(out.read_text())
    assert doc["param_dtypes"] == ["torch.bfloat16"]
    for rebuild in doc["rebuilds"]:  # fp32 master weights and both moments, exactly
        assert rebuild["staying_state_kept"] and rebuild["new_moments_zero"] and rebuild["weights_kept"], rebuild
    assert doc["held_all_ranks"] == [r["trainable"] for r in doc["rebuilds"]]  # sizes divide evenly here
    assert doc["last_layer_trained"] and doc["frozen_unchanged"]
    assert all(math.isfinite(x) for x in doc["losses"])

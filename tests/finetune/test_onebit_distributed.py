"""OneBitAdam in 2 gloo processes: plain torch + DDP, DeepSpeed (ZeRO 0) and transformers.Trainer.

Each test starts its launcher (torchrun / ``deepspeed --num_gpus 2``) on a free port; the scripts in
``scripts/`` check bit-identical parameters across ranks after every step and write numbers to JSON.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.launch import free_port

SCRIPTS = Path(__file__).parent / "scripts"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.distributed



def _launch(launcher: list[str], script: str, tmp_path: Path, timeout: int = 420, options: tuple = ()) -> dict:
    out = tmp_path / "out.json"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*launcher, str(SCRIPTS / script), *options, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def _torchrun(script: str, tmp_path: Path) -> dict:
    return _launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())], script, tmp_path)


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    return _torchrun("onebit_torchrun_checks.py", tmp_path_factory.mktemp("torchrun"))


def test_compressed_allreduce_running_average_converges_with_error_feedback(checks):
    comm = checks["comm"]
    # 120 rounds on fixed inputs: error feedback makes the running mean converge (measured: 0.18 after
    # 30 rounds, 0.13 after 60, 0.08 after 120, 0.012 after 960, once the error buffers saturate) ...
    assert comm["with_feedback"] < 0.1 and comm["with_feedback"] < 0.75 * comm["with_feedback_half"]
    # ... while without it the same 1-bit bias remains round after round.
    assert comm["without_feedback"] > 0.5
    assert comm["with_feedback_identical"] and comm["without_feedback_identical"]
    # n=1000 fp32 = 4000 bytes; padded to 1024: signs 128 + 64 (own chunk), scales (16 + 8) * 4.
    assert comm["compressed_bytes_per_call"] == 128 + 64 + 24 * 4


def test_ddp_warmup_is_adamw_then_compressed_and_ranks_identical(checks):
    ddp = checks["ddp"]
    assert ddp["local_grads_differ"], "the comm hook must leave DDP's gradients local"
    assert all(ddp["identical"])
    assert ddp["warmup_max_diff_vs_adamw"] < 1e-6
    n = ddp["n_params"]
    assert ddp["bytes"][:4] == [4 * n] * 4  # fp32 all-reduce of the gradients
    padded = -(-n // 128) * 128  # world 2 x block 64
    assert ddp["bytes"][4:] == [padded // 8 + padded // 16 + 4 * (padded // 64 + padded // 128)] * 6


def test_lisa_skips_frozen_layers_and_rewarms_a_reactivated_one(checks):
    lisa = checks["lisa"]
    assert all(lisa["identical"]) and all(lisa["skipped_unchanged"])
    n1 = lisa["layer1_numel"]
    # layer 1's state is popped at step 4: fp32 warm-up for it alone at steps 4-6 (param_warmup_steps=3)
    assert lisa["fp32_bytes"][2:4] == [0, 0] and lisa["fp32_bytes"][4:7] == [4 * n1] * 3 and lisa["fp32_bytes"][7:] == [0, 0]
    assert lisa["layer1_steps"] == [0, 0, 0, 0, 1, 2, 3, 4, 5]
    assert lisa["compressed_bytes"][:2] == [0, 0] and lisa["compressed_bytes"][7] > lisa["compressed_bytes"][6] > 0


def test_resume_continues_bit_for_bit(checks):
    resume = checks["resume"]
    assert {"exp_avg_sq", "frozen_denom", "worker_error", "server_error"} <= set(resume["state_keys"])
    assert resume["worker_error_norm_at_save"] > 0  # saved in the compression stage
    assert resume["bitwise_equal"]


@pytest.mark.skipif(shutil.which("deepspeed", path=str(BIN)) is None, reason="deepspeed not installed")
def test_deepspeed_zero0_client_optimizer(tmp_path):
    out = _launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())], "onebit_deepspeed_train.py", tmp_path)
    assert out["optimizer_class"] == "OneBitAdam" and out["zero_stage"] == 0
    assert all(out["local_grads"]), "DeepSpeed's gradient all-reduce must be off"
    assert all(out["identical"])
    assert out["fp32_bytes"] == [4 * out["n_params"]] * 2 + [0] * 4
    assert out["compressed_bytes"][:2] == [0, 0] and min(out["compressed_bytes"][2:]) > 0
    assert max(out["compressed_bytes"]) * 14 < 4 * out["n_params"]


@pytest.mark.skipif(shutil.which("deepspeed", path=str(BIN)) is None, reason="deepspeed not installed")
def test_deepspeed_zero0_bf16_weights_with_fp32_state(tmp_path):
    # bf16 weights under onebit_zero0.json (DeepSpeed's bf16 off, finetune/comm.py refuses it on):
    # fp32 moments and error buffers, ranks identical, a frozen layer untouched.
    out = _launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())], "onebit_deepspeed_train.py",
                  tmp_path, options=("--bf16",))
    assert out["param_dtypes"] == ["torch.bfloat16"] and out["state_dtypes"] == ["torch.float32"]
    assert all(out["identical"]) and out["frozen_unchanged"]
    assert out["compressed_bytes"][:2] == [0, 0] and min(out["compressed_bytes"][2:]) > 0
    assert all(math.isfinite(x) for x in out["losses"])


def test_trainer_under_torchrun_ddp(tmp_path):
    out = _torchrun("onebit_trainer_train.py", tmp_path)
    assert out["wrapped"] == "DistributedDataParallel" and out["world_size"] == 2
    assert all(out["local_grads"]) and all(out["identical"])
    assert [b["compressed"] > 0 for b in out["bytes"]] == [False, False, True, True, True, True]


@pytest.mark.skipif(shutil.which("deepspeed", path=str(BIN)) is None, reason="deepspeed not installed")
def test_example_runs_and_saves_per_rank_state(tmp_path):
    example = Path(__file__).parents[2] / "examples" / "onebit_adam_deepspeed.py"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(example),
         "--steps", "4", "--freeze-step", "2", "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "final bytes per kind" in proc.stdout
    states = [torch.load(tmp_path / f"onebit_adam_rank{r}.pt") for r in range(2)]
    errors = [s["state"][0]["worker_error"] for s in states]
    assert not torch.equal(*errors)  # error buffers are rank-local, hence saved per rank

"""LISA in 2 gloo processes with transformers.Trainer: ``deepspeed --num_gpus 2`` (ZeRO-2) and ``torchrun`` (DDP)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.launch import free_port
from finetune.lisa import sample_active_layers

SCRIPT = Path(__file__).parent / "scripts" / "lisa_ds_train.py"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.distributed



def _launch(launcher: list[str], config: str, out: Path) -> list[dict]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, str(SCRIPT), config, str(out)], cwd=out, env=env, capture_output=True, text=True, timeout=180)
    files = [out / f"rank{r}.json" for r in range(2)]
    assert proc.returncode == 0 and all(f.exists() for f in files), proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    return _launch(launcher, "zero2", tmp_path_factory.mktemp("lisa_ds"))


def test_no_deepspeed_shared_memory_left_behind(ranks):
    # DeepSpeed's CPU all-reduce creates one ~70 MB /dev/shm file per rank and never removes it;
    # close_process_group does.
    assert [d["shm_buffer_during_run"] for d in ranks] == [True, True]
    assert [Path(d["shm_buffer"]).exists() for d in ranks] == [False, False]


def _expected_schedule():
    return [sample_active_layers(3, p, 4, 1) for p in range(3)]  # script: seed 3, 4 layers, γ=1, K=2


def test_zero2_trains_active_layers_only_on_both_ranks(ranks):
    expected = _expected_schedule()
    assert expected[0] == expected[2] != expected[1], "schedule must switch away and back (re-activation)"
    for doc in ranks:
        assert doc["zero_stage"] == 2 and doc["world_size"] == 2
        assert [s["active"] for s in doc["steps"]] == [expected[i // 2] for i in range(6)]
        for step in doc["steps"]:
            assert step["changed"] == step["active"], step
            assert step["embeddings_changed"]
    assert ranks[0]["schedule"] == ranks[1]["schedule"]
    # The schedule is written by the main process only, and one rank is main.
    assert ranks[0]["schedule_file"] and [d["is_main"] for d in ranks] == [True, False]


def test_ranks_see_different_batches(ranks):
    # accelerate must record both processes (finetune.launch.cpu_deepspeed_state: it can record one on CPU).
    assert [d["accelerate_num_processes"] for d in ranks] == [2, 2]
    seen = [set(d["seen"]) for d in ranks]
    assert not seen[0] & seen[1]
    assert len(seen[0]) >= 12 and len(seen[1]) >= 12  # 6 steps x batch 2 each


def test_ddp_under_torchrun_trains_active_layers_only(tmp_path):
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    docs = _launch(launcher, "ddp", tmp_path)
    expected = _expected_schedule()
    for doc in docs:
        assert doc["accelerate_num_processes"] == 2
        assert [s["changed"] for s in doc["steps"]] == [expected[i // 2] for i in range(6)]
    assert not set(docs[0]["seen"]) & set(docs[1]["seen"])

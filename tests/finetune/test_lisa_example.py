"""Smoke test: examples/lisa_trainer.py runs on its built-in tiny model and writes the schedule."""

import json
import subprocess
import sys
from pathlib import Path

from finetune.lisa import sample_active_layers

EXAMPLE = Path(__file__).parents[2] / "examples" / "lisa_trainer.py"


def test_example_trains_and_saves_schedule(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(tmp_path), "--steps", "11"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    schedule = json.loads((tmp_path / "lisa_schedule.json").read_text())
    # 11 steps with K=5: periods start at steps 0, 5, 10; the example's model has 6 layers, γ=2, seed 0.
    assert [p["start_step"] for p in schedule["periods"]] == [0, 5, 10]
    assert [p["layers"] for p in schedule["periods"]] == [sample_active_layers(0, q, 6, 2) for q in range(3)]
    assert proc.stderr.count("LISA period") == 3

"""Smoke tests of the examples not covered next to their part (each runs on a tiny model).

Covered elsewhere: lisa_trainer.py (tests/finetune/test_lisa_example.py), onebit_adam_deepspeed.py
(tests/finetune/test_onebit_distributed.py), merge_with_cli.py (tests/merging/test_cli.py),
acmize_minilm.py (tests/modular/test_acm.py).
"""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_inject_adamoe_example(tmp_path):
    out = _run("inject_adamoe.py", str(tmp_path))
    assert "save -> modular.load_model: same logits" in out
    assert (tmp_path / "routing.png").is_file() and (tmp_path / "model" / "config.json").is_file()


def test_upcycle_to_moe_example():
    out = _run("upcycle_to_moe.py")
    identical = float(re.search(r"llama -> mixtral: max \|logit difference\| (\S+)", out).group(1))
    assert identical < 1e-4  # identical expert copies compute the dense model
    assert "routing:" in out

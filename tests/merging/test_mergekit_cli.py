"""The ``modular`` command as a mergekit user meets it: fast help, mergekit's argument forms,
outputs with the user's umask, and a merge that runs on the lean install."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from modular.app.cli import build_parser, main
from modular.checkpoint import SafetensorsCheckpoint

from . import mergekit_reference as reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return reference.build_models(tmp_path_factory.mktemp("cli-models"))


def _config(models, tmp_path, method="dare_ties", **parameters) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": method, "base_model": str(models / "base"),
        "models": [{"model": str(models / f), "parameters": {"weight": 0.5, "density": 0.5, **parameters}} for f in ("ft1", "ft2")],
    }))
    return path


def _tensors(folder) -> dict[str, torch.Tensor]:
    checkpoint = SafetensorsCheckpoint(folder)
    return {n: checkpoint.get(n) for n in checkpoint.names()}


def _subcommands() -> list[list[str]]:
    found = [[]]
    for action in build_parser()._subparsers._group_actions:
        for name, parser in action.choices.items():
            found.append([name])
            for sub in parser._actions:
                if isinstance(sub, type(action)):
                    found += [[name, child] for child in sub.choices]
    return found


def test_every_help_is_fast_and_imports_no_torch():
    """Each ``--help`` in a fresh interpreter: under 1.5 s, torch never imported (what made it 8-11 s)."""
    probe = ("import sys, runpy; sys.argv = ['modular', *sys.argv[1:], '--help']\n"
             "try:\n    runpy.run_module('modular.app.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "assert 'torch' not in sys.modules, 'torch imported'")
    for words in _subcommands():
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", probe, *words], capture_output=True, text=True, timeout=60)
        seconds = time.perf_counter() - start
        assert proc.returncode == 0 and "usage: modular" in proc.stdout, (words, proc.stderr[-500:])
        assert seconds < 1.5, f"modular {' '.join(words)} --help took {seconds:.2f} s"


def test_out_as_mergekit_positional_and_random_seed(models, tmp_path):
    config = _config(models, tmp_path)
    assert main(["merge", str(config), str(tmp_path / "a"), "--random-seed", "7", "--no-progress"]) == 0
    assert main(["merge", str(config), "--out", str(tmp_path / "b"), "--random-seed", "7", "--no-progress",
                 "--lora-merge-cache", str(tmp_path / "cache")]) == 0
    assert main(["merge", str(config), str(tmp_path / "c"), "--random-seed", "8", "--no-progress"]) == 0
    a, b, c = (_tensors(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert main(["merge", str(config), str(tmp_path / "d"), "--out", str(tmp_path / "e")]) == 2


def test_compute_dtype_option_computes_in_that_dtype(models, tmp_path):
    config = _config(models, tmp_path, method="ties")
    assert main(["merge", str(config), str(tmp_path / "f32"), "--no-progress"]) == 0
    assert main(["merge", str(config), str(tmp_path / "bf16"), "--compute-dtype", "bfloat16", "--no-progress"]) == 0
    f32, bf16 = _tensors(tmp_path / "f32"), _tensors(tmp_path / "bf16")
    name = "model.layers.1.mlp.up_proj.weight"
    assert f32[name].dtype == bf16[name].dtype == torch.float32  # output: the base's dtype either way
    assert torch.equal(bf16[name], bf16[name].to(torch.bfloat16).float()) and not torch.equal(f32[name], bf16[name])


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o002, 0o664, 0o775), (0o077, 0o600, 0o700), (0o022, 0o644, 0o755)])
def test_outputs_get_the_users_umask(models, tmp_path, umask, file_mode, dir_mode):
    config = _config(models, tmp_path, method="ties")
    script = ("import os, sys; os.umask(int(sys.argv[1])); from modular.app.cli import main\n"
              "assert main(['merge', sys.argv[2], sys.argv[3], '--no-progress']) == 0\n"
              "assert main(['task-vector', 'extract', '--base', sys.argv[4], '--finetuned', sys.argv[5], '--out', sys.argv[6]]) == 0")
    proc = subprocess.run([sys.executable, "-c", script, str(umask), str(config), str(tmp_path / "out"), str(models / "base"),
                           str(models / "ft1"), str(tmp_path / "tv.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == dir_mode
    files = [*(tmp_path / "out").iterdir(), tmp_path / "tv.safetensors"]
    assert {f.name for f in files} >= {"model.safetensors", "config.json", "tokenizer.json", "merge.json", "README.md"}
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: file_mode for f in files}


BLOCKER = """
import sys
HEAVY = {"accelerate", "datasets", "peft", "matplotlib", "deepspeed", "pandas", "pyarrow", "mergekit"}
for name in HEAVY:  # None in sys.modules: `import` raises ModuleNotFoundError, importlib.util.find_spec says absent
    sys.modules[name] = None
import merging
assert callable(merging.run_merge)
from modular.app.cli import main
assert main(["merge", sys.argv[1], sys.argv[2], "--no-progress"]) == 0
assert all(sys.modules[name] is None for name in HEAVY)
"""


def test_merging_runs_without_training_plotting_or_data_packages(models, tmp_path):
    """The lean install (torch, safetensors, transformers, pyyaml, tqdm): every mergekit feature
    used here — gradients, a LoRA entry, a union vocabulary, a chat template — without
    accelerate, datasets, peft, matplotlib."""
    config = tmp_path / "lean.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(models / "base"),
        "models": [{"model": f"{models / 'base'}+{models / 'lora'}", "parameters": {"weight": [0, 1]}},
                   {"model": str(models / "ft_chat"), "parameters": {"weight": 0.5}}],
        "tokenizer": {"source": "union"}, "chat_template": "auto",
    }))
    proc = subprocess.run([sys.executable, "-c", BLOCKER, str(config), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_files_written_0600_inside_an_output_folder_get_the_umask(tmp_path):
    """safetensors' save_file (so save_pretrained) creates 0600 files whatever the umask."""
    script = ("import os, sys; os.umask(0o022)\n"
              "from modular.checkpoint import atomic_output_dir\n"
              "from modular.testing import tiny_model\n"
              "with atomic_output_dir(sys.argv[1]) as tmp:\n    tiny_model('llama').save_pretrained(tmp / 'model')")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*")}
    assert modes["model.safetensors"] == 0o644 and modes["model"] == 0o755 and set(modes.values()) == {0o644, 0o755}

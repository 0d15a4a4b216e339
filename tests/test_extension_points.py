"""A user's own merge method and injection kind, declared by an installed package's entry points,
work from `modular merge` YAML, from a `modular train` recipe and from `modular.load_model`,
with no edit to modular-llm. The "installed package" is a folder on PYTHONPATH holding the
plugin module and its dist-info (what pip would write)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modular.app.corpora import train_tokenizer
from modular.checkpoint import SafetensorsCheckpoint
from modular.testing import tiny_model

PLUGIN = '''
import torch
from dataclasses import dataclass

from merging import Parameter, register_merge_method
from merging.methods import finite
from modular import InjectionKind, find_modules, record_injection, register_injection, replace_module


@register_merge_method("user_scaled_sum", parameters=[Parameter("scale", 1.0, check=finite)])
def user_scaled_sum(base, deltas, *, weights, scale):
    """θ_0 + scale · Σ_k w_k δ_k."""
    return base + scale * sum(w * d for w, d in zip(weights, deltas))


class ShiftedMLP(torch.nn.Module):
    """The MLP's output plus a learned shift (zero at injection)."""

    def __init__(self, base_layer, width):
        super().__init__()
        self.base_layer = base_layer
        self.shift = torch.nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return self.base_layer(x) + self.shift


@dataclass
class ShiftConfig:
    pattern: str | None = None


def inject_shift(model, config):
    targets = [n for n, _ in find_modules(model, role="mlp", pattern=config.get("pattern"))]
    for name in targets:
        replace_module(model, name, ShiftedMLP(model.get_submodule(name), model.config.hidden_size))
    record_injection(model, "user_shift", config, targets)


def apply(model, config, calibration_data):
    inject_shift(model, {"pattern": config.pattern})
    return model


INJECTION = register_injection(InjectionKind("user_shift", ShiftConfig, apply, inject_shift))
'''


@pytest.fixture
def plugin_path(tmp_path):
    root = tmp_path / "site"
    (root / "user_plugin-0.1.dist-info").mkdir(parents=True)
    (root / "user_plugin.py").write_text(PLUGIN)
    (root / "user_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: user-plugin\nVersion: 0.1\n")
    (root / "user_plugin-0.1.dist-info" / "entry_points.txt").write_text(textwrap.dedent("""
        [modular.merge_methods]
        user_scaled_sum = user_plugin

        [modular.injections]
        user_shift = user_plugin:INJECTION
    """))
    return root


def _run(args, plugin_path, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_user_merge_method_works_from_yaml(plugin_path, tmp_path):
    base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    (tmp_path / "m.yaml").write_text(json.dumps({
        "merge_method": "user_scaled_sum", "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "ft"), "parameters": {"weight": 2.0}}], "parameters": {"scale": 0.25},
    }))
    proc = _run([sys.executable, "-m", "modular.app.cli", "merge", "m.yaml", "--out", "out", "--no-progress"], plugin_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = SafetensorsCheckpoint(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    expected = base.state_dict()[name] + 0.25 * 2.0 * (ft.state_dict()[name] - base.state_dict()[name])
    assert torch.allclose(merged.get(name), expected, atol=1e-6)
    assert "scale: `0.25`" in (tmp_path / "out" / "README.md").read_text()
    proc = _run([sys.executable, "-m", "modular.app.cli", "merge", "m.yaml", "--out", "out2"], plugin_path.parent, tmp_path)
    assert proc.returncode == 2 and "merge_method: 'user_scaled_sum' is not allowed" in proc.stderr  # without the plugin


def test_user_injection_kind_works_from_a_recipe_and_load_model(plugin_path, tmp_path):
    train_tokenizer(["shift the mlp output a little"] * 4).save_pretrained(tmp_path / "tok")
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": f"shift the mlp output {i}"}) for i in range(16)))
    recipe = {
        "model": {"config": {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
                  "tokenizer": "tok"},
        "injections": [{"user_shift": {"pattern": r"layers\.1\."}}],
        "data": {"train": "train.jsonl", "max_length": 16},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "save_steps": 100},
        "output_dir": "run",
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    proc = _run([sys.executable, "-m", "modular.app.cli", "train", "recipe.yaml"], plugin_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = ("from modular import load_model; m = load_model('run/model'); "
             "mlp = m.model.layers[1].mlp; print(type(mlp).__name__, float(mlp.shift.abs().sum()))")
    proc = _run([sys.executable, "-c", check], plugin_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, shift = proc.stdout.split()
    assert kind == "ShiftedMLP" and float(shift) > 0  # trained away from its zero init, and loaded back

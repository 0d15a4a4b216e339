"""Module surgery and the loader: find, replace, record, save, load_model."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from modular import find_modules, load_model, record_injection
from modular.checkpoint import CheckpointError
from modular.surgery import INJECTIONS_KEY, InjectionError, injection_records
from tests.gain_injection import GAIN_KIND, Gain, inject_gain


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "model_type,role", [("llama", "mlp"), ("qwen3", "layer"), ("mixtral", "router"), ("olmoe", "router")]
)
def test_round_trip_through_save_and_load_model(model_type, role, tiny, input_ids, tmp_path):
    model = tiny(model_type)
    original = _logits(model, input_ids)
    targets = inject_gain(model, {"role": role})
    assert torch.allclose(_logits(model, input_ids), original, atol=1e-6)  # identity at init

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gain"):
                p.uniform_(0.5, 1.5)
    injected = _logits(model, input_ids)
    assert not torch.allclose(injected, original, atol=1e-3)  # the saved state is not the base one

    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert [r["targets"] for r in injection_records(loaded)] == [targets]
    assert all(isinstance(loaded.get_submodule(t), Gain) for t in targets)
    assert torch.allclose(_logits(loaded, input_ids), injected, atol=1e-6)

    # and a loaded model saves and loads again
    loaded.save_pretrained(tmp_path / "again")
    assert torch.allclose(_logits(load_model(tmp_path / "again"), input_ids), injected, atol=1e-6)


def test_plain_from_pretrained_refuses_injected_checkpoint(tiny, tmp_path):
    model = tiny("llama")
    inject_gain(model, {"role": "mlp"})
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[INJECTIONS_KEY][0]["kind"] == GAIN_KIND
    with pytest.raises(ValueError, match="modular.load_model"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.model_type == "llama"  # at run time the HF model_type is untouched


def test_load_model_on_plain_checkpoint(tiny, input_ids, tmp_path):
    model = tiny("qwen2")
    model.save_pretrained(tmp_path)
    assert torch.allclose(_logits(load_model(tmp_path), input_ids), _logits(model, input_ids), atol=1e-6)


def test_find_modules_by_role_and_pattern(tiny):
    model = tiny("llama")
    assert [n for n, _ in find_modules(model, role="mlp")] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [n for n, _ in find_modules(model, role="mlp", pattern=r"layers\.1\.")] == ["model.layers.1.mlp"]
    assert [n for n, _ in find_modules(model, role="embeddings")] == ["model.embed_tokens"]
    assert [n for n, _ in find_modules(model, role="head")] == ["lm_head"]
    assert len(find_modules(model, pattern=r"self_attn\.q_proj$")) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"role": "router"}, "role 'router' matches no module"),
        ({"pattern": "no_such_module"}, "pattern 'no_such_module' matches no module"),
        ({"role": "wings"}, "unknown role 'wings'"),
        ({"pattern": "("}, "not a valid regular expression"),
        ({}, "give a role"),
    ],
)
def test_bad_selections_are_errors(kwargs, match, tiny):
    with pytest.raises(InjectionError, match=match):
        find_modules(tiny("llama"), **kwargs)


def test_unknown_injection_kind_on_load_is_a_clear_error(tiny, tmp_path):
    model = tiny("llama")
    record_injection(model, "no_such_kind", {}, [])
    model.save_pretrained(tmp_path)
    with pytest.raises(InjectionError, match="'no_such_kind'.*register_injection"):
        load_model(tmp_path)


def test_load_model_bad_paths_and_files(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_model(tmp_path / "missing")
    model = tiny("llama")
    inject_gain(model, {"role": "mlp"})
    model.save_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "ok")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "noconfig")


def test_newer_record_format_is_refused(tiny, tmp_path):
    model = tiny("llama")
    inject_gain(model, {"role": "mlp"})
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[INJECTIONS_KEY][0]["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InjectionError, match="format_version 99"):
        load_model(tmp_path)


def test_user_facing_helpers_register_no_test_injection():
    """The demo and the examples import modular.testing; only the tests may register ``test_gain``."""
    code = ("import modular.testing, modular.app.demo; from modular.injections import injection_kinds; "
            f"assert {GAIN_KIND!r} not in injection_kinds(), injection_kinds()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

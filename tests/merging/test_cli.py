"""`modular merge` / `modular task-vector`: YAML round trip, sharded output, overwrite refusal, injections."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from merging import TaskVector, merge
from modular import load_model
from modular.app.cli import main
from modular.testing import tiny_model
from tests.gain_injection import GAIN_KIND, inject_gain


def _write(path, config):
    path.write_text(yaml.safe_dump(config))
    return path


def _ties_config(base, fts):
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": w, "density": 0.5}} for f, w in zip(fts, (1.0, 0.5, 0.8))],
        "parameters": {"lambda": 0.9, "normalize": True},
        "out_shard_size": "20KB",
    }


def test_merge_cli_round_trip(llama_folders, tmp_path, input_ids):
    base, fts = llama_folders
    config = _write(tmp_path / "merge.yaml", _ties_config(base, fts))
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    card = (out / "README.md").read_text()
    assert "method: `ties`" in card and "normalize: `true`" in card
    merged = load_model(out)
    tvs = [TaskVector.from_models(base, f) for f in fts]
    expected = merge("ties", base, tvs, weights=[1.0, 0.5, 0.8], density=0.5, lambda_=0.9, combine="mergekit", progress=False)
    for name, p in merged.state_dict().items():
        assert torch.equal(p, expected[name]), name
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids).logits).all()


def test_merge_refuses_to_overwrite_without_force(llama_folders, tmp_path):
    base, fts = llama_folders
    config = _write(tmp_path / "merge.yaml", {**_ties_config(base, fts), "merge_method": "task_arithmetic", "parameters": {"lambda": 0.3}})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "modular.app.cli", "merge", str(config), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not empty; pass --force" in proc.stderr
    assert (tmp_path / "out" / "keep.txt").is_file()
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--force", "--no-progress"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"merge_method": "frankenmerge"}, "merge_method: 'frankenmerge' is not allowed"),
        ({"parameters": {"lambda": 1.0, "gama": 2}}, "parameters: unknown key(s) gama for merge method 'ties'; allowed: weight, density, lambda"),
        ({"models": [{"model": "x", "parameters": {"densty": 1}}]}, "models[0].parameters: unknown key(s) densty for merge method 'ties'; allowed: weight, density"),
        ({"parameters": {"density": [0.5, 1.5]}}, "parameters.density: 1.5 is not allowed for 'density'; expected a number in (0, 1]"),
        ({"slices": [{"sources": []}, {"sources": []}], "models": None}, "slices: 2 slices make a frankenmerge"),
        ({"dtype": "int8"}, "merge.yaml.dtype"),
        ({"merge_method": "adamerging", "parameters": {}}, "adamerging needs unlabelled data"),
    ],
)
def test_config_errors_name_the_key(llama_folders, tmp_path, capsys, patch, message):
    base, fts = llama_folders
    config = _write(tmp_path / "merge.yaml", {**_ties_config(base, fts), **patch})
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_task_vector_extract_and_apply(llama_folders, tmp_path):
    base, (ft0, *_) = llama_folders
    assert main(["task-vector", "extract", "--base", str(base), "--finetuned", str(ft0), "--out", str(tmp_path / "tv")]) == 0
    assert main(["task-vector", "apply", "--base", str(base), "--task-vector", str(tmp_path / "tv"), "--scale", "0.5", "--out", str(tmp_path / "m")]) == 0
    name = "model.layers.1.self_attn.o_proj.weight"
    base_w, ft_w = load_model(base).state_dict()[name], load_model(ft0).state_dict()[name]
    assert torch.allclose(load_model(tmp_path / "m").state_dict()[name], base_w + 0.5 * (ft_w - base_w), atol=1e-6)


def test_injected_models_merge_into_a_loadable_injected_model(tmp_path, input_ids):
    base = tiny_model("llama")
    inject_gain(base, {"role": "mlp"})
    base.save_pretrained(tmp_path / "base")
    for i in range(2):
        ft = load_model(tmp_path / "base")
        with torch.no_grad():
            for n, p in ft.named_parameters():
                if n.endswith("gain"):
                    p.fill_(1.0 + i)
        ft.save_pretrained(tmp_path / f"ft{i}")
    config = _write(tmp_path / "m.yaml", {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
                                          "models": [{"model": str(tmp_path / f"ft{i}")} for i in range(2)],
                                          "parameters": {"lambda": 0.5}})
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["modular_injections"][0]["kind"] == GAIN_KIND
    merged = load_model(tmp_path / "out")
    gains = [p for n, p in merged.named_parameters() if n.endswith("gain")]
    assert gains and all(torch.allclose(g, torch.full_like(g, 1.5)) for g in gains)  # 1 + 0.5 * (0 + 1)


def test_example_script_runs(tmp_path):
    example = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "merge_with_cli.py"
    proc = subprocess.run([sys.executable, str(example), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CLI and Python merges agree" in proc.stdout and (tmp_path / "adamerged" / "README.md").is_file()


def test_task_vector_extract_from_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert main(["task-vector", "extract", "--lora", str(tmp_path / "adapter"), "--out", str(tmp_path / "tv")]) == 0
    tv = TaskVector.load(tmp_path / "tv")
    assert sorted(tv.names()) == [f"model.layers.{i}.self_attn.v_proj.weight" for i in range(2)]
    assert main(["task-vector", "extract", "--finetuned", str(tmp_path / "adapter"), "--out", str(tmp_path / "x")]) == 2

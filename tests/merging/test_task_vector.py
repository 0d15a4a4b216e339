"""TaskVector: extraction (folders, modules, LoRA), arithmetic, save/load, and bad input."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from merging import TaskVector, merge
from modular.checkpoint import CheckpointError
from modular.testing import tiny_model

from .conftest import perturbed

NAME = "model.layers.0.mlp.down_proj.weight"


def test_from_folders_equals_from_modules(llama_folders):
    base, (ft0, *_) = llama_folders
    from_folders = TaskVector.from_models(base, ft0)
    from_modules = TaskVector.from_models(tiny_model("llama"), perturbed(tiny_model("llama"), seed=100))
    assert sorted(from_folders.names()) == sorted(from_modules.names())
    expected = perturbed(tiny_model("llama"), seed=100).state_dict()[NAME] - tiny_model("llama").state_dict()[NAME]
    assert torch.allclose(from_folders.get(NAME), expected, atol=1e-7)
    assert torch.allclose(from_folders.get(NAME), from_modules.get(NAME))


def test_arithmetic(llama_folders):
    base, (ft0, ft1, _) = llama_folders
    a, b = TaskVector.from_models(base, ft0), TaskVector.from_models(base, ft1)
    assert torch.allclose((a + b).get(NAME), a.get(NAME) + b.get(NAME))
    assert torch.allclose((a - b).get(NAME), a.get(NAME) - b.get(NAME))
    assert torch.allclose((0.5 * a).get(NAME), a.get(NAME) / 2)
    assert torch.allclose((-a).get(NAME), -a.get(NAME))
    partial = TaskVector.from_tensors({NAME: torch.ones(a.shapes[NAME])})
    assert torch.allclose((a + partial).get(NAME), a.get(NAME) + 1)
    other = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal((partial + a).get(other), a.get(other))  # absent = zero delta


def test_save_load_and_apply_round_trip(llama_folders, tmp_path):
    base, (ft0, *_) = llama_folders
    tv = TaskVector.from_models(base, ft0)
    tv.save(tmp_path / "tv", max_shard_bytes=20_000)  # several shards
    assert (tmp_path / "tv" / "model.safetensors.index.json").is_file()
    loaded = TaskVector.load(tmp_path / "tv")
    assert loaded.names() == tv.names()
    assert all(torch.equal(loaded.get(n), tv.get(n)) for n in tv.names())
    merge("task_arithmetic", base, [loaded], out=tmp_path / "model", progress=False)
    model = perturbed(tiny_model("llama"), seed=100)
    from modular import load_model

    reloaded = load_model(tmp_path / "model")
    for name, p in model.state_dict().items():
        assert torch.allclose(reloaded.state_dict()[name], p, atol=1e-6), name


def test_lora_adapter_gives_its_dense_delta(tmp_path):
    model = tiny_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "adapter")
    from_folder = TaskVector.from_lora(tmp_path / "adapter")
    from_module = TaskVector.from_lora(peft_model)
    dense = peft_model.merge_and_unload().state_dict()
    base = tiny_model("llama").state_dict()
    assert sorted(from_folder.names()) == sorted(from_module.names())
    assert len(from_folder.names()) == 4  # q_proj and down_proj in 2 layers
    for name in from_folder.names():
        assert torch.allclose(from_folder.get(name), dense[name] - base[name], atol=1e-5), name
        assert torch.allclose(from_module.get(name), from_folder.get(name), atol=1e-6)
    merged = merge("task_arithmetic", base, [from_folder], progress=False)
    assert all(torch.allclose(merged[n], dense[n], atol=1e-5) for n in base)


def test_shape_mismatch_lists_first_tensors(llama_folders, tmp_path):
    base, _ = llama_folders
    tiny_model("llama", intermediate_size=48).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"different architecture or shapes\): 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(32, 48\) in fine-tuned model, \(32, 64\) in base; .*\(and 1 more\)"):
        TaskVector.from_models(base, tmp_path / "other")


def test_vocab_mismatch_is_named(llama_folders, tmp_path):
    base, _ = llama_folders
    tiny_model("llama", vocab_size=130).save_pretrained(tmp_path / "bigger")
    with pytest.raises(ValueError, match="vocab sizes differ: .* vocab_size 128, .* has 130"):
        TaskVector.from_models(base, tmp_path / "bigger")


def test_corrupt_and_missing_safetensors_name_the_file(llama_folders, tmp_path):
    base, _ = llama_folders
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(CheckpointError, match=r"broken/model.safetensors: cannot be read as safetensors"):
        TaskVector.from_models(base, tmp_path / "broken")
    with pytest.raises(CheckpointError, match="does not exist"):
        TaskVector.from_models(base, tmp_path / "nowhere")


def test_nan_in_task_vector_is_an_error(llama_folders):
    base, _ = llama_folders
    bad = TaskVector.from_tensors({NAME: torch.full((32, 64), float("nan"))}, label="bad")
    with pytest.raises(ValueError, match=f"bad: tensor '{NAME}' of the task vector contains NaN or inf"):
        merge("task_arithmetic", base, [bad], progress=False)


def test_saved_task_vector_format_is_checked(tmp_path):
    TaskVector.from_tensors({"w": torch.ones(2)}).save(tmp_path / "tv")
    meta = tmp_path / "tv" / "task_vector.json"
    meta.write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="format 'other'"):
        TaskVector.load(tmp_path / "tv")

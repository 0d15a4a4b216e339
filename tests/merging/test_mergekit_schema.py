"""mergekit's YAML schema in ``modular merge``: per-tensor values (gradients, filters, scopes),
defaults, ``model:`` entries (BASE+LORA, adapters, task vectors), against hand computations."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merging import TaskVector, load_merge_config, merge, merge_method_names, run_merge
from merging.methods import get_merge_method
from merging.parameters import Filtered, Gradient, LayerPositions, evaluate, parse_setting, resolve_setting
from modular.checkpoint import SafetensorsCheckpoint

from . import mergekit_reference as reference

LAYER = "model.layers.{}.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return reference.build_models(tmp_path_factory.mktemp("schema-models"))


def _run(tmp_path, config: dict, **kwargs) -> dict[str, torch.Tensor]:
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    out = run_merge(load_merge_config(path), tmp_path / "out", progress=False, force=True, **kwargs)
    checkpoint = SafetensorsCheckpoint(out)
    return {n: checkpoint.get(n) for n in checkpoint.names()}


def _state(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- resolution
@pytest.mark.parametrize("raw,t,expected", [
    ([1, 0.7, 0.1], 0.0, 1.0), ([1, 0.7, 0.1], 1 / 3, 1 / 3 * 1 + 2 / 3 * 0.7), ([1, 0.7, 0.1], 0.5, 0.7), ([1, 0.7, 0.1], 1.0, 0.1),
    ([0, 0.3, 0.7, 1], 2 / 3, 0.7), ([0, 1], 0.25, 0.25), ([True, False], 0.5, True), ([True, False], 1.0, False),
    (0.4, 0.9, 0.4),
])
def test_gradients_interpolate_numbers_and_pick_other_values(raw, t, expected):
    assert evaluate(parse_setting(raw, "x"), LAYER.format(0), t) == pytest.approx(expected)


def test_filters_first_match_wins_and_unmatched_falls_through():
    weight = parse_setting([{"filter": "mlp", "value": [0, 1]}, {"filter": "self_attn", "value": 0.2}], "weight")
    assert weight == Filtered((("mlp", Gradient((0, 1))), ("self_attn", 0.2)))
    assert evaluate(weight, LAYER.format(3), 1.0) == 1.0
    assert evaluate(weight, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.2
    assert evaluate(weight, "model.norm.weight", 0.0) is None
    scopes = [{"weight": weight}, {"weight": 0.3}]
    assert resolve_setting("weight", scopes, "model.norm.weight", 0.0) == 0.3  # the next scope answers
    assert resolve_setting("weight", scopes, LAYER.format(0), 0.0) == 0.0
    assert evaluate(parse_setting({"filter": "*", "value": 0.4}, "w"), "anything", 0.0) == 0.4


@pytest.mark.parametrize("raw,message", [
    ([{"filter": "mlp"}], r"weight\[0\]: .* expected \{filter: NAME_PART, value: VALUE\}"),
    ([{"filter": "mlp", "value": 1, "filtre": "x"}], r"weight\[0\]: unknown key\(s\) filtre"),
    ({"value": [[1, 2]]}, r"weight.value: \[\[1, 2\]\] is not allowed"),
])
def test_malformed_settings_name_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_setting(raw, "weight")


def test_layer_positions_follow_the_architecture_registry():
    names = [LAYER.format(i) for i in range(4)] + ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    positions = LayerPositions(names, "llama")
    assert [positions(LAYER.format(i)) for i in range(4)] == [0, 1 / 3, 2 / 3, 1]
    assert positions("model.embed_tokens.weight") == positions("lm_head.weight") == positions("model.norm.weight") == 0
    gpt2 = LayerPositions([f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)], "gpt2")
    assert gpt2("transformer.h.1.attn.c_attn.weight") == 0.5 and gpt2("transformer.wte.weight") == 0


def test_a_gradient_and_a_filter_resolve_per_tensor_in_a_merge(models, tmp_path):
    """weight [0, 0.3, 0.6, 0.9] over 4 layers gives layer i weight 0.3·i (embeddings/head: t = 0);
    a filter gives the MLPs of model 2 weight 0.5 and the rest falls through to the global 0.1."""
    base, ft1, ft2 = (_state(models / r) for r in ("base", "ft1", "ft2"))
    merged = _run(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": str(models / "base"),
        "models": [{"model": str(models / "ft1"), "parameters": {"weight": [0, 0.3, 0.6, 0.9]}},
                   {"model": str(models / "ft2"), "parameters": {"weight": [{"filter": "mlp", "value": 0.5}]}}],
        "parameters": {"weight": 0.1},
    })
    for name, tensor in merged.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else 0
        w2 = 0.5 if ".mlp." in name else 0.1
        expected = base[name] + 0.3 * layer * (ft1[name] - base[name]) + w2 * (ft2[name] - base[name])
        assert torch.allclose(tensor, expected, atol=1e-6), name


# ----------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("name", merge_method_names())
def test_function_defaults_are_the_registry_defaults(name):
    method = get_merge_method(name)
    signature = inspect.signature(method.fn).parameters
    for p in method.parameters:
        if p.keyword in signature and signature[p.keyword].default is not inspect.Parameter.empty:
            assert signature[p.keyword].default == p.default, (name, p.name)


def test_yaml_uses_mergekit_defaults_python_the_library_defaults(models, tmp_path):
    """mergekit's ties without density trims nothing (density 1.0); merging.merge trims to 0.2.
    mergekit's dare_ties sums (normalize false); merging.merge divides by the agreeing weights."""
    base, fts = models / "base", [models / "ft1", models / "ft2"]
    config = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(f)} for f in fts]}
    from_yaml = _run(tmp_path, config)
    tvs = [TaskVector.from_models(base, f) for f in fts]
    assert all(torch.equal(from_yaml[n], t) for n, t in merge("ties", base, tvs, density=1.0, progress=False).items())
    python = merge("ties", base, tvs, progress=False)
    assert any(not torch.equal(from_yaml[n], t) for n, t in python.items())
    assert get_merge_method("dare_ties").parameter("normalize").default_for(mergekit=True) is False
    assert get_merge_method("dare_ties").parameter("normalize").default is True


def test_required_and_cross_parameter_checks_stop_before_any_work(models, tmp_path):
    slerp = {"merge_method": "slerp", "base_model": str(models / "base"), "models": [{"model": str(models / "ft1")}]}
    with pytest.raises(ValueError, match="missing required parameter 't'"):
        _run(tmp_path, slerp)
    della = {"merge_method": "della", "base_model": str(models / "base"),
             "models": [{"model": str(models / "ft1"), "parameters": {"density": 0.9, "epsilon": 0.2}}]}
    with pytest.raises(ValueError, match=r"density 0.9 ± epsilon 0.2 must stay inside \(0, 1\)"):
        _run(tmp_path, della)
    assert not (tmp_path / "out").exists()


def test_numbers_written_as_text_are_read_as_mergekit_reads_them(models, tmp_path):
    config = {"merge_method": "ties", "base_model": str(models / "base"),
              "models": [{"model": str(models / "ft1"), "parameters": {"density": "5e-1"}}]}
    tvs = [TaskVector.from_models(models / "base", models / "ft1")]
    expected = merge("ties", models / "base", tvs, density=0.5, progress=False)
    assert all(torch.equal(_run(tmp_path, config)[n], t) for n, t in expected.items())


def test_unsupported_structures_are_refused_clearly(models, tmp_path):
    base = str(models / "base")
    partial = {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5},
               "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}, {"model": str(models / "ft1"), "layer_range": [0, 2]}]}]}
    with pytest.raises(ValueError, match=r"layer_range: \[0, 2\] is part of .*\(a frankenmerge\) is not supported yet; use \[0, 4\]"):
        _run(tmp_path, partial)
    with pytest.raises(ValueError, match="modules: multi-module merges are not supported yet"):
        _run(tmp_path, {"merge_method": "linear", "modules": {"text": {}}})
    with pytest.raises(ValueError, match="expected a folder or MODEL\\+LORA_ADAPTER"):
        _run(tmp_path, {"merge_method": "linear", "models": [{"model": f"{base}+{base}+{base}"}]})


# ----------------------------------------------------------------------------- model: entries
def test_lora_entries_base_plus_lora_and_a_bare_adapter_are_the_same_task_vector(models, tmp_path):
    """``BASE+LORA`` is the model W + (α/r)·B A; a bare adapter folder is that delta over base_model."""
    base = _state(models / "base")
    adapter = load_file(str(models / "lora" / "adapter_model.safetensors"))
    config = {"merge_method": "task_arithmetic", "base_model": str(models / "base"),
              "models": [{"model": f"{models / 'base'}+{models / 'lora'}", "parameters": {"weight": 0.5}}]}
    plus = _run(tmp_path, config)
    for name, tensor in plus.items():
        key = "base_model.model." + name.removesuffix(".weight")
        if f"{key}.lora_A.weight" in adapter:
            delta = (adapter[f"{key}.lora_B.weight"] @ adapter[f"{key}.lora_A.weight"]) * (4 / 2)
            assert torch.allclose(tensor, base[name] + 0.5 * delta, atol=1e-6), name
        else:
            assert torch.equal(tensor, base[name]), name
    config["models"][0]["model"] = str(models / "lora")
    bare = _run(tmp_path, config)
    assert all(torch.allclose(bare[n], t, atol=1e-6) for n, t in plus.items())


@pytest.mark.parametrize("saved_as", ["folder", "tv.safetensors"])
def test_a_saved_task_vector_is_used_as_a_delta_never_as_a_model(models, tmp_path, saved_as):
    """Before: the folder of τ was read as a model θ, giving θ_0 + (τ − θ_0)."""
    tv = TaskVector.from_models(models / "base", models / "ft1")
    saved = tv.save(tmp_path / saved_as)
    config = {"merge_method": "task_arithmetic", "base_model": str(models / "base"),
              "models": [{"model": str(saved), "parameters": {"weight": 0.7}}]}
    merged = _run(tmp_path, config)
    expected = merge("task_arithmetic", models / "base", [tv], weights=0.7, progress=False)
    assert all(torch.allclose(merged[n], t, atol=1e-7) for n, t in expected.items())
    from_python = merge("task_arithmetic", models / "base", [saved], weights=0.7, progress=False)
    assert all(torch.equal(from_python[n], t) for n, t in merged.items())
    with pytest.raises(ValueError, match="is a task vector"):
        merge("task_arithmetic", saved, [models / "ft1"], progress=False)
    with pytest.raises(ValueError, match="is a saved task vector, not a model"):
        TaskVector.from_models(models / "base", saved)


def test_task_vector_extract_writes_the_file_it_is_given(models, tmp_path):
    from modular.app.cli import main

    out = tmp_path / "tv.safetensors"
    assert main(["task-vector", "extract", "--base", str(models / "base"), "--finetuned", str(models / "ft1"), "--out", str(out)]) == 0
    assert out.is_file() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    tv = TaskVector.load(out)
    expected = TaskVector.from_models(models / "base", models / "ft1")
    assert sorted(tv.names()) == sorted(expected.names())
    assert all(torch.equal(tv.get(n), expected.get(n)) for n in expected.names())
    assert main(["task-vector", "extract", "--base", str(models / "base"), "--finetuned", str(models / "ft1"), "--out", str(out)]) == 2


# ----------------------------------------------------------------------------- outputs
def test_merge_folder_records_the_merge_and_the_report_renders_it(models, tmp_path):
    from modular.app.report import write_report

    config = {"merge_method": "ties", "base_model": str(models / "base"),
              "models": [{"model": str(models / "ft1"), "parameters": {"density": [1, 0.5], "weight": 1.0}}],
              "parameters": {"int8_mask": True}}
    _run(tmp_path, config)
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert record["method"] == "ties" and record["models"][0]["parameters"] == {"density": [1, 0.5], "weight": 1.0}
    assert record["defaults"]["normalize"] is True and record["defaults_from"] == "mergekit 0.1.5"
    html = write_report([tmp_path / "out"], tmp_path / "report.html").read_text()
    assert "Merge: out" in html and "int8_mask" in html and "[1, 0.5]" in html


def test_linear_with_the_base_listed_first_weighs_each_model_by_its_own_weight(models, tmp_path):
    base, ft1 = _state(models / "base"), _state(models / "ft1")
    merged = _run(tmp_path, {"merge_method": "linear", "base_model": str(models / "base"),
                             "models": [{"model": str(models / "base"), "parameters": {"weight": 0.2}},
                                        {"model": str(models / "ft1"), "parameters": {"weight": 0.6}}]})
    assert all(torch.allclose(t, (0.2 * base[n] + 0.6 * ft1[n]) / 0.8, atol=1e-6) for n, t in merged.items())


@pytest.mark.parametrize("form", ["folders", "state dicts", "task vectors"])
def test_python_api_takes_models_in_any_form(models, form):
    """Folders, in-memory state dicts and task vectors give the same merge; ``linear`` needs no base."""
    folders = [models / "ft1", models / "ft2"]
    inputs = {"folders": folders, "state dicts": [_state(f) for f in folders],
              "task vectors": [TaskVector.from_models(models / "base", f) for f in folders]}[form]
    ties = merge("ties", models / "base", inputs, weights=[0.3, 0.5], density=0.5, progress=False)  # mergekit's README legacy TIES
    theirs = load_file(str(reference.REFERENCES / "04_readme_legacy_ties.published.safetensors"))
    assert all(torch.allclose(ties[n], t, atol=1e-6) for n, t in theirs.items())
    if form != "task vectors":
        averaged = merge("linear", None, inputs, weights=[1.0, 3.0], progress=False)
        ft1, ft2 = (_state(f) for f in folders)
        assert all(torch.allclose(t, (ft1[n] + 3 * ft2[n]) / 4, atol=1e-6) for n, t in averaged.items())


def test_input_paths_name_every_folder_a_merge_reads(models, tmp_path):
    """What an output folder must never overlap: models, LoRA adapters, the base, tokenizer sources."""
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(models / "base"),
        "models": [{"model": f"{models / 'ft1'}+{models / 'lora'}"}, {"model": str(models / "ft_chat")}],
        "tokenizer": {"source": str(models / "ft2"), "tokens": {"tok5": {"source": str(models / "ft_chat")}}},
    }))
    assert load_merge_config(path).input_paths() == [str(models / r) for r in ("ft1", "lora", "ft_chat", "base", "ft2")]


def test_nan_in_a_model_is_named(models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    state = _state(models / "ft1")
    state["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(state, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((models / "ft1" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"broken'?: tensor 'model.layers.2.mlp.up_proj.weight' contains NaN or inf"):
        _run(tmp_path, {"merge_method": "ties", "base_model": str(models / "base"), "models": [{"model": str(broken)}]})

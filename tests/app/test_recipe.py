"""`modular train` recipes: parsing, path resolution and the combinations that are refused."""

import json

import pytest

from modular.app.recipe import load_recipe
from modular.config_io import ConfigError


@pytest.fixture
def recipe_dir(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "tok").mkdir()
    (tmp_path / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    (tmp_path / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    (tmp_path / "zero0.json").write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    return tmp_path


MINIMAL_RECIPE = {
    "model": {"config": {"model_type": "llama", "hidden_size": 32}, "tokenizer": "tok"},
    "data": {"train": "train.jsonl"},
    "output_dir": "out",
}


def test_valid_recipe_resolves_paths_relative_to_the_file(recipe_dir, write_recipe):
    recipe = load_recipe(
        write_recipe(
            recipe_dir, MINIMAL_RECIPE,
            injections=[{"upcycle": {"num_experts": 4}}, {"adamoe": {"top_k": 3}}],
            lisa={"num_active_layers": 1, "interval_steps": 5},
            optimizer={"name": "onebit_adam", "lr": 1e-3, "freeze_step": 4},
            deepspeed="zero0.json",
        )
    )
    assert recipe.output_dir == str(recipe_dir / "out")
    assert recipe.data.train == str(recipe_dir / "train.jsonl")
    assert [i["kind"] for i in recipe.injections] == ["upcycle", "adamoe"]
    assert recipe.lisa.interval_steps == 5 and recipe.optimizer.freeze_step == 4
    assert recipe.zero_stage == 0


@pytest.mark.parametrize(
    "sections,match",
    [
        ({"lisa": {"interval_step": 5}}, r"lisa: unknown key\(s\) interval_step; allowed: num_active_layers"),
        ({"bogus": 1}, r"unknown key\(s\) bogus"),
        ({"data": {"train": "missing.jsonl"}}, "data.train: file .*missing.jsonl.* does not exist"),
        ({"data": {"train": "train.parquet"}}, "expected one of .jsonl"),
        ({"data": {"train": "train.jsonl", "prompt_field": "q"}}, "give both `prompt_field` and `completion_field`"),
        ({"model": {"path": "nowhere"}}, "model.path: folder .*nowhere.* does not exist"),
        ({"model": {"config": {"hidden_size": 3}, "tokenizer": "tok"}}, "needs a `model_type`"),
        ({"optimizer": {"name": "sgd"}}, r"optimizer.name: 'sgd' is not allowed; expected one of 'adamw', 'onebit_adam'"),
        ({"optimizer": {"lr": "fast"}}, "optimizer.lr: expected float"),
        ({"injections": [{"lora": {}}]}, "unknown injection 'lora'"),
        ({"injections": [{"adamoe": {}}, {"upcycle": {}}]}, "`upcycle` must come before `adamoe`"),
        ({"lisa": {}, "deepspeed": "zero3.json"}, "lisa with ZeRO stage 3 is not supported"),
        ({"optimizer": {"name": "onebit_adam"}, "deepspeed": "zero2.json"}, "onebit_adam needs ZeRO stage 0"),
        ({"deepspeed": "no-such-config"}, "neither a file nor a packaged DeepSpeed config"),
        ({"training": {"output_dir": "x"}}, "set by the recipe itself"),
        ({"optimizer": {"freeze_step": 3}}, "only applies to name: onebit_adam"),
        ({"model": {"path": "tok", "task": "sequence_classification"}}, "needs `num_labels`, an integer >= 2; got None"),
        ({"model": {"path": "tok", "num_labels": 3}}, "`num_labels` only applies to task: sequence_classification"),
        ({"model": {"path": "tok", "task": "sequence_classification", "num_labels": 3}},
         "data.label_field .* goes with model.task: sequence_classification"),
        ({"data": {"train": "train.jsonl", "label_field": "label"}}, "data.label_field .* goes with model.task"),
        ({"model": {"path": "tok", "task": "classify"}}, "model.task: 'classify' is not allowed"),
        ({"injections": [{"ffn_experts": {"num_experts": 3, "top_k": 4}}]}, r"top_k must be None or an integer in \[1, num_experts=3\]"),
    ],
)
def test_bad_recipes_get_one_clear_error(recipe_dir, write_recipe, sections, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(write_recipe(recipe_dir, MINIMAL_RECIPE, **sections))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(tmp_path / "none.yaml")

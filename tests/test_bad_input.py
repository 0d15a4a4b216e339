"""Bad input and the documented paths of issue 17: one clear error before any work, and nothing
read or written silently wrong. Each test is a row of docs/faults.md."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

from finetune import MoEAuxLossCallback
from merging import TaskVector
from modular import ACMConfig, acmize, load_model
from modular.acm import set_threshold
from modular.app.cli import main
from modular.app.recipe import load_recipe
from modular.app.train import run_recipe
from modular.checkpoint import CheckpointError, _host, atomic_output_dir
from modular.config_io import ConfigError
from modular.loading import load_checkpoint_into
from modular.surgery import INJECTIONS_KEY, base_model_type, injection_records
from modular.testing import tiny_model
from moe import AdaMoEConfig, adamoe_aux_loss, inject_adamoe
from tests.app.test_train_recipe import TINY_RUN_RECIPE
from tests.gain_injection import inject_gain
from tests.tiny_inputs import TEXT, digest, write_merge_models, write_recipe_data


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _adamoe_mixtral(seed=0):
    model = tiny_model("mixtral", seed=seed)
    inject_adamoe(model, AdaMoEConfig(num_null_experts=2, top_k=3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "null" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# --------------------------------------------------------------------------- loading


def test_injection_records_that_are_not_a_list_are_refused(tiny, tmp_path):
    model = tiny("llama")
    inject_gain(model, {"role": "mlp"})
    model.save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda c: c.update({INJECTIONS_KEY: c[INJECTIONS_KEY][0]}))
    with pytest.raises(CheckpointError, match="modular_injections must be a list of injection records, got dict"):
        load_model(tmp_path)


def test_a_removed_injection_record_is_an_error_naming_the_unread_tensors(input_ids, tmp_path):
    model = _adamoe_mixtral()
    model.save_pretrained(tmp_path)

    def drop_record(config):
        del config[INJECTIONS_KEY]
        config["model_type"] = base_model_type(config["model_type"])

    _edit_config(tmp_path, drop_record)
    with pytest.raises(CheckpointError, match=r"4 tensors in the folder are read by no part of the model.*mlp.gate.null_bias"):
        load_model(tmp_path)
    with pytest.warns(UserWarning, match="read by no part of the model"):
        plain = load_model(tmp_path, strict=False)  # the explicit opt-out: loads, says what it dropped
    assert not torch.allclose(_logits(plain, input_ids), _logits(model, input_ids), atol=1e-3)


def test_missing_or_extra_tensors_of_an_injected_checkpoint_are_errors(tiny, tmp_path):
    model = tiny("llama")
    inject_gain(model, {"role": "mlp"})
    model.save_pretrained(tmp_path / "missing")
    _edit_tensors(tmp_path / "missing", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="1 tensors the model needs are not in the folder.*model.norm.weight"):
        load_model(tmp_path / "missing")
    model.save_pretrained(tmp_path / "extra")
    _edit_tensors(tmp_path / "extra", lambda t: t.update({"model.stray.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="read by no part of the model.*model.stray.weight"):
        load_model(tmp_path / "extra")


def test_load_checkpoint_into_restores_fused_experts_and_null_routers(input_ids, tmp_path):
    """What Trainer's resume dropped: Mixtral experts are saved under unfused names."""
    trained = _adamoe_mixtral(seed=1)
    trained.save_pretrained(tmp_path)
    fresh = _adamoe_mixtral(seed=2)
    assert not torch.allclose(_logits(fresh, input_ids), _logits(trained, input_ids), atol=1e-3)
    load_checkpoint_into(fresh, tmp_path)
    state = trained.state_dict()
    assert all(torch.equal(p, state[n]) for n, p in fresh.state_dict().items())
    with pytest.raises(CheckpointError, match=r"records injections \['adamoe'\], the model to load into has \[\]"):
        load_checkpoint_into(tiny_model("mixtral"), tmp_path)


# --------------------------------------------------------------------------- ACM and AdaMoE


def test_acm_threshold_is_saved_and_reloaded(tiny, input_ids, tmp_path):
    model = acmize(tiny("llama"), ACMConfig(distill_steps=5, gate_steps=5), [input_ids], progress=False)
    set_threshold(model, 0.3)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert injection_records(loaded)[0]["config"]["threshold"] == 0.3
    assert torch.equal(_logits(loaded, input_ids), _logits(model, input_ids))


def test_acmize_refuses_token_ids_beyond_the_vocabulary(tiny):
    ids = torch.tensor([[5, 130, 7]])  # the tiny llama has 128 tokens
    with pytest.raises(ValueError, match=r"token ids in \[5, 130\], outside the model's vocabulary \[0, 127\]"):
        acmize(tiny("llama"), ACMConfig(), [ids], progress=False)


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, **kw)


def _mean_logit(outputs, labels, num_items_in_batch=None):
    return outputs.logits.mean()


def test_aux_loss_reaches_a_compute_loss_func_or_is_an_error(input_ids, tmp_path):
    model = _adamoe_mixtral()
    callback = MoEAuxLossCallback()
    callback.on_train_begin(_args(tmp_path, gradient_accumulation_steps=2), None, None, model=model)
    model.train()
    with pytest.raises(ValueError, match="the AdaMoE aux loss would be dropped; pass compute_loss_func=callback.wrap"):
        model(input_ids)  # no labels: Trainer computes the loss outside the model
    loss_func = callback.wrap(_mean_logit)
    outputs = model(input_ids)
    aux = adamoe_aux_loss(model).item()
    assert loss_func(outputs, input_ids).item() == pytest.approx(outputs.logits.mean().item() + aux / 2, rel=1e-6)
    callback.on_train_end(None, None, None)

    # through Trainer: only the aux loss moves the null logits (renormalised weighting)
    model = _adamoe_mixtral()
    before = model.model.layers[0].mlp.gate.null_bias.detach().clone()
    callback = MoEAuxLossCallback()
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": input_ids.tolist()})
    Trainer(model=model, args=_args(tmp_path), train_dataset=data, callbacks=[callback],
            compute_loss_func=callback.wrap(_mean_logit)).train()
    assert not torch.equal(model.model.layers[0].mlp.gate.null_bias, before)


# --------------------------------------------------------------------------- recipes


@pytest.fixture
def recipe_dir(tmp_path):
    return write_recipe_data(tmp_path)


def _recipe(folder: Path, **sections) -> Path:
    (folder / "recipe.yaml").write_text(yaml.safe_dump({**TINY_RUN_RECIPE, **sections}))
    return folder / "recipe.yaml"


@pytest.mark.parametrize(
    "sections,match",
    [
        ({"training": {"max_step": 6}}, r"training: unknown key\(s\) max_step; did you mean max_step -> max_steps"),
        ({"training": {"max_steps": 6, "max_grad_norm": float("nan")}}, r"training.max_grad_norm: nan is not allowed; expected a finite number"),
        ({"optimizer": {"lr": float("nan")}}, r"optimizer.lr: nan is not allowed; expected a finite number"),
        ({"optimizer": {"lr": -1.0}}, r"optimizer: lr: -1.0 is not allowed; expected a number > 0"),
        ({"optimizer": {"betas": [0.9, 1.5]}}, r"betas: \(0.9, 1.5\) is not allowed; expected two numbers in \[0, 1\)"),
        ({"optimizer": {"name": "onebit_adam"}, "training": {}}, "optimizer.freeze_step: give it, or training.max_steps"),
        ({"lisa": {"num_active_layers": 5}}, r"lisa.num_active_layers: 5 is more than the model's 4 layers; expected 1 to 4"),
        ({"output_dir": "tok"}, r"output_dir: output .*tok/model' lies inside the input .*tok'"),
        ({"training": {"max_steps": 6, "learning_rate": 0.1}}, r"training: learning_rate belong in the `optimizer:` section"),
        ({"deepspeed": "zero2", "optimizer": {"weight_decay": 0.01}}, "lisa under ZeRO stage 2 needs optimizer.weight_decay: 0"),
    ],
)
def test_bad_recipes_are_refused_before_any_work(recipe_dir, sections, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(_recipe(recipe_dir, **sections))
    assert not (recipe_dir / "run").exists()


def test_training_values_transformers_rejects_fail_before_any_work(recipe_dir):
    recipe = load_recipe(_recipe(recipe_dir, training={"max_steps": 6, "lr_scheduler_type": "sometimes"}))
    with pytest.raises(ConfigError, match="training: sometimes is not a valid SchedulerType"):
        run_recipe(recipe)
    assert not (recipe_dir / "run").exists()


def test_recipe_output_in_the_input_model_is_refused(recipe_dir):
    tiny_model("llama").save_pretrained(recipe_dir / "base")
    model = {"path": "base", "tokenizer": "tok"}
    with pytest.raises(ConfigError, match="output_dir: output .*model' lies inside the input .*base"):
        load_recipe(_recipe(recipe_dir, model=model, output_dir="base"))


def test_tokenizer_larger_than_the_vocabulary_is_refused_before_the_model(recipe_dir):
    config = {**TINY_RUN_RECIPE["model"]["config"], "vocab_size": 16}
    recipe = load_recipe(_recipe(recipe_dir, model={"config": config, "tokenizer": "tok"}))
    with pytest.raises(ValueError, match=r"model.tokenizer has \d+ tokens, more than the model's vocab_size 16"):
        run_recipe(recipe)
    assert not (recipe_dir / "run").exists()


def test_documented_onebit_deepspeed_recipe_runs_in_one_process(tmp_path):
    """`modular train examples/recipes/adamoe_lisa_onebit.yaml`, single process on CPU (3 steps)."""
    import runpy

    root = Path(__file__).parents[1]
    example = runpy.run_path(str(root / "examples" / "train_recipe.py"))
    folder = tmp_path / "recipes"
    example["prepare"](folder / "data", [f"{TEXT} Sentence number {i}." for i in range(200)], vocab_size=512)
    text = (root / "examples" / "recipes" / "adamoe_lisa_onebit.yaml").read_text()
    recipe = yaml.safe_load(text)
    recipe["training"].update(max_steps=3, save_steps=3)
    recipe["optimizer"]["freeze_step"] = 1
    recipe["output_dir"] = "run"
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "modular.app.cli", "train", str(folder / "recipe.yaml")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [r["kind"] for r in injection_records(load_model(folder / "run" / "model"))] == ["adamoe"]


# --------------------------------------------------------------------------- merging


@pytest.fixture
def models(tmp_path):
    return write_merge_models(tmp_path / "models")


def _merge_config(tmp_path, root, **changes) -> Path:
    config = {"merge_method": "ties", "base_model": str(root / "base"),
              "models": [{"model": str(root / f"ft{s}"), "parameters": {"density": 0.5}} for s in (1, 2)],
              "parameters": {"lambda": 1.0}, **changes}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "out,message",
    [
        ("models", "output '{out}' contains the input '{models}/base'"),
        ("models/ft1", "output '{out}' is the input '{models}/ft1'"),
        ("models/ft1/merged", "output '{out}' lies inside the input '{models}/ft1'"),
        (".", "give a folder name (e.g. ./merged), not '.'"),
    ],
)
def test_merge_out_over_an_input_is_refused_before_any_work(out, message, models, tmp_path, monkeypatch, capsys):
    before = digest(models)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("merging.run.merge", _no_work)  # refused before the merge (or AdaMerging) starts
    monkeypatch.setattr("merging.run.run_adamerging", _no_work)
    config = _merge_config(tmp_path, models)
    assert main(["merge", str(config), "--out", out, "--force", "--no-progress"]) == 2
    assert message.format(out=out, models=models) in capsys.readouterr().err
    assert digest(models) == before


def test_task_vector_out_inside_its_input_is_refused(models, capsys):
    args = ["task-vector", "extract", "--base", str(models / "base"), "--finetuned", str(models / "ft1"), "--out"]
    assert main([*args, str(models / "ft1" / "tv")]) == 2
    assert "lies inside the input" in capsys.readouterr().err and not (models / "ft1" / "tv").exists()


def test_adamerging_output_over_an_input_is_refused_before_learning(models, monkeypatch):
    from merging.adamerging import AdaMergingConfig, adamerge_folders

    monkeypatch.setattr("modular.load_model", _no_work)
    with pytest.raises(ValueError, match="lies inside the input"):
        adamerge_folders(models / "base", {"a": models / "ft1"}, [], AdaMergingConfig(), out=models / "ft1" / "merged")


def _no_work(*args, **kwargs):
    raise AssertionError("the merge started")


def test_bad_tokenizer_source_is_reported_before_the_merge(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("merging.engine.write_model_folder", _no_work)
    missing = str(tmp_path / "no-tokenizer")
    for key, changes in (("tokenizer_source", {"tokenizer_source": missing}), ("tokenizer.source", {"tokenizer": {"source": missing}})):
        config = _merge_config(tmp_path, models, **changes)
        assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 2
        assert f"{key}: {missing!r} is not a folder" in capsys.readouterr().err
    from merging import merge

    with pytest.raises(FileNotFoundError, match=f"tokenizer_source: {missing!r} is not a folder"):
        merge("task_arithmetic", models / "base", [models / "ft1"], out=tmp_path / "out", tokenizer_source=missing)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "parameters,message",
    [
        ({"lambda": float("nan")}, "parameters.lambda: nan is not allowed for 'lambda'; expected a finite number"),
        ({"density": 1.5}, "parameters.density: 1.5 is not allowed for 'density'; expected a number in (0, 1]"),
        ({"density": -1}, "parameters.density: -1 is not allowed for 'density'; expected a number in (0, 1]"),
        ({"density": 0}, "parameters.density: 0 is not allowed for 'density'; expected a number in (0, 1]"),
        ({"density": "half"}, "parameters.density: 'half' is not allowed for 'density'; expected a number in (0, 1]"),
        ({"density": [1, 0.7, 1.5]}, "parameters.density: 1.5 is not allowed for 'density'; expected a number in (0, 1]"),
    ],
)
def test_merge_parameters_out_of_range_are_refused(parameters, message, models, tmp_path, capsys):
    config = _merge_config(tmp_path, models, parameters=parameters, models=[{"model": str(models / f"ft{s}")} for s in (1, 2)])
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_nan_in_the_base_model_is_blamed_on_the_base(models, tmp_path, capsys):
    _edit_tensors(models / "base", lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    tv = TaskVector.from_models(models / "base", models / "ft1")
    with pytest.raises(ValueError, match=r"base model .*base: tensor 'model.norm.weight' contains NaN or inf"):
        tv.get("model.norm.weight")
    with pytest.raises(ValueError, match="scale nan is not allowed; expected a finite number"):
        tv * float("nan")
    assert main(["merge", str(_merge_config(tmp_path, models)), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "base model" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_stale_temporaries_are_removed_old_ones_reported_live_ones_kept(tmp_path):
    dead = tmp_path / f".out.tmp-{_gone_pid()}-{_host()}-abcd1234"  # its process is gone
    live = tmp_path / f".out.tmp-{os.getpid()}-{_host()}-abcd1234"
    old = tmp_path / ".out.tmp-abcd1234"  # the pid-less name of older versions: owner unknown
    for folder in (dead, live, old):
        folder.mkdir()
    with pytest.warns(UserWarning) as caught:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
    messages = " ".join(str(w.message) for w in caught)
    assert f"removed 1 temporary output(s) of killed runs beside {tmp_path / 'out'}: {dead.name}" in messages
    assert ".out.tmp-abcd1234: a temporary output of an interrupted run" in messages
    assert not dead.exists() and live.is_dir() and old.is_dir() and (tmp_path / "out" / "x").is_file()


def test_replacing_an_output_swaps_the_folders_in_one_step(tmp_path, monkeypatch):
    """`--force` over an existing output: the old folder is exchanged with the new one, never moved
    away first (a kill between two renames would leave neither in place)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")

    def two_step(*args):
        raise AssertionError("moved the old output away first")

    monkeypatch.setattr("modular.checkpoint.os.replace", two_step)
    with atomic_output_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _gone_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_sigterm_is_turned_into_the_interrupt_path(monkeypatch, capsys):
    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr("modular.app.doctor.run", terminated)
    assert main(["doctor"]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before

"""`modular train`: a whole recipe on a tiny model, and resume after SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from finetune.launch import free_port
from modular import load_model
from modular.app.corpora import train_tokenizer
from modular.app.recipe import load_recipe
from modular.app.train import run_recipe
from modular.surgery import injection_records
from modular.testing import tiny_model
from tests.tiny_inputs import TEXT, write_recipe_data


@pytest.fixture
def recipe_dir(tmp_path):
    return write_recipe_data(tmp_path)


TINY_RUN_RECIPE = {
    "model": {
        "config": {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        "tokenizer": "tok",
    },
    "injections": [{"upcycle": {"num_experts": 4, "top_k": 2, "noise_std": 0.01}},
                   {"adamoe": {"num_null_experts": 2, "top_k": 3}}],
    "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 32},
    "lisa": {"num_active_layers": 1, "interval_steps": 2},
    "optimizer": {"name": "adamw", "lr": 1e-3},
    "training": {"max_steps": 6, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 3},
    "output_dir": "run",
}


def test_recipe_runs_inject_lisa_and_saves_a_loadable_model(recipe_dir, write_recipe):
    final = run_recipe(load_recipe(write_recipe(recipe_dir, TINY_RUN_RECIPE)))
    metrics = json.loads((recipe_dir / "run" / "metrics.json").read_text())
    assert [r["kind"] for r in injection_records(load_model(final))] == ["adamoe"]
    assert len(metrics["lisa_schedule"]["periods"]) == 3  # 6 steps, K=2
    assert len(metrics["routing_stats"]) == 4 and 0 < metrics["mean_experts_per_token"] <= 3
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert (recipe_dir / "run" / "loss.png").stat().st_size > 0


def test_sigterm_then_rerun_resumes_from_the_last_checkpoint(recipe_dir, write_recipe):
    path = write_recipe(
        recipe_dir, TINY_RUN_RECIPE, injections=[], lisa=None,
        training={"max_steps": 400, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 2},
    )
    command = [sys.executable, "-m", "modular.app.train", str(path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = recipe_dir / "run"
    deadline = time.time() + 240
    while not (run / "checkpoint-2").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "stopped on request" in out
    stopped_at = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert 2 <= stopped_at < 400
    kept = sorted(p.name for p in run.glob("checkpoint-*"))

    path.write_text(path.read_text().replace("max_steps: 400", f"max_steps: {stopped_at + 2}"))
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming from {run / f'checkpoint-{stopped_at}'}" in rerun.stdout
    assert set(kept) <= {p.name for p in run.glob("checkpoint-*")}  # nothing written before is lost
    state = json.loads((run / f"checkpoint-{stopped_at + 2}" / "trainer_state.json").read_text())
    assert state["global_step"] == stopped_at + 2


@pytest.mark.distributed
def test_whole_stack_under_the_deepspeed_launcher(recipe_dir, write_recipe):
    """upcycle → AdaMoE → LISA → OneBitAdam, ZeRO-0, two gloo processes started by `deepspeed`."""
    path = write_recipe(
        recipe_dir, TINY_RUN_RECIPE,
        optimizer={"name": "onebit_adam", "lr": 1e-3, "freeze_step": 2},
        deepspeed="onebit_zero0",
        training={"max_steps": 4, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 4},
    )
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    proc = subprocess.run(
        [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "modular.app.train", str(path)],
        capture_output=True, text=True, timeout=600, cwd=recipe_dir,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((recipe_dir / "run" / "metrics.json").read_text())
    assert metrics["log_history"][-1]["step"] == 4
    assert [r["kind"] for r in injection_records(load_model(recipe_dir / "run" / "model"))] == ["adamoe"]



def test_prompt_completion_rows_learn_the_completion_only(recipe_dir, write_recipe):
    from modular.app.train_data import prompt_completion_rows

    tokenizer = train_tokenizer([TEXT])
    data = load_recipe(write_recipe(recipe_dir, TINY_RUN_RECIPE, data={"train": "train.jsonl", "prompt_field": "q", "completion_field": "a", "max_length": 12})).data
    rows = prompt_completion_rows({"q": ["experts route", "a b c d e f g h i j k l m n"], "a": [" tokens", " x"]}, data, tokenizer)
    prompt = tokenizer("experts route", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" tokens", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rows["input_ids"][0] == prompt + answer
    assert rows["labels"][0] == [-100] * len(prompt) + answer
    # too long: the prompt loses its beginning, the completion (+ eos) is kept whole
    long_prompt = tokenizer("a b c d e f g h i j k l m n", add_special_tokens=False)["input_ids"]
    x = tokenizer(" x", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rows["input_ids"][1] == long_prompt[-(12 - len(x)):] + x and len(rows["input_ids"][1]) == 12
    assert rows["labels"][1] == [-100] * (12 - len(x)) + x


def test_sequence_classification_on_an_injected_backbone(recipe_dir, write_recipe):
    """A fresh head on a saved BERT with experts + AdaMoE: probe-fitted, trained, scored, AdaMoE aux loss on."""
    from moe import AdaMoEConfig, FFNExpertsConfig, inject_adamoe, inject_ffn_experts

    tokenizer = train_tokenizer([TEXT], vocab_size=100)
    backbone = tiny_model("bert", vocab_size=len(tokenizer))
    ids = tokenizer([TEXT], return_tensors="pt")["input_ids"][:, :24]
    inject_ffn_experts(backbone, FFNExpertsConfig(num_experts=4, top_k=2, layers=[1]), [{"input_ids": ids}])
    inject_adamoe(backbone, AdaMoEConfig(num_null_experts=2, top_k=2))
    backbone.save_pretrained(recipe_dir / "base")
    tokenizer.save_pretrained(recipe_dir / "base")
    words = ["experts", "tokens", "layers"]
    rows = [{"text": f"{w} {TEXT[:30]} {i}", "label": k} for i in range(12) for k, w in enumerate(words)]
    (recipe_dir / "cls_train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:30]))
    (recipe_dir / "cls_eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[30:]))
    path = write_recipe(recipe_dir, {
        "model": {"path": "base", "task": "sequence_classification", "num_labels": 3},
        "data": {"train": "cls_train.jsonl", "eval": "cls_eval.jsonl", "label_field": "label", "max_length": 16},
        "lisa": {"num_active_layers": 1, "interval_steps": 2},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no"},
        "output_dir": "cls",
    })
    final = run_recipe(load_recipe(path))
    metrics = json.loads((recipe_dir / "cls" / "metrics.json").read_text())
    model = load_model(final)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 3
    assert [r["kind"] for r in injection_records(model)] == ["ffn_experts", "adamoe"]
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["head_probe"]["l2"] in (1e-4, 1e-3, 1e-2, 1e-1)
    assert any("moe_aux_loss" in h for h in metrics["log_history"])  # the saved base's AdaMoE routers are balanced too
    (recipe_dir / "bad.jsonl").write_text(json.dumps({"text": "x", "label": 3}))
    bad = write_recipe(recipe_dir, {**yaml.safe_load(path.read_text()), "data": {"train": "bad.jsonl", "label_field": "label"}})
    with pytest.raises(ValueError, match=r"field 'label' holds 3; expected class indices 0..2"):
        run_recipe(load_recipe(bad))

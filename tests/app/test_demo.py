"""`modular demo` end to end on tiny configurations (both tracks), a SIGKILL and re-run, and
`modular report` on its outputs."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from modular import load_model
from modular.app.cli import main
from modular.app.corpora import train_tokenizer
from modular.checkpoint import TMP_MARK
from modular.testing import tiny_model

FRUITS = {"apple": "red", "cherry": "red", "banana": "yellow", "lemon": "yellow", "lime": "green", "kiwi": "green"}
SHAPES = {"ball": "round", "coin": "round", "box": "square", "tile": "square", "pyramid": "pointed", "needle": "pointed"}
TASKS = {"fruit": FRUITS, "shape": SHAPES}
FILLERS = ["here", "there", "today", "now", "again", "too"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _examples(mapping, n, rng):
    classes = sorted(set(mapping.values()))
    for _ in range(n):
        word = rng.choice(list(mapping))
        yield f"the {word} is {rng.choice(FILLERS)}", classes.index(mapping[word])


def _encoder_data(out):
    """What stage 1 writes (it reads GCIDE), for two tiny tasks; and a tiny BERT with its tokenizer."""
    data = out / "data"
    data.mkdir(parents=True)
    rng = random.Random(0)
    texts = []
    for name, mapping in TASKS.items():
        for split, n in (("train", 48), ("validation", 16), ("test", 16)):
            rows = [{"text": t, "label": y} for t, y in _examples(mapping, n, rng)]
            _write_jsonl(data / f"{name}_{split}.jsonl", rows)
            texts += [r["text"] for r in rows]
            if split == "validation":
                _write_jsonl(data / f"{name}_unlabelled.jsonl", ({"text": r["text"]} for r in rows))
        (data / f"{name}_classes.json").write_text(json.dumps(sorted(set(mapping.values()))))
    _write_jsonl(data / "calibration.jsonl", ({"text": t} for t in texts[:32]))
    (data / "done").write_text("")
    tokenizer = train_tokenizer(texts, vocab_size=100)
    model = tiny_model("bert", vocab_size=len(tokenizer))
    model.save_pretrained(out / "tinybert")
    tokenizer.save_pretrained(out / "tinybert")


ENCODER_CONFIG = {
    "tasks": ["fruit", "shape"], "max_length": 16,
    "experts": {"num_experts": 4, "top_k": 2, "layers": [1]},
    "acm": {"num_learners": 4, "distill_steps": 2, "gate_steps": 2},
    "adamoe": {"num_null_experts": 4, "top_k": 2},
    "finetune_steps": 4, "per_device_batch_size": 4, "lisa": {"num_active_layers": 1, "interval_steps": 2},
    "lambda_grid": [0.5, 1.0], "adamerging": {"steps": 2, "batch_size": 8},
}


def _config(out, **extra):
    path = out / "demo.yaml"
    path.write_text(yaml.safe_dump({**ENCODER_CONFIG, "base_model": str(out / "tinybert"), **extra}))
    return path


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    _encoder_data(out)
    assert main(["demo", "--out", str(out), "--config", str(_config(out))]) == 0
    return out


def _table(out):
    return json.loads((out / "evaluation.json").read_text())["models"]


@pytest.mark.distributed
def test_encoder_demo_writes_every_stage_and_the_report(encoder_run):
    out = encoder_run
    evaluation = json.loads((out / "evaluation.json").read_text())
    models = evaluation["models"]
    assert list(models) == ["base (injected)", "task model: fruit", "task model: shape", "task arithmetic", "TIES",
                            "AdaMerging (task-wise)", "AdaMerging (layer-wise)"]
    base = load_model(out / "base")
    assert [r["kind"] for r in base.config.modular_injections] == ["ffn_experts", "acm", "adamoe"]
    for label, row in models.items():
        assert set(row["accuracy"]) == {"fruit", "shape"} and all(0 <= a <= 1 for a in row["accuracy"].values())
        assert row["average"] == pytest.approx(sum(row["accuracy"].values()) / 2)
        own = {t: models[f"task model: {t}"]["accuracy"][t] for t in ("fruit", "shape")}
        assert row["normalized"] == pytest.approx({t: row["accuracy"][t] / own[t] for t in own})
        # layer 0: an ACM (up to all its learners + a gate), layer 1: 2 of 4 experts + the router
        assert 0 < row["compute_fraction"] < 1.1 and sum(row["acm_histogram"]) > 0, label
        assert row["true_experts_per_token"] <= 2
    for task in ("fruit", "shape"):
        metrics = json.loads((out / "runs" / task / "metrics.json").read_text())
        assert metrics["onebit_adam_comm"]["bytes_sent"]["fp32"] > 0 and metrics["head_probe"]["l2"] > 0
        assert "eval_accuracy" in metrics and metrics["lisa_schedule"]["periods"]
    grids = evaluation["lambda_grids"]
    assert set(grids) == {"task_arithmetic", "ties"} and all(len(g) == 2 for g in grids.values())
    for granularity in ("task", "layer"):
        coefficients = json.loads((out / "merges" / f"adamerging_{granularity}" / "adamerging_coefficients.json").read_text())
        assert coefficients["tasks"] == ["runs/fruit/model", "runs/shape/model"] and coefficients["granularity"] == granularity
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 7  # accuracy, ACM histogram, losses, routing, LISA, 2 × λ heat maps
    assert "bytes on the wire" in page and "chosen on the validation split" in page
    assert f"{models['TIES']['average']:.3f}" in page


@pytest.mark.distributed
def test_the_merge_yaml_files_rerun_by_hand(encoder_run, tmp_path, monkeypatch):
    config = yaml.safe_load((encoder_run / "merges" / "ties.yaml").read_text())
    chosen = max(sorted(map(float, json.loads((encoder_run / "merges" / "ties_lambda_grid.json").read_text()))),
                 key=lambda lam: json.loads((encoder_run / "merges" / "ties_lambda_grid.json").read_text())[str(lam)])
    assert config["parameters"]["lambda"] == chosen
    monkeypatch.chdir(encoder_run)
    assert main(["merge", "merges/ties.yaml", "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    again, first = load_model(tmp_path / "again").state_dict(), load_model(encoder_run / "merges" / "ties").state_dict()
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


@pytest.mark.distributed
def test_sigkill_during_finetuning_then_rerun_gives_the_same_table(encoder_run, tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    for name in ("data", "tinybert", "base"):
        shutil.copytree(encoder_run / name, out / name)
    shutil.copytree(encoder_run / "runs" / "fruit", out / "runs" / "fruit")
    config = str(_config(out))
    command = [sys.executable, "-m", "modular.app.cli", "demo", "--out", str(out), "--config", config]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pgid = out / "runs" / "launcher.pgid"
    deadline = time.time() + 300
    while not pgid.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(10)  # the ranks are loading or training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "runs" / "shape" / "done").exists()
    orphans = int(pgid.read_text())
    assert main(["demo", "--out", str(out), "--config", config]) == 0
    with pytest.raises(ProcessLookupError):  # the killed run's launcher and ranks were stopped
        os.killpg(orphans, 0)
    assert _table(out) == _table(encoder_run)


# Run in a child process: SIGKILL itself while writing the output named KILL_WRITING (a folder:
# once its content is complete, before the rename; a file: half-written), the worst moment to die.
KILL_WHILE_WRITING = """
import os, signal, sys
from modular import checkpoint
from modular.app.cli import main

target = os.environ["KILL_WRITING"]
temporary_sibling, apply_umask = checkpoint._temporary_sibling, checkpoint._apply_umask

def sibling(out, *, folder):
    tmp = temporary_sibling(out, folder=folder)
    if out.name == target and not folder:
        tmp.write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    return tmp

def umask(tmp):
    apply_umask(tmp)
    if tmp.name.startswith(f".{target}{checkpoint.TMP_MARK}"):
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint._temporary_sibling, checkpoint._apply_umask = sibling, umask
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.distributed
@pytest.mark.parametrize("target", ["base", "task_arithmetic_lambda_grid.json", "adamerging_layer", "evaluation.json",
                                    "report.html"])
def test_sigkill_while_writing_any_stage_output_then_rerun_gives_the_same_table(encoder_run, tmp_path, target):
    """Stages 2 (inject), 4 (merge: a λ grid, the last merge) and 5 (evaluation, report); stage 3 above."""
    out = tmp_path / "killed"
    out.mkdir()
    for name in ("data", "tinybert", "runs") + (() if target == "base" else ("base",)):
        shutil.copytree(encoder_run / name, out / name)
    config = str(_config(out))
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING, "demo", "--out", str(out), "--config", config],
                            env={**os.environ, "KILL_WRITING": target}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = [p for p in out.rglob("*") if TMP_MARK in p.name]
    assert left and not (out / target / "config.json").exists() and not (out / target).is_file()
    assert main(["demo", "--out", str(out), "--config", config]) == 0
    assert _table(out) == _table(encoder_run)
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name]  # the killed run's temporaries were removed
    if target == "base":  # rebuilt bit for bit (the task models were trained on the first one)
        again, first = load_model(out / "base").state_dict(), load_model(encoder_run / "base").state_dict()
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


@pytest.mark.distributed
def test_rerun_skips_finished_stages(encoder_run, capsys):
    outputs = [encoder_run / "merges" / "adamerging_task" / "config.json", encoder_run / "evaluation.json",
               encoder_run / "timings.json"]
    before = [p.stat().st_mtime_ns for p in outputs]
    assert main(["demo", "--out", str(encoder_run), "--config", str(encoder_run / "demo.yaml")]) == 0
    assert [p.stat().st_mtime_ns for p in outputs] == before
    printed = capsys.readouterr().out
    assert "this run is finished" in printed and "report:" in printed and "=== " not in printed


@pytest.mark.distributed
def test_report_command_renders_chosen_runs(encoder_run, tmp_path):
    target = tmp_path / "r.html"
    assert main(["report", str(encoder_run / "runs"), "--out", str(target)]) == 0
    page = target.read_text()
    assert "fruit" in page and page.count("data:image/png;base64,") == 3  # losses, routing, LISA
    assert main(["report", str(encoder_run / "runs"), "--out", str(target)]) == 2  # exists, no --force


@pytest.mark.distributed
def test_causal_track(tmp_path):
    """``track: causal`` (examples/demo/causal.yaml) on a prepared tiny data folder (stage 1 reads GCIDE)."""
    out = tmp_path / "causal"
    data = out / "data"
    data.mkdir(parents=True)
    rng = random.Random(0)
    text = [f"the {w} is {c} and the {s} is {f}" for w, c in FRUITS.items() for s, f in SHAPES.items()] * 4
    _write_jsonl(data / "pretrain_train.jsonl", ({"text": t} for t in text))
    _write_jsonl(data / "pretrain_eval.jsonl", ({"text": t} for t in text[:24]))
    words = []
    for name, mapping in TASKS.items():
        classes = sorted(set(mapping.values()))
        words += classes
        for split, n in (("train", 32), ("validation", 12), ("test", 12)):
            _write_jsonl(data / f"{name}_{split}.jsonl", ({"prompt": f"{t} {name}:", "completion": f" {classes[y]}", "label": y}
                                                          for t, y in _examples(mapping, n, rng)))
        (data / f"{name}_classes.json").write_text(json.dumps(classes))
    train_tokenizer(text + words * 5, vocab_size=200).save_pretrained(data / "tokenizer")
    (data / "done").write_text("")
    settings = yaml.safe_load((Path(__file__).parents[2] / "examples" / "demo" / "causal.yaml").read_text())
    settings.update(tasks=["fruit", "shape"], finetune_steps=4, lisa={"num_active_layers": 1, "interval_steps": 2},
                    lambda_grid=[0.5, 1.0], adamerging={"steps": 2})
    settings["causal"].update(pretrain_steps=2, model={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                                        "max_position_embeddings": 128})
    (out / "demo.yaml").write_text(yaml.safe_dump(settings))
    assert main(["demo", "--out", str(out), "--config", str(out / "demo.yaml")]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["track"] == "causal"
    models = evaluation["models"]
    assert list(models)[3:] == ["task arithmetic", "TIES", "AdaMerging (task-wise)", "AdaMerging (layer-wise)"]
    base = models["base (upcycled, AdaMoE)"]["accuracy"]
    for row in models.values():
        for t in ("fruit", "shape"):
            own = models[f"task model: {t}"]["accuracy"][t]
            if own != base[t]:
                assert row["recovered"][t] == pytest.approx((row["accuracy"][t] - base[t]) / (own - base[t]))
    assert (out / "merges" / "task_arithmetic.yaml").is_file() and (out / "report.html").is_file()


def test_report_refuses_paths_without_run_outputs(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 2
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("bad,match", [({"tasks": ["pos"]}, "at least 2 tasks"), ({"track": "vision"}, "'vision' is not allowed"),
                                       ({"adamerging_granularities": ["model"]}, r"\['model'\] not allowed"),
                                       ({"finetune_steps": 0}, "finetune_steps must be >= 1")])
def test_demo_config_is_checked_before_work(bad, match, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["demo", "--out", str(tmp_path / "o"), "--config", str(path)]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_report_labels_layers_of_each_family_and_shortens_task_paths():
    from modular.app.report import _layer_of, _short_names

    assert [_layer_of(n) for n in ("encoder.layer.3.output.dense.weight", "model.layers.12.mlp.up_proj.weight",
                                   "transformer.h.0.attn.c_attn.weight", "embeddings.word_embeddings.weight",
                                   "pooler.dense.weight")] == ["layer 03", "layer 12", "layer 00", "embeddings", "head / norm"]
    assert _short_names(["runs/pos/model", "runs/domain/model"]) == ["pos", "domain"]
    assert _short_names(["./ft-a", "./ft-b"]) == ["ft-a", "ft-b"] and _short_names(["a"]) == ["a"]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_lambda_grid_scales_one_merge_to_what_merge_writes_bit_for_bit(encoder_run, method):
    from merging import TaskVector, merge
    from modular.app.demo import backbone_state, merged_direction, state_at_lambda

    tvs = [TaskVector.from_models(encoder_run / "base", encoder_run / "runs" / t / "model", label=t) for t in TASKS]
    base = backbone_state(encoder_run / "base")
    direction = merged_direction(method, base, tvs)
    for lam in (0.3, 0.5, 1.0):
        written = merge(method, encoder_run / "base", tvs, lambda_=lam, progress=False)
        scaled = state_at_lambda(base, direction, lam)
        assert written.keys() == scaled.keys()
        assert all(torch.equal(written[n].view(torch.int32), scaled[n].view(torch.int32)) for n in written
                   if written[n].dtype == torch.float32)
        assert all(torch.equal(written[n], scaled[n]) for n in written if not written[n].is_floating_point())

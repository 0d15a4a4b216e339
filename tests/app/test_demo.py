"""`modular demo` end to end on a tiny configuration, and `modular report` on its outputs."""

import json
import random

import pytest
import yaml

from modular.app.cli import main
from modular.app.corpora import train_tokenizer

FRUITS = {"apple": "red", "banana": "yellow", "lime": "green"}
SHAPES = {"ball": "round", "box": "square", "pyramid": "pointed"}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _task_rows(mapping, cue, n, rng):
    words, classes = list(mapping), sorted(set(mapping.values()))
    for _ in range(n):
        word = rng.choice(words)
        yield {"prompt": f"the {word} is {cue}", "completion": f" {mapping[word]}", "label": classes.index(mapping[word])}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Runs stages 2-6 of the demo on a prepared tiny data folder (stage 1 needs GCIDE)."""
    out = tmp_path_factory.mktemp("demo")
    data = out / "data"
    data.mkdir()
    rng = random.Random(0)
    text = [f"the {w} is {c} and the {s} is {f}" for w, c in FRUITS.items() for s, f in SHAPES.items()] * 8
    _write_jsonl(data / "pretrain_train.jsonl", ({"text": t} for t in text))
    _write_jsonl(data / "pretrain_eval.jsonl", ({"text": t} for t in text[:24]))
    for name, mapping, cue in (("fruit", FRUITS, "colour"), ("shape", SHAPES, "form")):
        _write_jsonl(data / f"{name}_train.jsonl", _task_rows(mapping, cue, 32, rng))
        _write_jsonl(data / f"{name}_test.jsonl", _task_rows(mapping, cue, 12, rng))
        (data / f"{name}_classes.json").write_text(json.dumps(sorted(set(mapping.values()))))
    train_tokenizer(text + list(FRUITS.values()) * 5 + list(SHAPES.values()) * 5, vocab_size=200).save_pretrained(data / "tokenizer")
    (data / "done").write_text("")
    config = {
        "tasks": ["fruit", "shape"],
        "model": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128},
        "pretrain_steps": 2, "finetune_steps": 4, "lisa": {"num_active_layers": 1, "interval_steps": 2},
        "adamerging": {"steps": 2, "lr": 0.01},
    }
    (out / "demo.yaml").write_text(yaml.safe_dump(config))
    assert main(["demo", "--out", str(out), "--config", str(out / "demo.yaml")]) == 0
    return out


@pytest.mark.distributed
def test_demo_writes_every_stage_and_the_report(demo_run, capsys):
    out = demo_run
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert list(evaluation["models"]) == ["base (AdaMoE injected)", "task model: fruit", "task model: shape", "task arithmetic",
                                          "AdaMerging (task-wise)", "AdaMerging (layer-wise)"]
    for row in evaluation["models"].values():
        assert set(row["accuracy"]) == {"fruit", "shape"} and all(0 <= a <= 1 for a in row["accuracy"].values())
        assert row["average"] == pytest.approx(sum(row["accuracy"].values()) / 2)
        assert 0 < row["mean_experts_per_token"] <= 3  # AdaMoE top-3 over true + null experts
    for task in ("fruit", "shape"):
        metrics = json.loads((out / "runs" / task / "metrics.json").read_text())
        assert metrics["log_history"][-2]["step"] == 4 and metrics["routing_stats"] and metrics["lisa_schedule"]["periods"]
    for granularity in ("task", "layer"):
        coefficients = json.loads((out / "merges" / f"adamerging-{granularity}" / "adamerging_coefficients.json").read_text())
        assert coefficients["tasks"] == ["fruit", "shape"] and len(coefficients["entropy"]) == 2
        assert coefficients["granularity"] == granularity
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6  # accuracy, losses, routing, LISA, 2 × coefficients
    assert f"{evaluation['models']['AdaMerging (task-wise)']['average']:.3f}" in page


@pytest.mark.distributed
def test_rerun_skips_finished_stages(demo_run, capsys):
    before = (out := demo_run) and (out / "merges" / "adamerging-task" / "config.json").stat().st_mtime
    assert main(["demo", "--out", str(out), "--config", str(out / "demo.yaml")]) == 0
    assert (out / "merges" / "adamerging-task" / "config.json").stat().st_mtime == before
    assert "report:" in capsys.readouterr().out


@pytest.mark.distributed
def test_report_command_renders_chosen_runs(demo_run, tmp_path):
    target = tmp_path / "r.html"
    assert main(["report", str(demo_run / "runs"), "--out", str(target)]) == 0
    page = target.read_text()
    assert "fruit" in page and page.count("data:image/png;base64,") == 3  # losses, routing, LISA
    assert main(["report", str(demo_run / "runs"), "--out", str(target)]) == 2  # exists, no --force


def test_report_refuses_paths_without_run_outputs(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 2
    assert not (tmp_path / "r.html").exists()

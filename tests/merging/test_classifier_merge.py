"""Classifiers fine-tuned from a saved backbone: merged as that backbone (heads never merged), from
Python and from `modular merge` YAML, AdaMerging with each task model's own head."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from merging import TaskVector, merge
from merging.adamerging_yaml import head_logits, read_unlabelled
from merging.sources import as_source, backbone_view
from modular import load_model
from modular.app.cli import main
from modular.app.corpora import train_tokenizer
from modular.testing import tiny_model

from .conftest import perturbed

TEXTS = ["a red apple", "a yellow lemon", "a green lime", "the round ball", "the square box", "a pointed needle"]


@pytest.fixture(scope="module")
def classifier_folders(tmp_path_factory):
    """A tiny BERT backbone (with its tokenizer) and two classifiers fine-tuned from it (3 and 2 classes)."""
    root = tmp_path_factory.mktemp("classifiers")
    tokenizer = train_tokenizer(TEXTS, vocab_size=60)
    backbone = tiny_model("bert", vocab_size=len(tokenizer))
    backbone.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for i, labels in enumerate((3, 2)):
        model = load_model(root / "base", model_class=AutoModelForSequenceClassification, num_labels=labels)
        perturbed(model, seed=10 + i).save_pretrained(root / f"task{i}")
    return root


def test_backbone_view_reads_a_classifier_under_the_backbone_names(classifier_folders):
    base = as_source(classifier_folders / "base")
    view = backbone_view(base, as_source(classifier_folders / "task0"))
    assert view.names() == base.names()
    name = base.names()[0]
    assert torch.equal(view.get(name), as_source(classifier_folders / "task0").get("bert." + name))
    other = as_source(tiny_model("llama"))  # not this backbone with a head: left as it is
    assert backbone_view(base, other) is other


def test_task_vectors_and_static_merges_of_classifiers(classifier_folders, tmp_path):
    base, fts = classifier_folders / "base", [classifier_folders / "task0", classifier_folders / "task1"]
    tvs = [TaskVector.from_models(base, f) for f in fts]
    classifier = load_model(fts[0])
    name = "encoder.layer.0.attention.self.query.weight"
    assert "classifier.weight" not in tvs[0] and set(tvs[0].names()) == set(as_source(base).names())
    assert torch.equal(tvs[0].get(name), classifier.bert.state_dict()[name] - load_model(base).state_dict()[name])
    config = tmp_path / "ta.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"lambda": 0.4},
                                      "models": [{"model": str(f)} for f in fts]}))
    assert main(["merge", str(config), "--out", str(tmp_path / "ta"), "--no-progress"]) == 0
    merged = load_model(tmp_path / "ta")
    assert type(merged).__name__ == "BertModel"  # the backbone; heads stay with the task models
    expected = merge("task_arithmetic", base, tvs, lambda_=0.4, progress=False)
    assert all(torch.equal(t, expected[n]) for n, t in merged.state_dict().items() if n in expected)


def test_head_logits_put_a_task_models_head_on_other_backbone_outputs(classifier_folders):
    task_model = load_model(classifier_folders / "task0").eval()
    expected_model = load_model(classifier_folders / "task0").eval()
    backbone = load_model(classifier_folders / "base").eval()
    batch = {"input_ids": torch.tensor([[5, 7, 9, 11]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    logits = head_logits(task_model)
    with torch.no_grad():
        got = logits(backbone(**batch), batch)
        by_hand = expected_model.classifier(backbone(**batch).pooler_output)  # BERT: pooler -> (dropout) -> classifier
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert not any(p.requires_grad for p in task_model.parameters())


def test_adamerging_yaml_on_classifiers(classifier_folders, tmp_path):
    data = []
    for i in range(2):
        path = tmp_path / f"task{i}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
        data.append(path)
    config = tmp_path / "ada.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "adamerging", "base_model": str(classifier_folders / "base"),
        "models": [{"model": str(classifier_folders / f"task{i}"), "data": str(data[i])} for i in range(2)],
        "adamerging": {"granularity": "task", "steps": 3, "batch_size": 4},
    }))
    assert main(["merge", str(config), "--out", str(tmp_path / "ada"), "--no-progress"]) == 0
    coefficients = json.loads((tmp_path / "ada" / "adamerging_coefficients.json").read_text())
    assert len(coefficients["entropy"]) == 3 and len(coefficients["coefficients"][0]) == 2
    merged = load_model(tmp_path / "ada")
    assert type(merged).__name__ == "BertModel"


def test_unlabelled_inputs_are_read_and_checked(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    assert read_unlabelled(tmp_path / "a.txt", "data") == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"text": "y", "label": 1}\n')
    assert read_unlabelled(tmp_path / "b.jsonl", "data") == ["x", "y"]
    (tmp_path / "c.jsonl").write_text('{"sentence": "x"}\n')
    with pytest.raises(ValueError, match="line 1 has no string field 'text'"):
        read_unlabelled(tmp_path / "c.jsonl", "models[m].data")
    (tmp_path / "d.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_unlabelled(tmp_path / "d.jsonl", "data")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_unlabelled(tmp_path / "missing.txt", "data")
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(ValueError, match="has no inputs"):
        read_unlabelled(tmp_path / "e.txt", "data")

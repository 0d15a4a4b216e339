"""finetune.heads: the classification head found in any family, and the linear probe fitted on the
frozen model (optimality checked by its gradient, L2 chosen on validation; forwards shared by ranks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from finetune.heads import L2_GRID, classification_head, fit_linear_probe, head_features
from finetune.launch import free_port
from modular.testing import tiny_config


def _classifier(model_type, labels=3):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=labels)).eval()


def _batches(seed, n=4):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (8, 6), generator=generator)
        labels = ids[:, 1] % 3  # the class is written in the second token
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def test_head_of_each_family():
    bert = _classifier("bert")
    assert classification_head(bert) is bert.classifier
    llama = _classifier("llama")
    assert classification_head(llama) is llama.score and llama.score.bias is None


def test_probe_is_the_penalised_logistic_regression_and_l2_is_chosen_on_validation():
    model = _classifier("bert")
    train, validation = _batches(0), _batches(1)
    chosen = fit_linear_probe(model, train, validation)
    scores = chosen["validation_accuracy"]
    assert set(scores) == set(L2_GRID)
    assert chosen["l2"] == max(sorted(scores, reverse=True), key=scores.get)
    x, y = head_features(model, train)
    head = model.classifier
    weight = head.weight.detach().clone().requires_grad_()
    bias = head.bias.detach().clone().requires_grad_()
    loss = F.cross_entropy(x @ weight.T + bias, y) + chosen["l2"] / 2 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-3 and bias.grad.abs().max() < 1e-3  # a minimum of the objective
    assert chosen["train_accuracy"] == ((x @ head.weight.T + head.bias).argmax(-1) == y).float().mean().item()


def test_probe_without_validation_or_bias():
    model = _classifier("llama")
    chosen = fit_linear_probe(model, _batches(0))
    assert chosen["l2"] == sorted(L2_GRID)[len(L2_GRID) // 2] and chosen["validation_accuracy"] == {}
    assert model.score.bias is None and model.score.weight.abs().sum() > 0


@pytest.mark.distributed
def test_forwards_shared_by_two_ranks_give_what_one_process_computes(tmp_path):
    out = tmp_path / "out.json"
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run([*launcher, str(Path(__file__).parent / "scripts" / "probe_split_check.py"), str(out)], cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == {"[8, 8, 8, 8, 5]": True, "[8, 3]": True, "[7]": True, "same_probe": True, "ranks_agree": True,
                      "forwards per rank [8, 8, 8, 8, 5]": [3, 2], "forwards per rank [8, 3]": [1, 1], "forwards per rank [7]": [1, 0]}

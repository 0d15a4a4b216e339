"""AdaMerging on loaded models: families whose checkpoint names differ from their parameter names."""

import json

import pytest
import torch
import yaml

from merging import AdaMergingConfig, AdaMergingResult, TaskVector
from modular import load_model
from modular.app.cli import main
from modular.app.corpora import train_tokenizer
from modular.testing import tiny_model
from moe import AdaMoEConfig, inject_adamoe

from .conftest import perturbed


def test_learned_coefficients_merge_the_weighted_deltas_per_tensor():
    base = {"weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "bias": torch.zeros(2), "other": torch.ones(3)}
    tvs = [TaskVector.from_tensors({"weight": torch.ones(2, 2), "bias": torch.ones(2)}, "a"),
           TaskVector.from_tensors({"weight": torch.full((2, 2), 10.0)}, "b")]
    result = AdaMergingResult(torch.tensor([[0.5, 0.1], [0.2, 0.3]]), ["weight", "bias"], ["a", "b"], tvs, [], AdaMergingConfig())
    merged = result.merge(base, progress=False)
    # weight: θ0 + 0.5·1 + 0.1·10 ; bias: 0 + 0.2·1 (task b has no bias delta); other: untouched
    assert torch.allclose(merged["weight"], torch.tensor([[2.5, 3.5], [4.5, 5.5]]))
    assert torch.allclose(merged["bias"], torch.full((2,), 0.2))
    assert torch.equal(merged["other"], base["other"])


@pytest.fixture
def mixtral_folders(tmp_path):
    """An AdaMoE-injected tiny Mixtral base and two perturbed copies: Mixtral checkpoints store
    per-expert w1/w2/w3 tensors that transformers fuses into ``gate_up_proj`` on load."""
    tokenizer = train_tokenizer(["experts route tokens to experts"] * 5)
    base = tiny_model("mixtral")
    inject_adamoe(base, AdaMoEConfig(num_null_experts=2, top_k=3))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    for i in range(2):
        perturbed(load_model(tmp_path / "base"), seed=i, scale=0.02).save_pretrained(tmp_path / f"ft{i}")
        (tmp_path / f"prompts{i}.txt").write_text("experts route tokens\ntokens to experts\n")
    return tmp_path


def test_adamerging_cli_on_a_fused_experts_family(mixtral_folders, input_ids):
    root = mixtral_folders
    config = {"merge_method": "adamerging", "base_model": str(root / "base"),
              "models": [{"model": str(root / f"ft{i}"), "data": str(root / f"prompts{i}.txt")} for i in range(2)],
              "adamerging": {"granularity": "layer", "steps": 2, "lr": 0.05}}
    (root / "m.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(root / "m.yaml"), "--out", str(root / "out"), "--no-progress"]) == 0

    coefficients = json.loads((root / "out" / "adamerging_coefficients.json").read_text())
    assert any("experts.gate_up_proj" in row for row in coefficients["rows"])  # parameter names, not checkpoint names
    assert (root / "out" / "adamerging_coefficients.png").is_file() and "AdaMerging coefficients" in (root / "out" / "README.md").read_text()
    merged, base = load_model(root / "out"), load_model(root / "base")
    fts = [dict(load_model(root / f"ft{i}").named_parameters()) for i in range(2)]
    for row, lams in zip(coefficients["rows"], coefficients["coefficients"]):
        theta0 = dict(base.named_parameters())[row]
        expected = theta0 + sum(lam * (ft[row] - theta0) for lam, ft in zip(lams, fts))
        assert torch.allclose(dict(merged.named_parameters())[row], expected, atol=1e-6), row
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids).logits).all()

"""Tiny base / fine-tuned checkpoints shared by the merging tests."""

import pytest
import torch

from modular.testing import tiny_model


def perturbed(model, seed: int, scale: float = 0.05):
    """A stand-in fine-tuned model: ``model`` + seeded Gaussian noise on every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="session")
def llama_folders(tmp_path_factory):
    """``(base, [ft0, ft1, ft2])`` folders of a tiny llama (fp32, safetensors)."""
    root = tmp_path_factory.mktemp("llama")
    tiny_model("llama").save_pretrained(root / "base")
    fts = []
    for i in range(3):
        perturbed(tiny_model("llama"), seed=100 + i).save_pretrained(root / f"ft{i}")
        fts.append(root / f"ft{i}")
    return root / "base", fts

"""Tiny inputs written to disk, shared by the recipe, fault and bad-input tests."""

import hashlib
import json
from pathlib import Path

import torch

from modular.app.corpora import train_tokenizer
from modular.testing import tiny_model

TEXT = (
    "A mixture of experts routes each token to a few experts. Null experts cost nothing. "
    "Layerwise sampling trains a few layers at a time, and merging combines task models. "
)


def write_recipe_data(folder: Path) -> Path:
    """``train.jsonl`` (32 rows), ``eval.jsonl`` (8 rows) and a BPE tokenizer ``tok/`` in ``folder``."""
    lines = [{"text": f"{TEXT} Sentence number {i}."} for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines[:32]))
    (folder / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in lines[32:]))
    train_tokenizer([TEXT]).save_pretrained(folder / "tok")
    return folder


def write_merge_models(root: Path) -> Path:
    """A tiny llama ``base`` and two stand-in fine-tuned models ``ft1``, ``ft2`` (base + seeded noise) in ``root``."""
    tiny_model("llama").save_pretrained(root / "base")
    for seed in (1, 2):
        model = tiny_model("llama")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
        model.save_pretrained(root / f"ft{seed}")
    return root


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (to show inputs were not touched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}

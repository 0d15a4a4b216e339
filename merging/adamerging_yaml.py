"""AdaMerging from ``modular merge`` YAML (this project's addition to mergekit's schema):
the ``adamerging:`` section and the run over the config's folders.

.. code-block:: yaml

    merge_method: adamerging
    base_model: ./base
    models:
      - {model: ./ft-a, data: a_prompts.txt}      # unlabelled inputs: .txt one a line, or .jsonl with a "text" field
    adamerging: {objective: agreement, steps: 100}  # AdaMergingConfig fields (same defaults) + max_length

Two kinds of task models:

* causal LMs of the base's own class: the entropy is the next-token distribution's on each
  model's unlabelled prompts;
* classifiers of another class than the base (``*ForSequenceClassification`` fine-tuned from a
  saved backbone, e.g. ``BertModel``): the entropy is that of each task model's own head, put
  on the merged backbone, on its task's unlabelled inputs. Heads are never merged; the merged
  folder holds the backbone (the base's layout), and each task's head goes on it to evaluate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adamerging import AdaMergingConfig, EntropyTask, adamerge_folders

__all__ = ["AdaMergingSection", "head_logits", "read_unlabelled", "run_adamerging"]


@dataclass
class AdaMergingSection(AdaMergingConfig):
    """``AdaMergingConfig`` (every field, the same defaults) plus ``max_length``: the tokens an
    input is truncated to (``batch_size`` inputs per task per step)."""

    max_length: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < 2:
            raise ValueError(f"max_length: must be >= 2, got {self.max_length}")

    def method_config(self) -> AdaMergingConfig:
        names = AdaMergingConfig.__dataclass_fields__
        return AdaMergingConfig(**{k: getattr(self, k) for k in names})


def read_unlabelled(path: str | Path, where: str) -> list[str]:
    """The inputs of a ``data:`` file: a ``.txt`` one a line, or a ``.jsonl`` with a ``"text"`` field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {str(path)!r} does not exist")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: {path} line {number} is not JSON ({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{where}: {path} line {number} has no string field 'text'")
            rows.append(row["text"])
        lines = rows
    if not lines:
        raise ValueError(f"{where}: adamerging needs unlabelled data; {str(path)!r} has no inputs")
    return lines


class _GivenOutputs(nn.Module):
    """Stands in for a head model's backbone: returns the outputs it was handed, so the model's
    own forward applies its head (pooling, dropout, classifier) to another backbone's outputs."""

    def __init__(self):
        super().__init__()
        self.outputs = None

    def forward(self, *args, **kwargs):
        return self.outputs


def head_logits(task_model: nn.Module):
    """``(backbone outputs, batch) -> logits`` of ``task_model``'s head (any HF ``*For...``
    model with a backbone), for :class:`merging.EntropyTask`. ``task_model``'s own backbone is
    dropped (its head is kept, frozen, in eval mode)."""
    given = _GivenOutputs()
    setattr(task_model, task_model.base_model_prefix, given)
    task_model.eval().requires_grad_(False)

    def logits(outputs, batch: dict) -> torch.Tensor:
        given.outputs = outputs
        return task_model(**batch).logits

    return logits


def _architecture(folder: str) -> str | None:
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a save_pretrained folder)")
    return (json.loads(config.read_text()).get("architectures") or [None])[0]


def run_adamerging(config, common: dict) -> Path:
    """Learn the coefficients on each model's unlabelled inputs, then write the merged model."""
    from transformers import AutoTokenizer

    from modular import load_model

    section = config.adamerging
    tokenizer_source = common["tokenizer_source"] or config.base_model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base_class = _architecture(config.base_model)
    tasks = []
    for entry in config.models:
        inputs = read_unlabelled(entry.data, f"models[{entry.model}].data")
        batches = [
            dict(tokenizer(inputs[i : i + section.batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=section.max_length))
            for i in range(0, len(inputs), section.batch_size)
        ]
        with_head = _architecture(entry.model) != base_class  # a classifier on the base's backbone
        logits = head_logits(load_model(entry.model, dtype=torch.float32)) if with_head else None
        tasks.append(EntropyTask(entry.model, batches, **({"logits": logits} if logits else {})))
    finetuned = {entry.model: entry.model for entry in config.models}
    adamerge_folders(config.base_model, finetuned, tasks, section.method_config(), **{**common, "tokenizer_source": tokenizer_source})
    return Path(common["out"])

"""AdaMerging from ``modular merge`` YAML (this project's addition to mergekit's schema):
the ``adamerging:`` section and the run over the config's folders.

.. code-block:: yaml

    merge_method: adamerging
    base_model: ./base
    models:
      - {model: ./ft-a, data: a_prompts.txt}      # unlabelled prompts, one a line
    adamerging: {granularity: layer, steps: 200}  # AdaMergingConfig fields + batch_size, max_length
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .adamerging import AdaMergingConfig, EntropyTask, adamerge_folders

__all__ = ["AdaMergingSection", "run_adamerging"]


@dataclass
class AdaMergingSection(AdaMergingConfig):
    """``AdaMergingConfig`` plus how prompts become batches (causal LMs from the CLI)."""

    batch_size: int = 16
    max_length: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")

    def method_config(self) -> AdaMergingConfig:
        names = AdaMergingConfig.__dataclass_fields__
        return AdaMergingConfig(**{k: getattr(self, k) for k in names})


def run_adamerging(config, common: dict) -> Path:
    """Causal-LM AdaMerging: next-token entropy on each model's unlabelled prompts."""
    from transformers import AutoTokenizer

    section = config.adamerging
    tokenizer_source = common["tokenizer_source"] or config.base_model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tasks = []
    for entry in config.models:
        data = Path(entry.data)
        if not data.is_file():
            raise FileNotFoundError(f"models[{entry.model}].data: {str(data)!r} does not exist")
        prompts = [line.strip() for line in data.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"adamerging needs unlabelled data: {str(data)!r} has no prompts")
        batches = [
            dict(tokenizer(prompts[i : i + section.batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=section.max_length))
            for i in range(0, len(prompts), section.batch_size)
        ]
        tasks.append(EntropyTask(entry.model, batches))
    finetuned = {entry.model: entry.model for entry in config.models}
    adamerge_folders(config.base_model, finetuned, tasks, section.method_config(), **{**common, "tokenizer_source": tokenizer_source})
    return Path(common["out"])

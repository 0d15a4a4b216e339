"""Classification with a causal LM through label words, for evaluating and AdaMerging LM task models.

A task model is fine-tuned on "prompt → label word" rows (``modular train`` with
``prompt_field``/``completion_field``). Its class scores are the next-token logits at the last
prompt position, restricted to the first token of each label word — the LM counterpart of a
classifier head. Accuracy compares their argmax with the labels; AdaMerging minimises their
entropy on the unlabelled prompts (``LabelWordTask.entropy_task``), as the paper does with each
task's head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adamerging import EntropyTask

__all__ = ["LabelWordTask", "class_logits"]


@dataclass
class LabelWordTask:
    """``prompts`` (with ``labels``, indices into ``label_words``, when known) of one task.

    Prompts are tokenised without special tokens, as ``modular train`` tokenises prompt /
    completion rows, so the scored position is the one the model was trained to answer at.
    """

    name: str
    prompts: list[str]
    label_words: list[str]
    labels: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(f"task {self.name}: no prompts")
        if self.labels is not None and len(self.labels) != len(self.prompts):
            raise ValueError(f"task {self.name}: {len(self.labels)} labels for {len(self.prompts)} prompts")

    def label_token_ids(self, tokenizer) -> list[int]:
        """First token of each label word (as it is tokenised as a completion); they must differ."""
        ids = [tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in self.label_words]
        if len(set(ids)) != len(ids):
            clashes = [w for w, i in zip(self.label_words, ids) if ids.count(i) > 1]
            raise ValueError(f"task {self.name}: label words {clashes} start with the same token; pick words with distinct first tokens")
        return ids

    def batches(self, tokenizer, batch_size: int = 32, max_length: int = 128) -> list[dict[str, torch.Tensor]]:
        """Right-padded model inputs (``input_ids``, ``attention_mask``) of the prompts."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = []
        for start in range(0, len(self.prompts), batch_size):
            rows = [ids[-max_length:] for ids in tokenizer(self.prompts[start : start + batch_size], add_special_tokens=False)["input_ids"]]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            out.append({"input_ids": input_ids, "attention_mask": mask})
        return out

    def entropy_task(self, tokenizer, batch_size: int = 32) -> EntropyTask:
        """Unlabelled AdaMerging data: entropy of the class distribution over the label words."""
        label_ids = torch.tensor(self.label_token_ids(tokenizer))
        return EntropyTask(self.name, self.batches(tokenizer, batch_size), lambda outputs, batch: class_logits(outputs, batch, label_ids))

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, tokenizer, batch_size: int = 64, *, batches: list[dict] | None = None) -> torch.Tensor:
        """Predicted class index per prompt. ``batches``: this task's :meth:`batches`, when already
        tokenised (e.g. to score several models)."""
        model.eval()
        label_ids = torch.tensor(self.label_token_ids(tokenizer))
        batches = self.batches(tokenizer, batch_size) if batches is None else batches
        return torch.cat([class_logits(model(**batch), batch, label_ids).argmax(-1) for batch in batches])

    def accuracy(self, model: torch.nn.Module, tokenizer, batch_size: int = 64, *, batches: list[dict] | None = None) -> float:
        if self.labels is None:
            raise ValueError(f"task {self.name}: accuracy needs labels")
        return (self.predict(model, tokenizer, batch_size, batches=batches) == torch.tensor(self.labels)).float().mean().item()


def class_logits(outputs, batch: dict[str, torch.Tensor], label_ids: torch.Tensor) -> torch.Tensor:
    """(B, C): the logits of the label tokens at each row's last prompt position (right padding)."""
    last = batch["attention_mask"].sum(1) - 1
    return outputs.logits[torch.arange(last.numel()), last][:, label_ids]

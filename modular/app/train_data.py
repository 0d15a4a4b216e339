"""What ``modular train`` feeds the Trainer: the recipe's tokenizer, its tokenised splits (packed
text blocks, prompt/completion rows, labelled texts) and the collator that batches them."""

from __future__ import annotations

from pathlib import Path

from .recipe import Recipe

__all__ = ["check_labels", "load_tokenizer", "make_collator", "prompt_completion_rows", "tokenized_splits"]


def load_tokenizer(recipe: Recipe):
    """The recipe's tokenizer; one whose ids do not fit the model's embedding table is refused."""
    from transformers import AutoTokenizer

    from .recipe import model_config

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.tokenizer or recipe.model.path)
    vocab_size = getattr(model_config(recipe), "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"{recipe.source}: model.tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"vocab_size {vocab_size}; use a tokenizer of at most {vocab_size} tokens or a model with a larger vocabulary")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenized_splits(recipe: Recipe, tokenizer) -> dict:
    """Tokenised splits: packed ``max_length`` blocks of plain text, or prompt/completion rows."""
    from datasets import load_dataset

    from .recipe import DATA_SUFFIXES

    data = recipe.data
    files = {"train": data.train, **({"eval": data.eval} if data.eval else {})}
    raw = load_dataset(DATA_SUFFIXES[Path(data.train).suffix], data_files=files)
    fields = [data.prompt_field, data.completion_field] if data.is_prompt_completion else [data.text_field]
    fields += [data.label_field] if data.label_field else []
    missing = [f for f in fields if f not in raw["train"].column_names]
    if missing:
        raise ValueError(f"{recipe.source}: data field(s) {missing} not in the data's columns {raw['train'].column_names}")
    columns = raw["train"].column_names
    if data.is_prompt_completion:
        return raw.map(lambda batch: prompt_completion_rows(batch, data, tokenizer), batched=True, remove_columns=columns)
    if data.label_field:
        check_labels(raw, data.label_field, recipe.model.num_labels, recipe.source)
        return raw.map(lambda batch: {**tokenizer(batch[data.text_field], truncation=True, max_length=data.max_length),
                                      "labels": batch[data.label_field]}, batched=True, remove_columns=columns)

    def tokenize(batch):
        return tokenizer(batch[data.text_field], truncation=not data.packing, max_length=data.max_length)

    tokenized = raw.map(tokenize, batched=True, remove_columns=columns)
    if not data.packing:
        return tokenized

    def pack(batch):
        ids = [t for seq in batch["input_ids"] for t in seq + [tokenizer.eos_token_id or tokenizer.sep_token_id]]
        usable = len(ids) // data.max_length * data.max_length
        return {"input_ids": [ids[i : i + data.max_length] for i in range(0, usable, data.max_length)]}

    return tokenized.map(pack, batched=True, remove_columns=tokenized["train"].column_names)


def check_labels(raw, field: str, num_labels: int, source: str) -> None:
    for split, rows in raw.items():
        bad = [y for y in rows[field] if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y < num_labels]
        if bad:
            raise ValueError(f"{source}: data.{split} field {field!r} holds {bad[0]!r}; expected class indices 0..{num_labels - 1} "
                             f"(model.num_labels {num_labels})")


def prompt_completion_rows(batch: dict, data, tokenizer) -> dict:
    """prompt + completion + eos as one row; labels are -100 on the prompt, so only the
    completion is learned. Long prompts lose their beginning (the completion always fits)."""
    rows = {"input_ids": [], "labels": []}
    prompts = tokenizer(batch[data.prompt_field], add_special_tokens=False)["input_ids"]
    completions = tokenizer(batch[data.completion_field], add_special_tokens=False)["input_ids"]
    for prompt, completion in zip(prompts, completions):
        completion = (completion + [tokenizer.eos_token_id])[: data.max_length - 1]
        prompt = prompt[-(data.max_length - len(completion)) :]
        rows["input_ids"].append(prompt + completion)
        rows["labels"].append([-100] * len(prompt) + completion)
    return rows


def make_collator(recipe: Recipe, tokenizer):
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding

    if recipe.data.label_field:
        return DataCollatorWithPadding(tokenizer)
    if recipe.data.is_prompt_completion:
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)  # keeps the -100 prompt labels
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)

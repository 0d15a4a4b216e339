"""Running one parsed ``modular merge`` config: open every ``model:`` entry, build the output
vocabulary if asked, then the streamed merge of the registered method — or AdaMerging
(coefficients learned on unlabelled prompts)."""

from __future__ import annotations

import os
from pathlib import Path

from modular.checkpoint import atomic_write_text, check_output_dir

from .adamerging_yaml import run_adamerging
from .config import ADAMERGING, MergeConfig
from .engine import Settings, merge
from .parameters import LayerPositions
from .sources import check_tokenizer_folder, parse_size
from .task_vector import TaskVector, open_model

__all__ = ["run_merge"]

MERGEKIT_CONFIG = "mergekit_config.yml"  # the config, verbatim, where mergekit writes it


def _folder(model, base) -> Path:
    """Where ``model``'s tokenizer and config live (a task vector has the base's)."""
    return Path(base.path if isinstance(model, TaskVector) else model.path)


def _vocabulary(config: MergeConfig, inputs: list, labels: list[str], base):
    """The output vocabulary of a ``tokenizer:`` section, or None when every model already has it row for row."""
    from .tokenizer import Participant, VocabularyPlan

    participants = [Participant(label, _folder(m, base)) for label, m in zip(labels, inputs)]
    if base is not None:
        participants.append(Participant(config.base_model, Path(base.path), is_base=True))
    reference = base if base is not None else inputs[0]
    size = (reference.config() or {}).get("vocab_size")
    positions = LayerPositions(reference.names(), (reference.config() or {}).get("model_type"))
    tensors = [n for n in reference.names()
               if len(reference.shape(n)) == 2 and reference.shape(n)[0] == size and positions.pattern.search(n) is None]
    plan = VocabularyPlan(config.tokenizer, participants, tensors)
    return None if plan.trivial else plan


def _compute_dtype(config: MergeConfig, choice: str | None, reference) -> str:
    """``mergekit``: the config's ``dtype``, else the checkpoints' own (what mergekit computes in)."""
    choice = choice or config.compute_dtype
    if choice != "mergekit":
        return choice
    if config.dtype:
        return config.dtype
    dtypes = {str(reference.dtype(n)).removeprefix("torch.") for n in reference.names() if reference.dtype(n).is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def _check_before_work(config: MergeConfig, out, force: bool) -> None:
    """A missing tokenizer folder, or an output that would replace an input, is found before any work."""
    tokenizer = config.tokenizer.source if config.tokenizer is not None else None
    if tokenizer in ("base", "union"):
        tokenizer = None
    check_tokenizer_folder(tokenizer, "tokenizer_source" if config.tokenizer_source is not None else "tokenizer.source")
    models = [part for m in config.models for part in str(m.model).split("+")]
    check_output_dir(out, force=force, inputs=[config.base_model, *models, *(m.data for m in config.models), tokenizer])


def run_merge(config: MergeConfig, out: str | os.PathLike, *, force: bool = False, progress: bool = True,
              config_text: str | None = None, random_seed: int = 0, compute_dtype: str | None = None,
              out_shard_size: str | None = None) -> Path:
    """Run ``config`` into the folder ``out``; returns it.

    ``random_seed`` seeds DARE/DELLA (mergekit's ``--random-seed``: the same seed gives
    mergekit's masks); ``compute_dtype`` overrides the config's; ``config_text`` (the YAML as
    written) goes into the model card and ``mergekit_config.yml``.
    """
    _check_before_work(config, out, force)
    common = dict(
        out=out, force=force, dtype=config.out_dtype or config.dtype, max_shard_bytes=parse_size(out_shard_size or config.out_shard_size),
        card={"Configuration": f"```yaml\n{config_text.strip()}\n```"} if config_text else None, progress=progress,
    )
    if config.merge_method == ADAMERGING:
        source = config.tokenizer.source if config.tokenizer is not None else "base"
        if source == "union":
            raise ValueError("tokenizer: union is not supported with merge_method adamerging; give base or a folder")
        return run_adamerging(config, {**common, "tokenizer_source": None if source == "base" else source})
    base = open_model(config.base_model) if config.base_model else None
    inputs, labels, per_model, base_scope, base_index = [], [], [], {}, None
    for entry, scope in zip(config.models, config.settings["models"]):
        if config.is_base(entry):
            base_scope, base_index = scope, len(inputs)
            continue
        inputs.append(open_model(entry.model))
        labels.append(entry.model)
        per_model.append(scope)
    reference = base if base is not None else inputs[0]
    vocabulary = _vocabulary(config, inputs, labels, base) if config.tokenizer is not None else None
    tokenizer_source = None
    if config.tokenizer is not None and vocabulary is None and config.tokenizer.source not in ("union", "base"):
        tokenizer_source = config.tokenizer.source
    folders = [_folder(m, base) for m in inputs] + ([Path(base.path)] if base is not None else [])

    def write_extra(folder: Path) -> None:
        if config.chat_template:
            from .tokenizer import chat_template_text, set_chat_template

            text = chat_template_text(config.chat_template, folders)
            if text is not None:
                set_chat_template(folder, text)
        if config_text:
            atomic_write_text(folder / MERGEKIT_CONFIG, config_text)

    return merge(
        config.merge_method, base, inputs, settings=Settings(per_model, config.settings["shared"], base_scope, mergekit_defaults=True),
        base_index=base_index, compute_dtype=_compute_dtype(config, compute_dtype, reference), seed=random_seed,
        tokenizer_source=tokenizer_source, vocabulary=vocabulary, write_extra=write_extra, **common,
    )

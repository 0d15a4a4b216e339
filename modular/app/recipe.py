"""The ``modular train`` recipe: one YAML file, parsed once into typed sections.

Example (``examples/recipes/adamoe_lisa_onebit.yaml`` is a complete one)::

    model:
      config: {model_type: llama, hidden_size: 64, num_hidden_layers: 4, ...}   # or path: ./my-model
      tokenizer: ./tokenizer
    injections:                        # kinds from the injection registry (modular.injections)
      - upcycle: {num_experts: 4, top_k: 2}
      - adamoe: {num_null_experts: 4, top_k: 3}
    data: {train: data/train.jsonl, eval: data/eval.jsonl, text_field: text, max_length: 128}
    lisa: {num_active_layers: 2, interval_steps: 10}
    optimizer: {name: onebit_adam, lr: 1e-3, freeze_step: 20}
    deepspeed: onebit_zero0            # a packaged config name, or a path to a JSON file
    training: {max_steps: 100, per_device_train_batch_size: 8, save_steps: 20}
    output_dir: runs/task-a

Paths are relative to the recipe file. Every key is checked (those under ``training:`` against
``transformers.TrainingArguments``), every number must be finite, and impossible combinations
are refused here, before any model is built or any output written: LISA with more active
layers than the model has, an ``output_dir`` whose outputs would replace an input, LISA with
ZeRO-3 (parameters are partitioned, so a layer cannot be frozen and unfrozen by
``requires_grad``), and OneBitAdam with ZeRO > 0 (its compressed all-reduce replaces the
gradient reduction that ZeRO partitions).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.lisa import LisaConfig
from modular.checkpoint import check_output_dir
from modular.config_io import ConfigError, from_dict, read_yaml, unknown_keys_error
from modular.injections import get_injection, injection_kinds

__all__ = ["Recipe", "describe", "load_recipe", "model_config"]

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
OPTIMIZER_KEYS = {"learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim"}  # from `optimizer:`


@dataclass
class ModelSection:
    """``task``: ``causal_lm`` (language modelling) or ``sequence_classification``: the saved
    model (injections included) gets a fresh head of ``num_labels`` classes (the family's
    ``*ForSequenceClassification``); the data then needs a ``label_field``. ``head_init``
    (classification): ``probe`` fits the head on the frozen model's features of the train split
    before fine-tuning (logistic regression, L2 chosen on the eval split: ``finetune.heads``),
    ``random`` keeps transformers' initialisation.
    ``dtype``: the weights' dtype from loading on (``bfloat16`` for LLM-size runs; injections then
    work in it too). Mixed precision over fp32 weights is ``training: {bf16: true}`` instead."""

    path: str | None = None
    config: dict | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    num_labels: int | None = None
    head_init: Literal["probe", "random"] = "probe"

    def __post_init__(self) -> None:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (a saved model folder) or `config` (a model built from scratch)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("`config` needs a `model_type` (e.g. llama)")
        if self.tokenizer is None and self.path is None:
            raise ValueError("a model built from `config` needs a `tokenizer` folder")
        classify = self.task == "sequence_classification"
        if classify and not (isinstance(self.num_labels, int) and self.num_labels >= 2):
            raise ValueError(f"task sequence_classification needs `num_labels`, an integer >= 2; got {self.num_labels!r}")
        if not classify and self.num_labels is not None:
            raise ValueError("`num_labels` only applies to task: sequence_classification")


@dataclass
class DataSection:
    """Plain text (``text_field``, packed into ``max_length`` blocks), prompt/completion pairs
    (``prompt_field`` + ``completion_field``: one example per row, loss on the completion only),
    or labelled text for ``task: sequence_classification`` (``text_field`` + ``label_field``,
    an integer class per row)."""

    train: str
    eval: str | None = None
    text_field: str = "text"
    prompt_field: str | None = None
    completion_field: str | None = None
    label_field: str | None = None
    max_length: int = 256
    packing: bool = True

    def __post_init__(self) -> None:
        for split in (self.train, self.eval):
            if split is not None and Path(split).suffix not in DATA_SUFFIXES:
                raise ValueError(f"data file {split!r}: expected one of {', '.join(DATA_SUFFIXES)}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ValueError("give both `prompt_field` and `completion_field` (prompt/completion data), or neither")

    @property
    def is_prompt_completion(self) -> bool:
        return self.prompt_field is not None


@dataclass
class OptimizerSection:
    name: Literal["adamw", "onebit_adam"] = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    freeze_step: int | None = None  # OneBitAdam's warm-up steps; default: 15 % of max_steps

    def __post_init__(self) -> None:
        if self.freeze_step is not None and self.name != "onebit_adam":
            raise ValueError("`freeze_step` only applies to name: onebit_adam")
        if self.freeze_step is not None and self.freeze_step < 1:
            raise ValueError(f"freeze_step: {self.freeze_step!r} is not allowed; expected an integer >= 1")
        for name, ok, expected in (
            ("lr", self.lr > 0, "a number > 0"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("eps", self.eps > 0, "a number > 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
        ):
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; expected {expected}")


@dataclass
class Recipe:
    model: ModelSection
    data: DataSection
    output_dir: str
    injections: list[dict] = field(default_factory=list)
    lisa: LisaConfig | None = None
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    deepspeed: str | None = None
    training: dict = field(default_factory=dict)
    source: str = ""  # the recipe file, for messages

    @property
    def zero_stage(self) -> int | None:
        if self.deepspeed is None:
            return None
        return int(json.loads(Path(self.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0))


def _resolve(base: Path, value: str | None) -> str | None:
    return None if value is None else str((base / os.path.expanduser(value)).resolve())


def _deepspeed_config(base: Path, value: str, where: str) -> str:
    from finetune.deepspeed_configs import deepspeed_config_path  # packaged configs, by name

    candidate = base / value
    if candidate.is_file():
        return str(candidate.resolve())
    try:
        return str(deepspeed_config_path(value))
    except (KeyError, FileNotFoundError, ValueError):
        raise ConfigError(f"{where}: {value!r} is neither a file nor a packaged DeepSpeed config name") from None


def _check_injections(injections: list, where: str) -> list[dict]:
    checked = []
    for i, item in enumerate(injections):
        if not (isinstance(item, dict) and len(item) == 1):
            raise ConfigError(f"{where}[{i}]: expected one mapping like `adamoe: {{...}}`, got {item!r}")
        ((kind, params),) = item.items()
        if kind not in injection_kinds():
            raise ConfigError(f"{where}[{i}]: unknown injection {kind!r}; expected one of {', '.join(injection_kinds())}")
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"{where}[{i}].{kind}: expected a mapping of settings, got {params!r}")
        from_dict(get_injection(kind).config_class, params or {}, f"{where}[{i}].{kind}")
        checked.append({"kind": kind, "params": params or {}})
    kinds = [c["kind"] for c in checked]
    if "upcycle" in kinds and "adamoe" in kinds and kinds.index("upcycle") > kinds.index("adamoe"):
        raise ConfigError(f"{where}: `upcycle` must come before `adamoe` (AdaMoE is injected into MoE blocks)")
    return checked


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Parse and validate a recipe file; every error names the file and the key."""
    path = Path(path)
    data = read_yaml(path)
    where = str(path)
    data.setdefault("output_dir", None)
    if data["output_dir"] is None:
        raise ConfigError(f"{where}: missing required key 'output_dir'")
    injections = _check_injections(data.pop("injections", None) or [], f"{where}: injections")
    recipe = from_dict(Recipe, data, where)
    recipe.injections = injections
    recipe.source = where

    base = path.resolve().parent
    recipe.output_dir = _resolve(base, recipe.output_dir)
    recipe.model.path = _resolve(base, recipe.model.path)
    recipe.model.tokenizer = _resolve(base, recipe.model.tokenizer)
    recipe.data.train = _resolve(base, recipe.data.train)
    recipe.data.eval = _resolve(base, recipe.data.eval)
    for key, value in (("model.path", recipe.model.path), ("model.tokenizer", recipe.model.tokenizer)):
        if value is not None and not Path(value).is_dir():
            raise ConfigError(f"{where}: {key}: folder {value!r} does not exist")
    for key, value in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{where}: {key}: file {value!r} does not exist")
    if recipe.deepspeed is not None:
        recipe.deepspeed = _deepspeed_config(base, recipe.deepspeed, f"{where}: deepspeed")
    _check_combinations(recipe, where)
    _check_training(recipe.training, where)
    _check_against_model(recipe, where)
    _check_outputs_apart(recipe, where)
    return recipe


def _check_training(training: dict, where: str) -> None:
    """Every ``training:`` key is a ``TrainingArguments`` field (typos named), every number finite."""
    from transformers import TrainingArguments

    known = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    if set(training) - set(known):
        raise unknown_keys_error(training, known, f"{where}: training", list_allowed=False)
    for key, value in training.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: training.{key}: {value!r} is not allowed; expected a finite number")


def model_config(recipe: Recipe):
    """The model's ``PretrainedConfig`` (from ``model.config``, or the folder's config.json), no weights."""
    from transformers import AutoConfig

    from modular.loading import read_config

    if recipe.model.path is not None:
        return read_config(recipe.model.path)[0]
    settings = dict(recipe.model.config)
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def _check_against_model(recipe: Recipe, where: str) -> None:
    """What the model's config decides, found before the model is built: LISA's layer count."""
    try:
        config = model_config(recipe)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{where}: model: {err}") from None
    layers = getattr(config, "num_hidden_layers", None)
    if recipe.lisa is not None and layers is not None and recipe.lisa.num_active_layers > layers:
        raise ConfigError(f"{where}: lisa.num_active_layers: {recipe.lisa.num_active_layers} is more than the "
                          f"model's {layers} layers; expected 1 to {layers}")


def _check_outputs_apart(recipe: Recipe, where: str) -> None:
    """Outputs never touch inputs: ``output_dir/model`` (replaced on every run) and the checkpoints
    (rotated away) may not hold, or lie inside, the model, tokenizer or data."""
    out = Path(recipe.output_dir)
    inputs = [recipe.model.path, recipe.model.tokenizer, recipe.data.train, recipe.data.eval]
    try:
        check_output_dir(out / "model", force=True, inputs=inputs)
    except ValueError as err:
        raise ConfigError(f"{where}: output_dir: {err}") from None
    for value in filter(None, inputs):
        inside = Path(value).relative_to(out).parts if Path(value).is_relative_to(out) else ()
        if inside and inside[0].startswith("checkpoint-"):
            raise ConfigError(f"{where}: output_dir: the input {value!r} lies in a checkpoint folder of the run, which "
                              "training rotates away; copy it elsewhere or use another output_dir")


def _check_combinations(recipe: Recipe, where: str) -> None:
    classify = recipe.model.task == "sequence_classification"
    if classify != (recipe.data.label_field is not None):
        raise ConfigError(f"{where}: data.label_field (the class of each row) goes with model.task: sequence_classification, "
                          f"and that task needs it (model.task is {recipe.model.task!r}, data.label_field is {recipe.data.label_field!r})")
    if classify and recipe.data.is_prompt_completion:
        raise ConfigError(f"{where}: model.task sequence_classification reads text_field + label_field, not prompt/completion fields")
    stage = recipe.zero_stage
    if recipe.lisa is not None and stage == 3:
        raise ConfigError(
            f"{where}: lisa with ZeRO stage 3 is not supported: ZeRO-3 partitions parameters, so LISA cannot "
            "freeze and unfreeze whole layers; use a ZeRO-0/1/2 config"
        )
    if recipe.optimizer.name == "onebit_adam" and stage not in (None, 0):
        raise ConfigError(
            f"{where}: optimizer onebit_adam needs ZeRO stage 0 (its compressed all-reduce replaces the gradient "
            f"reduction ZeRO partitions); the deepspeed config has stage {stage}"
        )
    _check_precision(recipe, where)
    reserved = {"output_dir", "deepspeed", "optimizers", "resume_from_checkpoint"} & set(recipe.training)
    if reserved:
        raise ConfigError(f"{where}: training: {', '.join(sorted(reserved))} are set by the recipe itself, not under training")
    owned = OPTIMIZER_KEYS & set(recipe.training)
    if owned:
        raise ConfigError(f"{where}: training: {', '.join(sorted(owned))} belong in the `optimizer:` section "
                          "(name, lr, weight_decay, betas, eps), which both optimizers read")
    if recipe.lisa is not None and stage in (1, 2) and recipe.optimizer.weight_decay:
        raise ConfigError(f"{where}: lisa under ZeRO stage {stage} needs optimizer.weight_decay: 0 (frozen layers share "
                          f"the flat fp32 partition, and decoupled weight decay would shrink them); got {recipe.optimizer.weight_decay}")
    if recipe.optimizer.name == "onebit_adam" and recipe.optimizer.freeze_step is None and "max_steps" not in recipe.training:
        raise ConfigError(f"{where}: optimizer.freeze_step: give it, or training.max_steps (its default is 15 % of max_steps)")


def _check_precision(recipe: Recipe, where: str) -> None:
    """bf16 weights (``model.dtype``) and mixed precision (``training.bf16``/``fp16``) in the combinations
    that keep fp32 optimizer state: ZeRO-1/2 with DeepSpeed's bf16 (fp32 master weights), OneBitAdam
    with DeepSpeed's bf16 off (its own fp32 state), or autocast over fp32 weights."""
    mixed = [k for k in ("bf16", "fp16") if recipe.training.get(k)]
    stage = recipe.zero_stage
    if recipe.model.dtype != "float32" and "fp16" in mixed:
        raise ConfigError(f"{where}: model.dtype: {recipe.model.dtype} with training.fp16: true mixes two half "
                          "precisions; use training.bf16 (or model.dtype: float32)")
    if recipe.optimizer.name == "onebit_adam" and stage is not None and mixed:
        raise ConfigError(
            f"{where}: optimizer onebit_adam under DeepSpeed needs training.{mixed[0]} off: DeepSpeed's {mixed[0]} mode "
            "hands the optimizer fp32 master copies, and LISA's frozen layers kept moving under it; for bf16, set "
            "model.dtype: bfloat16 (OneBitAdam keeps fp32 state and error buffers over bf16 weights)")
    if recipe.model.dtype != "float32" and stage in (1, 2) and "bf16" not in mixed:
        raise ConfigError(
            f"{where}: model.dtype: {recipe.model.dtype} under ZeRO-{stage} needs training.bf16: true, so that DeepSpeed "
            "keeps fp32 master weights and optimizer state for the bf16 weights")


def describe(recipe: Any) -> str:
    """One line per section, for the run log."""
    inj = ", ".join(i["kind"] for i in recipe.injections) or "none"
    lisa = "off" if recipe.lisa is None else f"γ={recipe.lisa.num_active_layers}, K={recipe.lisa.interval_steps}"
    task = "" if recipe.model.task == "causal_lm" else f" task={recipe.model.task}({recipe.model.num_labels} labels)"
    return (f"model={recipe.model.path or recipe.model.config.get('model_type')}{task} dtype={recipe.model.dtype} "
            f"injections={inj} lisa={lisa} optimizer={recipe.optimizer.name}")

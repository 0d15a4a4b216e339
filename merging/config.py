"""The ``modular merge`` YAML: mergekit 0.1.5's schema, parsed once into typed dataclasses.

.. code-block:: yaml

    merge_method: ties            # any registered method (merging.methods), or adamerging
    base_model: ./base
    models:
      - model: ./ft-math
        parameters: {weight: 1.0, density: [1, 0.7, 0.1]}   # a list is a gradient over layers
      - model: ./base+./lora-code                            # a LoRA adapter on a model (mergekit's form)
        parameters:
          weight: [{filter: mlp, value: 0.5}, {value: 0}]    # per-tensor values: first filter that matches
    parameters: {normalize: true, int8_mask: true}           # global values (and every model's defaults)
    dtype: bfloat16                                          # mergekit: computation and output dtype
    out_dtype: bfloat16
    tokenizer: {source: union}                               # or tokenizer_source: base | union | ./model
    chat_template: chatml
    # this project's additions:
    compute_dtype: float32          # the dtype methods compute in: float32 (default), a dtype, or `mergekit` (= dtype)
    out_shard_size: 500MB
    adamerging: {objective: agreement, steps: 100}   # merge_method: adamerging only: AdaMergingConfig fields

Which keys a method accepts, per model or globally, with which defaults and ranges, is read from
the method registry (:mod:`merging.methods.registry`); defaults are mergekit's for YAML. What
mergekit silently ignores is ignored here with a warning (a global parameter written under a
model, a key that only another method uses, ``pattern:``); a key that no method knows is refused
(a typo); a top-level ``name:`` (mergekit-multi's stage name) is accepted and not used. ``slices:`` is accepted when it is one slice covering every
layer of every source (= ``models:``); frankenmerges are not supported yet. Paths are relative
to the working directory, as in mergekit.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from modular.config_io import ConfigError, from_dict, read_yaml

from .adamerging_yaml import AdaMergingSection
from .methods import MergeMethod, get_merge_method, merge_method_names
from .parameters import Setting, literals, parse_setting
from .tokenizer import TokenizerSection, check_chat_template

__all__ = ["ADAMERGING", "MergeConfig", "ModelEntry", "Slice", "SliceSource", "load_merge_config"]

ADAMERGING = "adamerging"  # this project's addition to mergekit's schema: learned coefficients
Dtype = Literal["float32", "bfloat16", "float16", "float64"]


@dataclass
class ModelEntry:
    model: str
    parameters: dict = field(default_factory=dict)
    data: str | None = None  # adamerging only

    def paths(self) -> list[str]:
        """The folders this entry reads: ``BASE+LORA`` names two."""
        return self.model.split("+")


@dataclass
class SliceSource:
    model: str
    layer_range: list[int] | None = None
    parameters: dict = field(default_factory=dict)


@dataclass
class Slice:
    sources: list[SliceSource]
    parameters: dict = field(default_factory=dict)


@dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelEntry] | None = None
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: Dtype | None = None
    out_dtype: Dtype | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    slices: list[Slice] | None = None
    modules: dict | None = None
    name: str | None = None  # mergekit-multi's document name: not used by a single merge
    compute_dtype: str = "float32"
    out_shard_size: str = "500MB"
    adamerging: AdaMergingSection | None = None
    settings: dict = field(default_factory=dict, init=False, repr=False)  # parsed parameter settings (see _parse)

    def __post_init__(self) -> None:
        if self.modules is not None:
            raise ValueError("modules: multi-module merges are not supported yet; give models:")
        if self.slices is not None:
            if self.models is not None:
                raise ValueError("give either models: or slices:, not both")
            self.models, slice_parameters = _models_of_slices(self.slices)
        else:
            slice_parameters = {}
        if not self.models:
            raise ValueError("models: give at least one model")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either tokenizer_source: or tokenizer:, not both (tokenizer_source: X is tokenizer: {source: X})")
        if self.tokenizer_source is not None:
            self.tokenizer = TokenizerSection(source=self.tokenizer_source)
        if self.chat_template is not None:
            check_chat_template(self.chat_template)
        if self.compute_dtype not in ("float32", "bfloat16", "float16", "float64", "mergekit"):
            raise ValueError(f"compute_dtype: {self.compute_dtype!r} is not allowed; expected float32, bfloat16, float16, "
                             "float64 or mergekit (the config's dtype)")
        if self.merge_method == ADAMERGING:
            self._check_adamerging()
            return
        if self.merge_method not in merge_method_names():
            raise ValueError(f"merge_method: {self.merge_method!r} is not allowed; expected one of "
                             f"{', '.join([*merge_method_names(), ADAMERGING])}")
        if self.adamerging is not None:
            raise ValueError(f"adamerging: section given but merge_method is {self.merge_method!r}")
        method = get_merge_method(self.merge_method)
        self.settings = {
            "shared": [_parse(slice_parameters, method, "slices[0].parameters", per_model=False),
                       _parse(self.parameters, method, "parameters", per_model=False)],
            "models": [_parse(m.parameters, method, f"models[{i}].parameters", per_model=True) for i, m in enumerate(self.models)],
        }
        non_base = [m for m in self.models if not self.is_base(m)]
        method.check_models(len(non_base), self.base_model is not None)

    def _check_adamerging(self) -> None:
        missing = [m.model for m in self.models if not m.data]
        if missing:
            raise ValueError(f"models: adamerging needs unlabelled data; give `data:` (a .txt file with one input a line, or a .jsonl with a 'text' field) for {missing}")
        if self.parameters or any(m.parameters for m in self.models):
            raise ValueError("parameters: adamerging learns its coefficients; set its options in the `adamerging:` section")
        if self.adamerging is None:
            self.adamerging = AdaMergingSection()

    def is_base(self, entry: ModelEntry) -> bool:
        return self.base_model is not None and _same_path(entry.model, self.base_model)

    def input_paths(self) -> list[str]:
        """Every path the merge reads: models, LoRA adapters, the base, tokenizer sources, data files."""
        paths = [p for m in self.models for p in m.paths()] + (self.base_model.split("+") if self.base_model else [])
        if self.tokenizer is not None:
            paths += [p for model in self.tokenizer.referenced_models() for p in model.split("+")]
        paths += [m.data for m in self.models if m.data]
        return list(dict.fromkeys(paths))


def _same_path(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def _models_of_slices(slices: list[Slice]) -> tuple[list[ModelEntry], dict]:
    """One slice whose sources each cover all their layers is ``models:`` (mergekit computes the
    same); anything else is a frankenmerge."""
    if len(slices) != 1:
        raise ValueError(f"slices: {len(slices)} slices make a frankenmerge (layers stacked from several slices), which is "
                         "not supported yet; one slice covering every layer of its sources is")
    entries = []
    for i, source in enumerate(slices[0].sources):
        layers = _num_layers(source.model.split("+")[0])
        if source.layer_range is not None and list(source.layer_range) != [0, layers]:
            raise ValueError(f"slices[0].sources[{i}].layer_range: {source.layer_range!r} is part of {source.model!r} "
                             f"({layers} layers); merging part of the layers (a frankenmerge) is not supported yet; "
                             f"use [0, {layers}]")
        entries.append(ModelEntry(source.model, dict(source.parameters)))
    return entries, dict(slices[0].parameters)


def _num_layers(folder: str) -> int | None:
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise ValueError(f"slices: {folder!r} has no config.json (expected a model folder)")
    data = json.loads(config.read_text())
    return data.get("num_hidden_layers", data.get("n_layer"))


def _known_elsewhere(method: MergeMethod) -> set[str]:
    return {p.name for name in merge_method_names() for p in get_merge_method(name).parameters} - set(method.names())


def _parse(params: dict, method: MergeMethod, where: str, *, per_model: bool) -> dict[str, Setting]:
    """``params`` as settings, each literal checked. Ignored with a warning, as mergekit ignores
    them: keys only other methods take, and global parameters written under a model."""
    settings, ignored = {}, []
    for name, raw in params.items():
        if name in _known_elsewhere(method):
            ignored.append(f"{name} (not a parameter of {method.name!r})")
            continue
        if name not in method.names():
            raise ValueError(f"{where}: unknown key(s) {name} for merge method {method.name!r}; "
                             f"allowed: {', '.join(method.names(per_model=True) if per_model else method.names())}")
        p = method.parameter(name)
        if per_model and not p.per_model:
            ignored.append(f"{name} (a global parameter: set it under the top-level parameters:)")
            continue
        setting = parse_setting(raw, f"{where}.{name}")
        for value in literals(setting):
            p.validate(value, f"{where}.{name}")
        settings[name] = setting
    if ignored:
        warnings.warn(f"{where}: ignored, as mergekit ignores them: {'; '.join(ignored)}", stacklevel=4)
    return settings


def load_merge_config(path: str | os.PathLike) -> MergeConfig:
    try:
        return from_dict(MergeConfig, read_yaml(path), str(path))
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from None

"""The ``modular merge`` YAML, mergekit's schema, parsed once into typed dataclasses.

.. code-block:: yaml

    merge_method: ties            # any registered method (merging.methods), or adamerging
    base_model: ./base
    models:
      - model: ./ft-math
        parameters: {weight: 1.0, density: 0.5}   # the method's per-model parameters
        data: math_prompts.txt                    # adamerging only: unlabelled prompts, one a line
    parameters: {lambda: 1.0, normalize: true}    # the method's parameters (global defaults too)
    dtype: float32                                # output dtype (default: the base's)
    tokenizer_source: base                        # base, or a folder
    out_shard_size: 500MB
    adamerging: {granularity: layer, steps: 200}  # AdaMergingConfig + batch_size/max_length

Which keys a method accepts, per model or globally, with which defaults and ranges, is read from
the method registry (:mod:`merging.methods.registry`): a method registered in a user's module
works here with no other edit. Paths are relative to the working directory, as in mergekit.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Literal

from modular.config_io import ConfigError, from_dict, read_yaml

from .adamerging_yaml import AdaMergingSection
from .methods import get_merge_method, merge_method_names

__all__ = ["ADAMERGING", "MergeConfig", "ModelEntry", "load_merge_config"]

ADAMERGING = "adamerging"  # this project's addition to mergekit's schema: learned coefficients


@dataclass
class ModelEntry:
    model: str
    parameters: dict = field(default_factory=dict)
    data: str | None = None


@dataclass
class MergeConfig:
    merge_method: str
    base_model: str
    models: list[ModelEntry]
    parameters: dict = field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    tokenizer_source: str = "base"
    out_shard_size: str = "500MB"
    adamerging: AdaMergingSection | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: give at least one fine-tuned model")
        if self.merge_method == ADAMERGING:
            self._check_adamerging()
            return
        if self.merge_method not in merge_method_names():
            raise ValueError(f"merge_method: {self.merge_method!r} is not allowed; expected one of "
                             f"{', '.join([*merge_method_names(), ADAMERGING])}")
        if self.adamerging is not None:
            raise ValueError(f"adamerging: section given but merge_method is {self.merge_method!r}")
        method = get_merge_method(self.merge_method)
        self.parameters = _drop_unused(self.parameters, method, "parameters")
        method.resolve(self.parameters, len(self.models), "parameters")  # every key known, every value allowed
        per_model = [p.name for p in method.parameters if p.per_model]
        for i, entry in enumerate(self.models):
            where = f"models[{i}].parameters"
            entry.parameters = _drop_unused(entry.parameters, method, where)
            unknown = sorted(set(entry.parameters) - set(per_model))
            if unknown:
                raise ValueError(f"{where}: unknown per-model key(s) {', '.join(unknown)} for merge method "
                                 f"{self.merge_method!r}; allowed: {', '.join(per_model)}")
            for name, value in entry.parameters.items():
                method.parameter(name).validate(value, where)

    def _check_adamerging(self) -> None:
        missing = [m.model for m in self.models if not m.data]
        if missing:
            raise ValueError(f"models: adamerging needs unlabelled data; give `data:` (a .txt file with one input a line, or a .jsonl with a 'text' field) for {missing}")
        if self.parameters or any(m.parameters for m in self.models):
            raise ValueError("parameters: adamerging learns its coefficients; set its options in the `adamerging:` section")
        if self.adamerging is None:
            self.adamerging = AdaMergingSection()

    def method_parameters(self) -> dict:
        """The method's parameters by name: global values, with per-model ones as lists of K values."""
        method = get_merge_method(self.merge_method)
        params = dict(self.parameters)
        for p in method.parameters:
            if p.per_model and any(p.name in m.parameters for m in self.models):
                fallback = self.parameters.get(p.name, p.default)
                params[p.name] = [m.parameters.get(p.name, fallback) for m in self.models]
        return params


def load_merge_config(path: str | os.PathLike) -> MergeConfig:
    try:
        return from_dict(MergeConfig, read_yaml(path), str(path))
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from None


def _drop_unused(params: dict, method, where: str) -> dict:
    """``params`` without the keys that another registered method takes but ``method`` does not
    (mergekit ignores those too, e.g. ``density`` under ``task_arithmetic``), with a warning;
    keys no method knows stay, so that they are refused as unknown."""
    own = {p.name for p in method.parameters}
    elsewhere = {p.name for name in merge_method_names() for p in get_merge_method(name).parameters} - own
    unused = sorted(set(params) & elsewhere)
    if unused:
        warnings.warn(f"{where}: {', '.join(unused)} not used by merge method {method.name!r}; ignored", stacklevel=3)
    return {k: v for k, v in params.items() if k not in unused}

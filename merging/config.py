"""The ``modular merge`` YAML, close to mergekit's, parsed once into typed dataclasses.

.. code-block:: yaml

    merge_method: ties            # task_arithmetic | ties | dare_linear | dare_ties | adamerging
    base_model: ./base
    models:
      - model: ./ft-math
        parameters: {weight: 1.0, density: 0.5}   # per-model: weight, density
        data: math_prompts.txt                    # adamerging only: unlabelled prompts, one a line
    parameters: {lambda: 1.0, normalize: true}    # method parameters (see merging.methods)
    dtype: float32                                # output dtype (default: the base's)
    tokenizer_source: base                        # base, or a folder
    out_shard_size: 500MB
    adamerging: {granularity: layer, steps: 200}  # AdaMergingConfig + batch_size/max_length

Paths are relative to the working directory, as in mergekit. mergekit's ``normalize`` for
``ties``/``dare_ties`` maps to ``combine`` (true: "mergekit", false: "sum").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from modular.config_io import ConfigError, from_dict, read_yaml

from .adamerging import AdaMergingConfig
from .methods import COMBINES

__all__ = ["AdaMergingSection", "MergeConfig", "ModelEntry", "load_merge_config"]

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "adamerging")
PER_MODEL = ("weight", "density")
GLOBAL_PARAMS = {
    "task_arithmetic": ("lambda", "normalize", "weight"),
    "ties": ("lambda", "normalize", "combine", "density", "weight"),
    "dare_linear": ("lambda", "normalize", "density", "weight", "seed"),
    "dare_ties": ("lambda", "normalize", "combine", "density", "weight", "seed"),
    "adamerging": (),
}


@dataclass
class ModelEntry:
    model: str
    parameters: dict = field(default_factory=dict)
    data: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.parameters) - set(PER_MODEL))
        if unknown:
            raise ValueError(f"parameters: unknown per-model key(s) {', '.join(unknown)}; allowed: {', '.join(PER_MODEL)}")


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


@dataclass
class MergeConfig:
    merge_method: Literal["task_arithmetic", "ties", "dare_linear", "dare_ties", "adamerging"]
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
        allowed = GLOBAL_PARAMS[self.merge_method]
        unknown = sorted(set(self.parameters) - set(allowed))
        if unknown:
            raise ValueError(
                f"parameters: unknown key(s) {', '.join(unknown)} for merge_method {self.merge_method!r}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )
        if "normalize" in self.parameters and "combine" in self.parameters:
            raise ValueError("parameters: give either normalize (mergekit) or combine, not both")
        if self.parameters.get("combine", "mergekit") not in COMBINES:
            raise ValueError(f"parameters.combine: {self.parameters['combine']!r} is not allowed; expected one of {', '.join(COMBINES)}")
        if self.merge_method == "adamerging":
            missing = [m.model for m in self.models if not m.data]
            if missing:
                raise ValueError(f"models: adamerging needs unlabelled data; give `data:` (a text file, one prompt a line) for {missing}")
            if self.adamerging is None:
                self.adamerging = AdaMergingSection()
        elif self.adamerging is not None:
            raise ValueError(f"adamerging: section given but merge_method is {self.merge_method!r}")

    def per_model(self, key: str, default: float) -> list[float]:
        fallback = self.parameters.get(key, default)
        return [float(m.parameters.get(key, fallback)) for m in self.models]

    def method_params(self) -> dict:
        """Keyword arguments for ``merging.merge`` (``lambda`` -> ``lambda_``, ``normalize`` -> ``combine`` for TIES)."""
        params = {k: v for k, v in self.parameters.items() if k not in PER_MODEL}
        if "lambda" in params:
            params["lambda_"] = float(params.pop("lambda"))
        if self.merge_method in ("ties", "dare_ties") and "normalize" in params:
            params["combine"] = "mergekit" if params.pop("normalize") else "sum"
        if self.merge_method != "task_arithmetic":
            params["density"] = self.per_model("density", {"ties": 0.2}.get(self.merge_method, 0.5))
        return params


def load_merge_config(path: str | os.PathLike) -> MergeConfig:
    try:
        return from_dict(MergeConfig, read_yaml(path), str(path))
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from None

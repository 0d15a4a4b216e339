"""The packaged DeepSpeed configs: every JSON validates; lookup and 'auto' filling behave."""

import pytest

from finetune.deepspeed_configs import deepspeed_config, deepspeed_config_names, deepspeed_config_path

ZERO_STAGES = (0, 1, 2, 3)


def validate_deepspeed_config(config: dict, name: str = "config") -> None:
    """Check what the project relies on: a known ZeRO stage, fp32 communication, and a
    ``zero_optimization`` block DeepSpeed's own schema accepts (typos raise)."""
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in ZERO_STAGES:
        raise ValueError(f"{name}: zero_optimization.stage must be one of {ZERO_STAGES}, got {zero!r}")
    if config.get("communication_data_type", "fp32") != "fp32":
        raise ValueError(f"{name}: communication_data_type must be 'fp32' (gloo on CPU), got {config['communication_data_type']!r}")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    DeepSpeedZeroConfig(**zero)


def test_all_packaged_configs_validate():
    names = deepspeed_config_names()
    assert {"zero0", "zero1", "zero2"} <= set(names)
    for name in names:
        config = deepspeed_config(name, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
                                  train_batch_size=4, gradient_clipping=1.0)
        validate_deepspeed_config(config, name)
    assert [deepspeed_config(f"zero{s}", train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=2,
                             gradient_clipping=0.0)["zero_optimization"]["stage"] for s in range(3)] == [0, 1, 2]


def test_lookup_and_errors():
    assert deepspeed_config_path("zero2.json") == deepspeed_config_path("zero2")
    assert deepspeed_config_path("zero2").endswith("finetune/configs/zero2.json")
    with pytest.raises(KeyError, match="zero9"):
        deepspeed_config_path("zero9")
    with pytest.raises(ValueError, match="train_batch_size"):
        deepspeed_config("zero1", train_micro_batch_size_per_gpu=2)
    with pytest.raises(KeyError, match="no top-level key"):
        deepspeed_config("zero1", micro_batch=2)
    with pytest.raises(ValueError, match="stage"):
        validate_deepspeed_config({"zero_optimization": {"stage": 4}})
    with pytest.raises(Exception, match="overlap_comms"):  # a typo in the ZeRO block is caught by DeepSpeed's schema
        validate_deepspeed_config({"zero_optimization": {"stage": 2, "overlap_comms": True}})

"""Tiny models built from configs, for tests, examples and smoke runs (no downloads).

``tiny_model("mixtral")`` gives a 2-layer, hidden-32 model of any registered family (a tokenizer
to go with it: :func:`modular.app.corpora.train_tokenizer`).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig

__all__ = [
    "TINY_OVERRIDES",
    "tiny_config",
    "tiny_model",
]

_DECODER = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

TINY_OVERRIDES: dict[str, dict] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": {**_DECODER, "head_dim": 8},
    "gemma2": {**_DECODER, "head_dim": 8},
    "gemma3_text": {**_DECODER, "head_dim": 8},
    "mixtral": {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**_DECODER, **_MOE, "num_experts": 4, "shared_expert_intermediate_size": 32},
    "qwen3_moe": {**_DECODER, **_MOE, "num_experts": 4, "head_dim": 8},
    "olmoe": {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2},
    "gpt2": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2),
    "bert": dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
    ),
}


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    if model_type not in TINY_OVERRIDES:
        raise KeyError(f"no tiny config for {model_type!r}; known: {', '.join(sorted(TINY_OVERRIDES))}")
    return AutoConfig.for_model(model_type, **{**TINY_OVERRIDES[model_type], **overrides})


def tiny_model(model_type: str, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny model: causal LM for decoders, ``AutoModel`` for encoders."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    return auto.from_config(config).eval()

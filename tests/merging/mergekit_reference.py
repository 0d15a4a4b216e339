"""mergekit's published configs on tiny models: the models, the configs with paths filled in, and
mergekit 0.1.5's outputs (the reference tensors of ``test_mergekit_configs.py``).

The configs in ``mergekit_configs/`` are mergekit's own (sources in ``mergekit_configs/SOURCES.md``);
only model names (and ``layer_range`` ends) are replaced by tiny models built here from Python's
``random`` (so every torch version builds the same bytes): a 4-layer llama, hidden size 8,
vocabulary 32, in float32 — the base rounded to multiples of 2⁻¹², three fine-tuned variants
(one with many equal |δ| to pin TIES' tie order), one with two added chat tokens, and a LoRA
adapter on the base.

Regenerate the committed references (``mergekit_reference/``) with an interpreter that has
mergekit 0.1.5 (the ``compare`` extra), from the repository root::

    python tests/merging/mergekit_reference.py tests/merging/mergekit_reference

Each config runs as published and with ``dtype: float32`` (when it names another dtype); DARE and
DELLA with ``--random-seed 42``. This file imports mergekit only in ``run_mergekit``.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "mergekit_configs"
REFERENCES = HERE / "mergekit_reference"
SEED = 42  # --random-seed of the runs of random methods
SEEDED = ("05", "10", "16")
LAYERS, HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 4, 8, 16, 32, 2, 1
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]

# Per config: published model name -> role (a folder built by build_models; "base+lora" is mergekit's LoRA form).
ROLES: dict[str, dict[str, str]] = {
    "01": {"psmathur/orca_mini_v3_13b": "ft1", "garage-bAInd/Platypus2-13B": "ft2", "WizardLM/WizardMath-13B-V1.0": "ft3",
           "TheBloke/Llama-2-13B-fp16": "base"},
    "02": {"mistralai/Mistral-7B-Instruct-v0.2": "ft1", "BioMistral/BioMistral-7B": "ft2", "mistralai/Mistral-7B-v0.1": "base"},
    "03": {"psmathur/orca_mini_v3_13b": "ft1", "WizardLM/WizardLM-13B-V1.2": "ft2", "garage-bAInd/Platypus2-13B": "ft3"},
    "04": {"WizardLM/WizardLM-13B-V1.2": "ft1", "garage-bAInd/Platypus2-13B": "ft2", "TheBloke/Llama-2-13B-fp16": "base"},
    "05": {"second-merge": "ft1", "teknium/OpenHermes-2.5-Mistral-7B": "ft2", "mistralai/Mistral-7B-v0.1": "base"},
    "06": {"mistralai/Mistral-7B-v0.1": "base", "BioMistral/BioMistral-7B": "ft1"},
    "07": {"psmathur/orca_mini_v3_13b": "base", "garage-bAInd/Platypus2-13B": "ft1"},
    "08": {"psmathur/orca_mini_v3_13b": "base", "garage-bAInd/Platypus2-13B": "ft1"},
    "09": {"meta-llama/Meta-Llama-3-8B-Instruct": "ft1", "NousResearch/Hermes-2-Pro-Llama-3-8B": "ft_chat",
           "meta-llama/Meta-Llama-3-8B": "base"},
    "10": {"mistralai/Mistral-7B-v0.1": "base", "samir-fama/SamirGPT-v1": "ft1", "abacusai/Slerp-CM-mist-dpo": "ft2",
           "EmbeddedLLM/Mistral-7B-Merge-14-v0.2": "ft3"},
    "11": {"mistralai/Mistral-7B-v0.1": "base", "WizardLM/WizardMath-7B-V1.1": "ft1", "teknium/OpenHermes-2.5-Mistral-7B": "ft2"},
    "12": {"mistralai/Mistral-7B-v0.1": "base", "WizardLM/WizardMath-7B-V1.1": "ft1", "teknium/OpenHermes-2.5-Mistral-7B": "ft2"},
    "13": {"mistralai/Mistral-7B-v0.1": "base", "WizardLM/WizardMath-7B-V1.1": "ft1", "teknium/OpenHermes-2.5-Mistral-7B": "ft2",
           "NousResearch/Hermes-2-Pro-Mistral-7B": "ft3"},
    "14": {"mistralai/Mistral-7B-v0.1": "base", "WizardLM/WizardMath-7B-V1.1": "ft1", "teknium/OpenHermes-2.5-Mistral-7B": "ft2",
           "NousResearch/Hermes-2-Pro-Mistral-7B": "ft3"},
    "15": {"mistralai/Mistral-7B-v0.1": "base", "teknium/OpenHermes-2.5-Mistral-7B": "ft1"},
    "16": {"mistralai/Mistral-7B-v0.1": "base", "WizardLM/WizardMath-7B-V1.1": "ft1", "teknium/OpenHermes-2.5-Mistral-7B": "ft2"},
    "17": {"meta-llama/Meta-Llama-3.1-8B-Instruct+mlabonne/Llama-3-8B-Instruct-abliterated-LORA": "base+lora",
           "meta-llama/Meta-Llama-3.1-8B-Instruct": "base", "NousResearch/Hermes-3-Llama-3.1-8B": "ft2"},
    "18": {"ft1": "ft1", "ft2": "ft2", "ft3": "ft3", "base": "base"},
    "19": {"ft1": "ft1", "ft_chat": "ft_chat", "base": "base"},
}


def config_files() -> list[Path]:
    return sorted(CONFIGS.glob("*.yml"))


# ----------------------------------------------------------------------------------- tiny models
def _shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    head = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (vocab, HIDDEN)
    return shapes


def _tensor(shape: tuple[int, ...], values) -> torch.Tensor:
    return torch.tensor([next(values) for _ in range(math.prod(shape))], dtype=torch.float64).reshape(shape).float()


def _config(vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "dtype": "float32",
    }


def _tokenizer_files(folder: Path, added: list[str], chat_template: str | None) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"tok{i}": i for i in range(3, VOCAB)}}
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, t in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), *enumerate(added, VOCAB)]]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "model_max_length": 64}
    if added:
        config["additional_special_tokens"] = added
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def build_models(root: Path) -> Path:
    """Write the tiny models under ``root`` (once); returns ``root``."""
    if (root / "done").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)

    def gauss(scale: float):
        while True:
            yield rng.gauss(0.0, scale)

    base = {}
    for name, shape in _shapes(VOCAB).items():
        values = (round(v * 4096) / 4096 + (1.0 if len(shape) == 1 else 0.0) for v in gauss(0.05))
        base[name] = _tensor(shape, values)

    def save(role: str, state: dict, vocab: int = VOCAB, added: list[str] | None = None, chat: str | None = None) -> None:
        folder = root / role
        folder.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(_config(vocab), indent=1))
        _tokenizer_files(folder, added or [], chat)

    save("base", base)
    save("ft1", {k: v + _tensor(v.shape, gauss(0.02)) for k, v in base.items()})
    save("ft2", {k: (v + _tensor(v.shape, gauss(0.03)) if v.dim() == 2 else v.clone()) for k, v in base.items()})
    steps = (rng.randint(-3, 3) * 2**-9 for _ in iter(int, 1))
    save("ft3", {k: v + _tensor(v.shape, steps) for k, v in base.items()})
    chat = {k: v + _tensor(v.shape, gauss(0.02)) for k, v in base.items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        chat[key] = torch.cat([chat[key], _tensor((2, HIDDEN), gauss(0.05))])
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    save("ft_chat", chat, VOCAB + 2, CHAT_TOKENS, template)

    lora = root / "lora"
    lora.mkdir(exist_ok=True)
    head = HIDDEN // HEADS
    factors = {}
    for i in range(LAYERS):
        for module, rows in (("q_proj", HIDDEN), ("v_proj", KV_HEADS * head)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            factors[f"{prefix}.lora_A.weight"] = _tensor((2, HIDDEN), gauss(0.1))
            factors[f"{prefix}.lora_B.weight"] = _tensor((rows, 2), gauss(0.1))
    save_file(factors, str(lora / "adapter_model.safetensors"), metadata={"format": "pt"})
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False, "base_model_name_or_path": str(root / "base"),
        "inference_mode": True,
    }, indent=1))
    (root / "done").write_text("ok\n")
    return root


# ----------------------------------------------------------------------------------- configs
def resolve(config: Path, models: Path) -> str:
    """The config's text with its model names replaced by tiny-model folders (nothing else changed)."""
    roles = ROLES[config.name[:2]]
    text = config.read_text()

    def path_of(role: str) -> str:
        return "+".join(str(models / part) for part in role.split("+"))

    for name in sorted(roles, key=len, reverse=True):  # "X+Y" before "X"
        text = re.sub(rf"(?<![\w./+-]){re.escape(name)}(?![\w./+-])", path_of(roles[name]), text)
    return re.sub(r"layer_range: \[0, \d+\]", f"layer_range: [0, {LAYERS}]", text)


def half_dtype(config: Path) -> str | None:
    """The config's dtype when it is not float32 (then it also runs in float32)."""
    dtype = yaml.safe_load(config.read_text()).get("dtype")
    return dtype if dtype not in (None, "float32") else None


def variants(config: Path) -> list[str]:
    return ["published", "fp32"] if half_dtype(config) else ["published"]


def variant_text(config: Path, models: Path, variant: str) -> str:
    text = resolve(config, models)
    if variant == "fp32":
        doc = yaml.safe_load(text)
        doc["dtype"] = "float32"
        doc.pop("out_dtype", None)
        text = yaml.safe_dump(doc, sort_keys=False)
    return text


def reference_name(config: Path, variant: str) -> str:
    return f"{config.stem}.{variant}.safetensors"


# ----------------------------------------------------------------------------------- mergekit
def run_mergekit(out: Path, only: list[str] | None = None) -> None:
    """Every config through mergekit (this interpreter must have mergekit 0.1.5); the merged
    tensors of each run saved as ``out/<config>.<variant>.safetensors`` plus ``manifest.json``."""
    import tempfile
    from importlib.metadata import version

    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mergekit-reference-"))
    models = build_models(work / "models")
    manifest = {"mergekit": version("mergekit"), "torch": torch.__version__, "runs": {}}
    for config in config_files():
        if only and config.name[:2] not in only:
            continue
        for variant in variants(config):
            text = variant_text(config, models, variant)
            target = work / "runs" / f"{config.stem}.{variant}"
            seed = SEED if config.name[:2] in SEEDED else None
            options = MergeOptions(lora_merge_cache=str(work / "lora-cache"), random_seed=seed, quiet=True)
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(target), options, config_source=text)
            tensors = {}
            for shard in sorted(target.glob("*.safetensors")):
                tensors.update(load_file(str(shard)))
            save_file(dict(sorted(tensors.items())), str(out / reference_name(config, variant)))
            manifest["runs"][reference_name(config, variant)] = {"config": config.name, "variant": variant, "seed": seed}
            print(f"{config.stem:45s} {variant:9s} ok", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    run_mergekit(Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCES, sys.argv[2:] or None)

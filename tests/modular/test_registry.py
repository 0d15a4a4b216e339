import pytest
import torch
from torch import nn

from modular import ArchitectureSpec, architecture_of, register_architecture
from modular.registry import UnknownArchitectureError, get_architecture_spec
from modular.testing import tiny_config

from ..conftest import BUILTIN_ARCHITECTURES, MOE_ARCHITECTURES

REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}


def test_required_families_are_registered():
    assert REQUIRED <= set(BUILTIN_ARCHITECTURES)
    assert {"gemma2", "gemma3_text"} & set(BUILTIN_ARCHITECTURES)


@pytest.mark.parametrize("model_type", BUILTIN_ARCHITECTURES)
def test_every_registered_family_builds_runs_and_is_fully_described(model_type, tiny, input_ids):
    model = tiny(model_type)
    arch = architecture_of(model)
    assert arch.num_layers == 2
    assert len(arch.layer_names) == 2
    for name, layer in zip(arch.layer_names, arch.layers):
        assert model.get_submodule(name) is layer

    ffns = arch.feed_forwards()
    assert len(ffns) == 2
    if model_type in MOE_ARCHITECTURES:
        assert len(arch.moe_blocks()) == 2 and arch.mlps() == []
        for (name, router), (_, experts) in zip(arch.routers(), arch.experts()):
            assert model.get_submodule(name) is router
            assert isinstance(router.weight, nn.Parameter)
            assert experts.gate_up_proj.dim() == 3  # HF v5 fused experts
    else:
        assert len(arch.mlps()) == 2 and arch.moe_blocks() == []
        assert arch.routers() == []

    assert isinstance(arch.input_embeddings, nn.Embedding)
    roles = arch.parameter_roles()
    assert set(roles) == {n for n, _ in model.named_parameters()}
    assert {"embeddings", "layers.0", "layers.1"} <= set(roles.values())
    for name, role in roles.items():
        if role.startswith("layers."):
            assert name.startswith(arch.layer_names[int(role.split(".")[1])] + ".")
    if model_type == "bert":
        assert arch.output_head is None and len(arch.mlp_outputs()) == 2
    else:
        assert ("head" in roles.values()) != arch.embeddings_tied
    with torch.no_grad():
        out = model(input_ids)
    assert torch.isfinite(out[0]).all()


def test_tied_embeddings_are_detected(tiny):
    assert architecture_of(tiny("gemma2")).embeddings_tied
    assert not architecture_of(tiny("llama")).embeddings_tied
    tied = architecture_of(tiny("llama", tie_word_embeddings=True))
    assert tied.embeddings_tied
    assert "head" not in tied.parameter_roles().values()


def test_unknown_model_type_names_it_and_points_to_register_architecture(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.config.model_type = "my_llama"  # an instance attribute, as a custom family would have
    with pytest.raises(UnknownArchitectureError, match="'my_llama'.*register_architecture"):
        architecture_of(model)


def test_register_architecture_for_a_custom_family(tiny):
    model = tiny("llama")
    model.config.model_type = "custom_llama_for_registry_test"
    register_architecture("custom_llama_for_registry_test", ArchitectureSpec(layers="layers", mlp="mlp"))
    assert len(architecture_of(model).mlps()) == 2
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("custom_llama_for_registry_test", ArchitectureSpec(layers="blocks"))


def test_spec_with_a_wrong_path_says_which(tiny):
    model = tiny("llama")
    model.config.model_type = "broken_for_registry_test"
    register_architecture("broken_for_registry_test", ArchitectureSpec(layers="blocks"))
    with pytest.raises(AttributeError, match="'blocks'"):
        architecture_of(model)


def test_spec_requires_router_and_experts_together():
    with pytest.raises(ValueError, match="router"):
        ArchitectureSpec(layers="layers", router="gate")
    assert get_architecture_spec("mixtral").has_moe

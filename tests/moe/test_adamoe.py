"""AdaMoE injection: no-op parity, starting loss, router weights by hand, recording, bad input."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modular.registry import UnknownArchitectureError, architecture_of
from moe import AdaMoEConfig, inject_adamoe, routing_stats, upcycle_to_moe
from moe.router import is_adamoe_router
from tests.conftest import MOE_ARCHITECTURES


def _loss(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


@pytest.mark.parametrize("model_type", MOE_ARCHITECTURES)
def test_zero_nulls_same_top_k_is_a_no_op(model_type, tiny, input_ids):
    model = tiny(model_type)
    original_routers = [type(r) for _, r in architecture_of(model).routers()]
    with torch.no_grad():
        expected = model(input_ids).logits
    targets = inject_adamoe(model, AdaMoEConfig(num_null_experts=0, extra_top_k=0))
    routers = architecture_of(model).routers()
    assert [n for n, _ in routers] == targets
    assert all(is_adamoe_router(r) and isinstance(r, cls) for (_, r), cls in zip(routers, original_routers))
    assert model.config._experts_implementation == "modular"
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("model_type", MOE_ARCHITECTURES)
def test_anchored_nulls_start_at_the_original_logits_and_routing(model_type, tiny, input_ids):
    model = tiny(model_type)
    with torch.no_grad():
        expected = model(input_ids).logits
    inject_adamoe(model, AdaMoEConfig(weighting="renormalized"))  # m = 16, k' = k + 2 = 4
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, expected, atol=1e-5)
    for layer in routing_stats(model):
        assert layer["experts_per_token"] == 2.0  # the original k true experts, plus 2 null picks
        assert layer["null_share"] == 0.5
        assert sum(layer["expert_load"]) == pytest.approx(0.5)


@pytest.mark.parametrize("model_type", MOE_ARCHITECTURES)
def test_defaults_keep_the_original_experts_and_add_two_null_picks(model_type, tiny, input_ids):
    model = tiny(model_type)
    with torch.no_grad():
        model(input_ids)
    original = [r.top_k for _, r in architecture_of(model).routers()]
    inject_adamoe(model)  # softmax weighting: the nulls share the normalisation, so the start is close, not exact
    assert [r.top_k for _, r in architecture_of(model).routers()] == [k + 2 for k in original]
    with torch.no_grad():
        model(input_ids)
    assert all(layer["experts_per_token"] == 2.0 for layer in routing_stats(model))


@pytest.mark.parametrize("model_type", ["olmoe", "qwen3_moe"])
def test_k8_families_keep_all_eight_experts(model_type, tiny, input_ids):
    """Regression (issue 17): a fixed default k' = 4 halved the experts of k = 8 families."""
    model = tiny(model_type, num_experts=12, num_experts_per_tok=8)
    with torch.no_grad():
        expected = model(input_ids).logits
    inject_adamoe(model, AdaMoEConfig(weighting="renormalized"))
    assert all(r.top_k == 10 for _, r in architecture_of(model).routers())
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, expected, atol=1e-5)
    assert all(layer["experts_per_token"] == 8.0 for layer in routing_stats(model))
    with pytest.raises(ValueError, match=r"top_k=4 is below the model's own top-k 8 at model.layers.0.mlp.gate"):
        inject_adamoe(tiny(model_type, num_experts=12, num_experts_per_tok=8), AdaMoEConfig(top_k=4))


def test_official_init_clones_gate_rows_and_uses_fewer_experts(tiny, input_ids):
    model = tiny("mixtral")
    inject_adamoe(model, AdaMoEConfig(null_logit_init="repeat_gate", num_null_experts=8))
    router = architecture_of(model).routers()[0][1]
    assert torch.equal(router.null_weight, router.weight.repeat(2, 1))
    with torch.no_grad():
        model(input_ids)
    # each true logit has two null clones: the best expert and its clones take 3 of 4 slots
    assert all(s["experts_per_token"] < 2.0 for s in routing_stats(model))


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_weights_and_sentinel_by_hand(renormalize, tiny):
    model = tiny("qwen3_moe", norm_topk_prob=renormalize)  # 4 true experts
    inject_adamoe(model, AdaMoEConfig(num_null_experts=2, top_k=3, null_logit_init="repeat_gate", weighting="renormalized"))
    router = architecture_of(model).routers()[0][1]
    with torch.no_grad():  # hidden = e_0 makes the logits the first weight column
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor([3.0, 1.0, 2.0, 0.0])
        router.null_weight.zero_()
        router.null_weight[:, 0] = torch.tensor([2.5, -5.0])
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    logits, weights, indices = router(x)
    assert logits.shape == (1, 6)
    # top-3 of [3, 1, 2, 0 | 2.5, -5]: expert 0, null 0 (-> sentinel 4), expert 2
    assert indices.tolist() == [[0, 4, 2]]
    p = torch.softmax(torch.tensor([3.0, 1.0, 2.0, 0.0]), 0)  # weights come from the true logits only
    expected = torch.stack([p[0], torch.tensor(0.0), p[2]])
    if renormalize:
        expected = expected / (p[0] + p[2])
    assert torch.allclose(weights[0], expected, atol=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_weighting_by_hand(renormalize, tiny):
    model = tiny("qwen3_moe", norm_topk_prob=renormalize)  # 4 true experts
    inject_adamoe(model, AdaMoEConfig(num_null_experts=2, top_k=3, weighting="softmax"))
    router = architecture_of(model).routers()[0][1]
    with torch.no_grad():  # hidden = e_0 makes the logits the first weight column; no anchor on null_bias
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor([3.0, 1.0, 2.0, 0.0])
        router.null_weight.zero_()
        router.null_weight[:, 0] = torch.tensor([2.5, -5.0])
    router.anchor_rank = None  # logits exactly [3, 1, 2, 0 | 2.5, -5]
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    _, weights, indices = router(x)
    assert indices.tolist() == [[0, 4, 2]]
    e = torch.exp(torch.tensor([3.0, 1.0, 2.0, 0.0, 2.5, -5.0]))
    p = e / e.sum()  # softmax over all n + m experts
    if renormalize:  # over the three picks, the null included; the null then outputs nothing
        expected = torch.stack([p[0], torch.tensor(0.0), p[2]]) / (p[0] + p[4] + p[2])
    else:
        expected = torch.stack([p[0], torch.tensor(0.0), p[2]])
    assert torch.allclose(weights[0], expected, atol=1e-6)


def test_softmax_weighting_lets_the_lm_loss_reach_the_null_logits(tiny, input_ids):
    model = tiny("mixtral")
    inject_adamoe(model, AdaMoEConfig(num_null_experts=4, top_k=3, weighting="softmax"))
    model(input_ids, labels=input_ids).loss.backward()
    assert model.model.layers[0].mlp.gate.null_bias.grad.abs().sum() > 0


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_softmax_weighting_with_zero_nulls_is_a_no_op(model_type, tiny, input_ids):
    model = tiny(model_type)
    with torch.no_grad():
        expected = model(input_ids).logits
    inject_adamoe(model, AdaMoEConfig(num_null_experts=0, extra_top_k=0, weighting="softmax"))
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, expected, atol=1e-5)


def test_token_with_only_null_picks_gets_zero_moe_output(tiny):
    model = tiny("mixtral")
    inject_adamoe(model, AdaMoEConfig(num_null_experts=2, top_k=2))
    block = architecture_of(model).moe_blocks()[0][1]
    with torch.no_grad():
        block.gate.null_bias.fill_(100.0)  # nulls outrank every true expert
    out = block(torch.randn(1, 3, 32))
    assert torch.equal(out, torch.zeros_like(out))


def test_base_model_records_all_router_logits(tiny, input_ids):
    model = tiny("olmoe")
    inject_adamoe(model, AdaMoEConfig(num_null_experts=3, top_k=2))
    recorded = model.model(input_ids, output_router_logits=True).router_logits
    assert len(recorded) == 2 and recorded[0].shape == (input_ids.numel(), 4 + 3)


def test_only_selected_layers(tiny):
    model = tiny("mixtral")
    assert inject_adamoe(model, AdaMoEConfig(layers=[1])) == ["model.layers.1.mlp.gate"]
    assert not is_adamoe_router(model.model.layers[0].mlp.gate)


@pytest.mark.parametrize(
    "make_config,match",
    [
        (lambda: AdaMoEConfig(num_null_experts=-1), "num_null_experts must be an integer >= 0"),
        (lambda: AdaMoEConfig(top_k=0), "top_k must be an integer >= 1"),
        (lambda: AdaMoEConfig(extra_top_k=-1), "extra_top_k must be an integer >= 0 or None, got -1"),
        (lambda: AdaMoEConfig(top_k=4, extra_top_k=2), "set top_k .* or extra_top_k .*, not both"),
        (lambda: AdaMoEConfig(aux_loss_coef=-1.0), "aux_loss_coef must be >= 0"),
        (lambda: AdaMoEConfig(null_logit_init="zeros"), "null_logit_init must be one of anchored, repeat_gate"),
        (lambda: AdaMoEConfig(experts_implementation="grouped_mm"), "experts_implementation must be one of"),
        (lambda: AdaMoEConfig(weighting="sparse"), "weighting must be one of renormalized, softmax"),
    ],
)
def test_bad_config_values(make_config, match):
    with pytest.raises(ValueError, match=match):
        make_config()


def test_bad_injections(tiny):
    with pytest.raises(ValueError, match="no MoE blocks.*upcycle_to_moe"):
        inject_adamoe(tiny("llama"))
    with pytest.raises(ValueError, match="top_k=7 is larger than the 4 true \\+ 2 null experts"):
        inject_adamoe(tiny("mixtral"), AdaMoEConfig(num_null_experts=2, top_k=7))
    with pytest.raises(ValueError, match="k \\+ extra_top_k = 5 is larger than the 4 true \\+ 0 null experts"):
        inject_adamoe(tiny("mixtral"), AdaMoEConfig(num_null_experts=0, extra_top_k=3))
    with pytest.raises(ValueError, match=r"layers: \[5\] are not MoE layers"):
        inject_adamoe(tiny("mixtral"), AdaMoEConfig(layers=[5]))
    with pytest.raises(ValueError, match="output_router_logits"):
        inject_adamoe(tiny("mixtral", output_router_logits=True))
    model = tiny("olmoe")
    inject_adamoe(model)
    with pytest.raises(ValueError, match="already has AdaMoE routers"):
        inject_adamoe(model)
    neox = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt_neox", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=64, vocab_size=128)
    )
    with pytest.raises(UnknownArchitectureError, match="gpt_neox"):
        inject_adamoe(neox)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_upcycled_model_computes_the_dense_logits(model_type, tiny, input_ids):
    dense = tiny(model_type)
    with torch.no_grad():
        expected = dense(input_ids).logits
    moe = upcycle_to_moe(dense, num_experts=4, top_k=2)
    assert moe.config.model_type == architecture_of(dense).spec.moe_model_type
    with torch.no_grad():
        assert torch.allclose(moe(input_ids).logits, expected, atol=1e-5)
    inject_adamoe(moe, AdaMoEConfig(num_null_experts=4, top_k=3, weighting="renormalized"))
    with torch.no_grad():
        assert torch.allclose(moe(input_ids).logits, expected, atol=1e-5)


def test_upcycle_noise_and_bad_input(tiny):
    dense = tiny("llama")
    experts = upcycle_to_moe(dense, num_experts=3, top_k=1, noise_std=0.01).model.layers[0].mlp.experts
    assert not torch.equal(experts.down_proj[0], experts.down_proj[1])
    assert (experts.down_proj[0] - dense.model.layers[0].mlp.down_proj.weight).abs().max() < 0.1
    with pytest.raises(ValueError, match="no MoE family for 'mixtral'"):
        upcycle_to_moe(tiny("mixtral"))
    with pytest.raises(ValueError, match=r"UpcycleConfig.top_k must be an integer in \[1, num_experts=2\], got 3"):
        upcycle_to_moe(dense, num_experts=2, top_k=3)

"""Experts blocks in dense FFNs (``moe.ffn_experts``): exactness, hand computations, AdaMoE on them,
the experts implementations, save / load, and bad input."""

import pytest
import torch
import torch.nn.functional as F

from modular import load_model
from modular.acm import ACMConfig, acmize
from modular.acm.sites import find_ffn_sites
from modular.injections import InjectionError, get_injection
from modular.registry import architecture_of
from moe import (
    AdaMoEConfig,
    FFNExpertsConfig,
    adamoe_aux_loss,
    ffn_experts_blocks,
    inject_adamoe,
    inject_ffn_experts,
    routing_stats,
)
from moe.ffn_experts import FFNExpertsBlock, balanced_clusters, set_experts_implementation
from tests.conftest import BUILTIN_ARCHITECTURES, MOE_ARCHITECTURES

DENSE = [m for m in BUILTIN_ARCHITECTURES if m not in MOE_ARCHITECTURES]


def _calibration(ids):
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def _out(model, ids):
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("model_type", DENSE)
def test_split_with_every_expert_picked_is_the_dense_model(model_type, tiny, input_ids):
    model = tiny(model_type)
    expected = _out(model, input_ids)
    logs = inject_ffn_experts(model, FFNExpertsConfig(num_experts=4, top_k=None), _calibration(input_ids))
    arch = architecture_of(model)
    assert len(arch.moe_blocks()) == 2 and arch.mlps() == [] and len(arch.routers()) == 2
    assert all(isinstance(block, FFNExpertsBlock) for _, block in arch.moe_blocks())
    width = find_ffn_sites(tiny(model_type))[0].intermediate_size // 4  # 64 (GPT-2: 4 · 32 = 128) in 4 equal slices
    assert [log["expert_sizes"] for log in logs] == [[width] * 4] * 2
    assert torch.allclose(_out(model, input_ids), expected, atol=1e-5)
    assert set(architecture_of(model).parameter_roles().values()) >= {"layers.0", "layers.1"}


@pytest.mark.parametrize("model_type", DENSE)
def test_upcycled_copies_equal_the_dense_model_for_any_routing(model_type, tiny, input_ids):
    model = tiny(model_type)
    expected = _out(model, input_ids)
    inject_ffn_experts(model, FFNExpertsConfig(num_experts=4, top_k=2, mode="upcycle", layers=[1]))
    assert [n for n, _ in ffn_experts_blocks(model)] == [architecture_of(model).layer_names[1] + "." + architecture_of(model).spec.mlp]
    assert torch.allclose(_out(model, input_ids), expected, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_split_top_k_is_the_ffn_restricted_to_the_picked_slices(model_type, tiny, input_ids):
    """Hand computation: sum over the picked experts of act(x W_in[slice]) W_out[slice], + the output bias."""
    model = tiny(model_type)
    site = find_ffn_sites(model)[0]
    x = torch.randn(5, site.w_in.shape[1], generator=torch.Generator().manual_seed(3))
    inject_ffn_experts(model, FFNExpertsConfig(num_experts=4, top_k=2, layers=[0]), _calibration(input_ids))
    block = ffn_experts_blocks(model)[0][1]
    with torch.no_grad():
        got = block(x)
        picks = (x @ block.router.weight.T).topk(2, -1).indices
        experts = block.experts
        expected = []
        for t in range(len(x)):
            y = torch.zeros(x.shape[1])
            for e in picks[t].tolist():
                up = experts.gate_up_proj[e] if experts.has_gate else experts.up_proj[e]
                h = x[t] @ up.T
                if experts.has_bias:
                    h = h + experts.up_proj_bias[e]
                h = (site.act_fn(h[:16]) * h[16:]) if experts.has_gate else site.act_fn(h)
                y = y + experts.down_proj[e] @ h
            expected.append(y + (block.output_bias if block.output_bias is not None else 0))
        # the slices are the dense FFN's own neurons: all four picked give the dense FFN
        whole = sum(experts.down_proj[e] @ ((site.act_fn((x @ (experts.gate_up_proj[e] if experts.has_gate else experts.up_proj[e]).T)[:, :16])
                                             * (x @ experts.gate_up_proj[e].T)[:, 16:]).T if experts.has_gate
                                            else site.act_fn(x @ experts.up_proj[e].T + experts.up_proj_bias[e]).T) for e in range(4))
        dense = site.hidden(x) @ site.w_out + (0 if site.b_out is None else site.b_out)
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)
    assert torch.allclose(whole.T + (0 if block.output_bias is None else block.output_bias), dense, atol=1e-5)


def test_balanced_clusters_recover_planted_groups():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    rows = torch.cat([centres[c] + torch.randn(6, 4, generator=generator) * 0.1 for c in (2, 0, 3, 1)])
    assign = balanced_clusters(rows, 4, 5, torch.Generator().manual_seed(1))
    assert torch.bincount(assign).tolist() == [6, 6, 6, 6]
    for group in range(4):  # each planted group of 6 rows lands in one cluster
        assert len(set(assign[group * 6 : group * 6 + 6].tolist())) == 1


def test_router_is_the_ridge_fit_of_the_expert_output_norms(tiny, input_ids):
    model = tiny("bert")
    site = find_ffn_sites(model)[0]
    from modular.acm.calibration import cache_ffn_io

    x, _ = cache_ffn_io(model, site, _calibration(input_ids))
    config = FFNExpertsConfig(num_experts=4, top_k=2, layers=[0], router_ridge=0.1)
    inject_ffn_experts(model, config, _calibration(input_ids))
    block = ffn_experts_blocks(model)[0][1]
    with torch.no_grad():
        norms = torch.stack([(F.gelu(x @ block.experts.up_proj[e].T + block.experts.up_proj_bias[e]) @ block.experts.down_proj[e].T).norm(dim=-1)
                             for e in range(4)], 1)
        gram = x.T @ x
        ridge = 0.1 * gram.diagonal().mean() * torch.eye(gram.shape[0])
        expected = torch.linalg.solve(gram + ridge, x.T @ norms).T
    assert torch.allclose(block.router.weight, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("model_type", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("impl", ["modular", pytest.param("megablocks", marks=pytest.mark.gpu)])
def test_implementations_match_eager_with_null_picks(model_type, impl, tiny, input_ids):
    if impl == "megablocks":
        pytest.importorskip("megablocks", reason="megablocks not installed (pip install 'modular-llm[megablocks]')")
    model = tiny(model_type)
    inject_ffn_experts(model, FFNExpertsConfig(num_experts=4, top_k=2), _calibration(input_ids))
    inject_adamoe(model, AdaMoEConfig(num_null_experts=4, top_k=3, null_logit_init="repeat_gate"))
    results = {}
    for name in ("eager", impl):
        set_experts_implementation(model, name)
        assert all(block.experts.config._experts_implementation == name for _, block in ffn_experts_blocks(model))
        model.zero_grad()
        out = model(input_ids)[0]
        out.pow(2).mean().backward()
        results[name] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert any(s["null_share"] > 0 for s in routing_stats(model))
    assert torch.allclose(results["eager"][0], results[impl][0], atol=1e-5)
    for name, grad in results["eager"][1].items():
        assert torch.allclose(results[impl][1][name], grad, atol=1e-5), name


@pytest.mark.parametrize("model_type", ["bert", "qwen3"])
def test_adamoe_on_the_blocks(model_type, tiny, input_ids):
    model = tiny(model_type)
    inject_ffn_experts(model, FFNExpertsConfig(num_experts=4, top_k=2), _calibration(input_ids))
    expected = _out(model, input_ids)
    targets = inject_adamoe(model, AdaMoEConfig(num_null_experts=4, top_k=2, layers=[1]))
    assert targets == [architecture_of(model).routers()[1][0]]
    assert torch.allclose(_out(model, input_ids), expected, atol=1e-5)  # anchored nulls: the same picks at init
    stats = routing_stats(model)
    assert len(stats) == 1 and stats[0]["experts_per_token"] == 2.0
    model.train()
    model(input_ids)[0].sum().backward()  # the straight-through weights give the router a gradient
    assert adamoe_aux_loss(model) is not None
    assert architecture_of(model).routers()[0][1].weight.grad.abs().sum() > 0


def test_save_and_load_rebuild_experts_acm_and_adamoe(tiny, input_ids, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny("bert")
    inject_ffn_experts(model, FFNExpertsConfig(num_experts=4, top_k=2, layers=[1]), _calibration(input_ids))
    acmize(model, ACMConfig(num_learners=4, distill_steps=2, gate_steps=2), _calibration(input_ids), progress=False)
    inject_adamoe(model, AdaMoEConfig(num_null_experts=4, top_k=2))
    expected = _out(model.eval(), input_ids)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert [r["kind"] for r in loaded.config.modular_injections] == ["ffn_experts", "acm", "adamoe"]
    assert torch.equal(_out(loaded, input_ids), expected)
    classifier = load_model(tmp_path / "m", model_class=AutoModelForSequenceClassification, num_labels=3)
    assert classifier.config.num_labels == 3 and classifier.classifier.out_features == 3
    assert torch.equal(_out(classifier.eval().bert, input_ids), expected)


def test_the_injection_kind_is_registered_and_checked():
    kind = get_injection("ffn_experts")
    assert kind.config_class is FFNExpertsConfig and kind.needs_calibration
    assert kind.config({"num_experts": 2, "top_k": 1}).experts_per_token == 1


def test_compute_accounting():
    config = FFNExpertsConfig(num_experts=4, top_k=2)
    from modular.testing import tiny_model

    model = tiny_model("llama")
    inject_ffn_experts(model, config, _calibration(torch.randint(3, 100, (2, 8))))
    block = ffn_experts_blocks(model)[0][1]
    assert block.dense_flops_per_token() == 2 * 32 * 64 * 3
    assert 4 * block.expert_flops_per_token() == block.dense_flops_per_token()
    assert block.router_flops_per_token() == 2 * 32 * 4
    inject_adamoe(model, AdaMoEConfig(num_null_experts=6, top_k=2))
    assert block.router_flops_per_token() == 2 * 32 * 10


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(num_experts=5), "num_experts=5 does not divide the intermediate size 64"),
        (dict(layers=[7]), r"layers: \[7\] are not layers"),
    ],
)
def test_bad_input(config, match, tiny, input_ids):
    with pytest.raises((ValueError, InjectionError), match=match):
        inject_ffn_experts(tiny("llama"), FFNExpertsConfig(**config), _calibration(input_ids))


def test_bad_settings_and_targets(tiny, input_ids):
    with pytest.raises(ValueError, match="top_k must be None or an integer in"):
        FFNExpertsConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="mode must be one of split, upcycle"):
        FFNExpertsConfig(mode="copy")
    with pytest.raises(ValueError, match="mode 'split' clusters the FFN's neurons on calibration data"):
        inject_ffn_experts(tiny("llama"), FFNExpertsConfig())
    with pytest.raises(InjectionError, match="no dense FFN"):
        inject_ffn_experts(tiny("mixtral"), FFNExpertsConfig(mode="upcycle"))
    with pytest.raises(ValueError, match="moe.inject_ffn_experts"):
        inject_adamoe(tiny("llama"), AdaMoEConfig())

"""The experts implementations against HF eager, with null (sentinel) picks present."""

import pytest
import torch

import moe  # noqa: F401  (registers the implementations)
from modular.registry import architecture_of
from moe import AdaMoEConfig, inject_adamoe
from tests.conftest import MOE_ARCHITECTURES


def _run(experts, impl, hidden, index, weights):
    experts.config._experts_implementation = impl
    hidden = hidden.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    experts.zero_grad()
    out = experts(hidden, index, weights)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return [out, hidden.grad, weights.grad] + [p.grad.clone() for p in experts.parameters()]


@pytest.mark.parametrize("model_type", MOE_ARCHITECTURES)
@pytest.mark.parametrize("impl", ["modular", pytest.param("megablocks", marks=pytest.mark.gpu)])
def test_experts_match_eager_forward_and_backward_with_nulls(model_type, impl, tiny):
    device = "cpu"
    if impl == "megablocks":
        pytest.importorskip("megablocks", reason="megablocks not installed (pip install 'modular-llm[megablocks]')")
        device = "cuda"
    experts = architecture_of(tiny(model_type)).experts()[0][1].to(device)
    n, tokens = experts.num_experts, 40
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, 32, generator=g).to(device)
    index = torch.randint(0, n + 1, (tokens, 3), generator=g)  # n is the sentinel: about 1 pick in 5
    index[0] = n  # a token with only null picks
    index[1, :2] = 1  # the same expert twice for one token
    assert (index == n).any()
    weights = torch.rand(tokens, 3, generator=g).to(device)
    expected = _run(experts, "eager", hidden, index.to(device), weights)
    for got, want in zip(_run(experts, impl, hidden, index.to(device), weights), expected):
        assert torch.allclose(got, want, atol=1e-5)
    assert not expected[0][0].any()  # eager skipped the all-null token too


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_injected_model_modular_equals_eager(model_type, tiny, input_ids):
    model = tiny(model_type)
    inject_adamoe(model, AdaMoEConfig(num_null_experts=4, top_k=3, null_logit_init="repeat_gate"))
    results = {}
    for impl in ("eager", "modular"):
        model.set_experts_implementation(impl)
        model.zero_grad()
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(results["eager"][0], results["modular"][0], atol=1e-6)
    assert results["eager"][1].keys() == results["modular"][1].keys()
    for name, grad in results["eager"][1].items():
        assert torch.allclose(results["modular"][1][name], grad, atol=1e-5), name

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


def _with_nulls(experts, tokens=40, dtype=torch.float32, device="cpu"):
    n = experts.num_experts
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, experts.hidden_dim, generator=g)
    index = torch.randint(0, n + 1, (tokens, 3), generator=g)
    index[0] = n  # only null picks
    index[1, :2] = 1
    return hidden.to(device, dtype), index.to(device), torch.rand(tokens, 3, generator=g).to(device, dtype)


@pytest.mark.parametrize("model_type", MOE_ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sync_free_path_matches_eager_with_nulls(model_type, dtype, tiny):
    # The CUDA path (sorted pairs, on-device offsets, torch's grouped matmul, masked null rows) runs on
    # the CPU too: same forward and gradients as eager. bf16: eager adds the top-k contributions in
    # bf16, this path in fp32, so they differ by about one bf16 rounding of the output.
    from moe.experts import _experts_forward_on_device

    experts = architecture_of(tiny(model_type)).experts()[0][1].to(dtype)
    hidden, index, weights = _with_nulls(experts, dtype=dtype)

    def run(forward):
        h, w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
        experts.zero_grad()
        out = forward(h, w)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(dtype))
        return [out, h.grad, w.grad] + [p.grad.clone() for p in experts.parameters()]

    experts.config._experts_implementation = "eager"
    expected = run(lambda h, w: experts(h, index, w))
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
    for got, want in zip(run(lambda h, w: _experts_forward_on_device(experts, h, index, w)), expected):
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).abs().max() <= tolerance * max(1.0, want.float().abs().max().item())


def test_megablocks_gets_bf16_and_hands_back_the_input_dtype(monkeypatch, tiny):
    # megablocks' kernels are bf16-only: a stand-in grouped GEMM that refuses anything else.
    import moe.experts as experts_module

    def gmm(x, weight, batch_sizes, trans_b):
        assert x.dtype == weight.dtype == torch.bfloat16 and batch_sizes.device.type == "cpu"
        rows = torch.split(x, batch_sizes.tolist())
        return torch.cat([r @ (w.t() if trans_b else w) for r, w in zip(rows, weight)])

    monkeypatch.setattr(experts_module, "_megablocks_gmm", lambda: gmm)
    experts = architecture_of(tiny("mixtral")).experts()[0][1]
    hidden, index, weights = _with_nulls(experts)
    experts.config._experts_implementation = "eager"
    want = experts(hidden, index, weights)
    got = experts_module.megablocks_experts_forward(experts, hidden, index, weights)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 2 ** -7 * want.abs().max()  # bf16 inputs, weights and products


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_modular_on_cuda_bf16_has_no_host_sync(model_type, tiny):
    experts = architecture_of(tiny(model_type)).experts()[0][1].to("cuda", torch.bfloat16)
    hidden, index, weights = _with_nulls(experts, dtype=torch.bfloat16, device="cuda")
    hidden.requires_grad_()
    experts.config._experts_implementation = "modular"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host read raises
    try:
        out = experts(hidden, index, weights)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = architecture_of(tiny(model_type)).experts()[0][1].to("cuda", torch.bfloat16).float()
    reference.config._experts_implementation = "eager"
    want = reference(hidden.detach().float(), index, weights.float())
    assert (out.float() - want).norm() <= 4 * 2 ** -8 * want.norm()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_expert_mlps_equal_the_layer_by_layer_computation_bit_for_bit(transposed, frozen):
    # Rows sorted by expert, expert 1 without rows; biases; gated activation. Reference: plain
    # autograd through each projection over all rows (one matmul per expert, then the gathered
    # bias), the activation over all rows: what the experts path computed before it ran one expert
    # at a time. One thread: autograd's accumulation of a gathered bias is not deterministic on
    # more. Frozen weights (LISA) get no gradient, x still does.
    from moe.experts import _ExpertMLPs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    counts, hidden, ffn = [3, 0, 5], 6, 4
    expert_of_pair = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    x = torch.randn(sum(counts), hidden, generator=g)
    up, down = torch.randn(3, 2 * ffn, hidden, generator=g), torch.randn(3, hidden, ffn, generator=g)
    up_b, down_b = torch.randn(3, 2 * ffn, generator=g), torch.randn(3, hidden, generator=g)
    grad_out = torch.randn(sum(counts), hidden, generator=g)

    def gated(h):
        gate, value = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * value

    def leaves():
        return [t.clone().requires_grad_(not frozen or i == 0) for i, t in enumerate((x, up, up_b, down, down_b))]

    def projection(rows, weight, bias):
        return torch.cat([r @ weight[e].t() for e, r in enumerate(rows.split(counts))]) + bias[expert_of_pair]

    ref = leaves()
    want = projection(gated(projection(ref[0], ref[1], ref[2])), ref[3], ref[4])
    want.backward(grad_out)
    got_leaves = leaves()
    layout = (lambda w: w.transpose(1, 2).contiguous()) if transposed else (lambda w: w)
    got = _ExpertMLPs.apply(got_leaves[0], layout(got_leaves[1]), got_leaves[2], layout(got_leaves[3]), got_leaves[4],
                            counts, expert_of_pair, transposed, gated)
    got.backward(grad_out)
    torch.set_num_threads(threads)

    def same(a, b, exact):  # the (E, in, out) layout runs other matmul kernels: equal up to rounding
        return torch.equal(a, b) if exact and not transposed else torch.allclose(a, b, atol=1e-6)

    assert same(got, want, exact=True)
    assert same(got_leaves[0].grad, ref[0].grad, exact=False)  # autograd's mm backward picks its own kernel
    for r, leaf in zip(ref[1:], got_leaves[1:]):
        assert (r.grad is None) == (leaf.grad is None) == frozen
        assert frozen or same(leaf.grad, r.grad, exact=True)

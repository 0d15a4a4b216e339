"""JitMerge: the same outputs and coefficient gradients as functional_call over θ_0 + Σ λ τ, in fp32,
and no merged parameter alive between forward and backward."""

import gc
import weakref

import pytest
import torch
from torch.func import functional_call
from transformers import BertConfig, BertModel

from merging import jit_merge
from merging.jit_merge import JitMerge


def _bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=20, pad_token_id=0)
    return BertModel(config, add_pooling_layer=False).eval()


def _setup(granularity, k=3):
    model = _bert()
    names = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(1)
    deltas = {n: [0.1 * torch.randn(p.shape, generator=gen) for _ in range(k)] for n, p in model.named_parameters()}
    rows = {n: (i if granularity == "layer" else 0) for i, n in enumerate(names)}
    lam = torch.rand((len(names) if granularity == "layer" else 1, k), generator=gen).requires_grad_(True)
    ids = torch.randint(1, 50, (4, 7), generator=gen)
    ids[1, 5:] = 0  # padding
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    return model, names, deltas, rows, lam, batch


def _loss(out):
    return (out.last_hidden_state.sin() * torch.linspace(-1, 1, 16)).sum()


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_same_values_and_gradients_as_functional_call(granularity):
    model, names, deltas, rows, lam, batch = _setup(granularity)
    theta0 = {n: p.detach() for n, p in model.named_parameters()}
    merged = {n: theta0[n] + sum(lam[rows[n], k] * deltas[n][k] for k in range(lam.shape[1])) for n in names}
    reference = functional_call(model, merged, args=(), kwargs=batch)
    _loss(reference).backward()
    expected = lam.grad.clone()
    lam.grad = None

    merger = JitMerge(model, deltas, rows)
    with merger(lam):
        out = model(**batch)
    torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state, rtol=1e-5, atol=1e-5)
    _loss(out).backward()
    torch.testing.assert_close(lam.grad, expected, rtol=1e-4, atol=1e-5)
    # outside the context the model is θ_0 again
    assert all(torch.equal(p, theta0[n]) for n, p in model.named_parameters())
    assert "forward" not in model.embeddings.word_embeddings.__dict__
    torch.testing.assert_close(model(**batch).last_hidden_state, functional_call(model, theta0, args=(), kwargs=batch).last_hidden_state)


def test_no_merged_parameter_lives_until_backward(monkeypatch):
    model, names, deltas, rows, lam, batch = _setup("layer")
    made = []
    combine = jit_merge.merged_tensor

    def tracked(*args):
        out = combine(*args)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(jit_merge, "merged_tensor", tracked)
    merger = JitMerge(model, deltas, rows)
    with merger(lam):
        out = model(**batch)
    gc.collect()
    assert len(made) == len(names)  # one merged tensor (embedding tables: the rows looked up) per parameter
    assert all(ref() is None for ref in made), "a merged parameter is kept for backward"
    _loss(out).backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0


def test_shape_check():
    model, names, deltas, rows, lam, batch = _setup("task")
    with pytest.raises(ValueError, match="rows"):
        with JitMerge(model, deltas, rows)(torch.zeros(1, 2)):
            pass


def test_tied_parameter_is_merged_in_every_module_that_uses_it():
    """Tied input embedding and LM head: one parameter, merged in both modules (the head used θ_0 before)."""
    from modular.testing import tiny_model

    model = tiny_model("llama", tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(2)
    deltas = {n: [0.1 * torch.randn(p.shape, generator=gen) for _ in range(2)] for n, p in model.named_parameters()}
    rows = {n: i for i, n in enumerate(deltas)}
    lam = torch.rand(len(rows), 2, generator=gen).requires_grad_(True)
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=gen)
    merged = {n: p.detach() + sum(lam[rows[n], k] * deltas[n][k] for k in range(2)) for n, p in model.named_parameters()}
    reference = functional_call(model, merged, args=(), kwargs={"input_ids": ids}, tie_weights=True).logits
    reference.square().sum().backward()
    expected, lam.grad = lam.grad.clone(), None
    with JitMerge(model, deltas, rows)(lam):
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    logits.square().sum().backward()
    torch.testing.assert_close(lam.grad, expected, rtol=1e-4, atol=1e-4)


def test_bf16_weights_are_merged_in_fp32_and_rounded_once():
    """Within half a bf16 ulp of the exact merge (one rounding, as merging.merge writes it); merging in
    bf16 arithmetic (a rounding per added delta) is not."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    taus = [0.01 * torch.randn(64, 32, generator=gen).to(torch.bfloat16) for _ in range(3)]
    lam = torch.tensor([0.3, 0.7, 0.1])
    exact = base.double() + sum(lam[k].double() * taus[k].double() for k in range(3))
    half_ulp = exact.abs() * 2.0**-8 * (1 + 1e-6)
    out = jit_merge.merged_tensor(lam, base, taus)
    assert out.dtype == torch.bfloat16 and ((out.double() - exact).abs() <= half_ulp).all()
    in_bf16 = base.clone()
    for k in range(3):
        in_bf16.add_(lam[k].to(torch.bfloat16) * taus[k])
    assert ((in_bf16.double() - exact).abs() > half_ulp).any()

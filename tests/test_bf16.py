"""bf16 end to end on the CPU: every part run in fp32 and in bf16, checked against an fp32 reference.

Bounds. bf16 keeps 8 significant bits, so rounding a value to bf16 changes it by at most
u = 2^-8 relatively (the unit roundoff). A forward pass in bf16 rounds every layer's output (and a
few intermediate values inside a layer); the errors have random signs, so they add in quadrature
(probabilistic rounding-error analysis, Higham & Mary 2019): the norm-wise relative error of a model's
output against fp32 arithmetic on the *same* (bf16-rounded) weights is bounded by C·u·sqrt(L + 1) for L
layers (+1: the output head). C = 4 leaves room for the several roundings inside each layer: measured
values on these models are 1.0-1.2 u. fp32 runs must match their reference to fp32 rounding.

AdaMerging in bf16 belongs to merging/adamerging*.py (issue 22): its id is kept here, skipped until that
work fills it.
"""

import copy
import json
import math

import pytest
import torch
import yaml
from transformers import Trainer, TrainerCallback, TrainingArguments

from finetune import LisaCallback, OneBitAdam
from merging import TaskVector, merge
from modular import ACMConfig, acmize, load_model
from modular.app.recipe import load_recipe
from modular.app.train import run_recipe
from modular.config_io import ConfigError
from modular.registry import architecture_of
from modular.testing import tiny_model
from moe import inject_adamoe

U = 2.0**-8
DTYPES = [torch.float32, torch.bfloat16]


def forward_bound(dtype: torch.dtype, layers: int) -> float:
    return 1e-5 if dtype == torch.float32 else 4 * U * math.sqrt(layers + 1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def in_dtype_and_reference(model, dtype):
    """The model cast to ``dtype``, and an fp32 copy of those (rounded) weights: the reference."""
    model = model.to(dtype)
    return model, copy.deepcopy(model).float()


@pytest.fixture
def ids():
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


# -- AdaMoE ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_adamoe_forward(dtype, ids):
    model = tiny_model("mixtral", num_hidden_layers=2)
    inject_adamoe(model, {"num_null_experts": 2})
    model, reference = in_dtype_and_reference(model, dtype)
    with torch.no_grad():
        logits, want = model(ids).logits, reference(ids).logits
    assert logits.dtype == dtype
    assert relative_error(logits, want) <= forward_bound(dtype, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamoe_router_math_is_fp32(dtype):
    # Same (bf16-representable) inputs and weights: the picks must be exactly fp32's and the weights
    # fp32's rounded once. Logits computed in bf16 would round near-ties together and flip picks.
    model = tiny_model("mixtral", num_hidden_layers=1, num_local_experts=8)
    inject_adamoe(model, {"num_null_experts": 4, "top_k": 3})
    router = architecture_of(model).routers()[0][1].to(dtype)
    reference = copy.deepcopy(router).float()
    with torch.no_grad():
        router.null_weight.normal_(generator=torch.Generator().manual_seed(0))
        reference.null_weight.copy_(router.null_weight)
    x = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)
    logits, weights, picks = router(x)
    want_logits, want_weights, want_picks = reference(x.float())
    assert logits.dtype == torch.float32 and weights.dtype == dtype
    assert torch.equal(picks, want_picks)
    assert torch.equal(weights, want_weights.to(dtype))
    torch.testing.assert_close(logits, want_logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_modular_experts_forward_backward_with_null_picks(dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=64, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    experts = MixtralExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    experts, reference = in_dtype_and_reference(experts, dtype)
    index = torch.rand(50, 4).argsort(-1)[:, :2]
    index[::3, 1] = 4  # null picks (the sentinel)
    hidden, weights, grad = torch.randn(50, 64), torch.softmax(torch.randn(50, 2), -1), torch.randn(50, 64)

    def run(module, impl, dt):
        module.config._experts_implementation = impl
        h, w = hidden.detach().to(dt).requires_grad_(), weights.detach().to(dt).requires_grad_()
        out = module(h, index, w)
        out.backward(grad.to(dt))
        return [out, h.grad, w.grad, module.gate_up_proj.grad, module.down_proj.grad]

    want = run(reference, "eager", torch.float32)
    for impl in ("eager", "modular"):
        got = run(copy.deepcopy(experts), impl, dtype)
        assert got[0].dtype == got[3].dtype == dtype
        # one layer: two matmuls and the activation in between
        assert max(relative_error(g, w) for g, w in zip(got, want)) <= forward_bound(dtype, 1)


# -- ACM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_acm_forward(dtype, ids):
    model = tiny_model("llama", num_hidden_layers=2)
    acmize(model, ACMConfig(distill_steps=0, gate_steps=2, threshold=1.0),
           [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}] * 2, progress=False)
    model, reference = in_dtype_and_reference(model, dtype)
    with torch.no_grad():
        logits, want = model(ids).logits, reference(ids).logits
    assert logits.dtype == dtype
    assert relative_error(logits, want) <= forward_bound(dtype, 2)


# -- LISA -----------------------------------------------------------------------------------------
class _Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses.append(logs["loss"])


def _train_lisa(out, bf16: bool):
    """4-layer llama, 2 steps of LISA (γ=1) through Trainer; ``bf16``: Trainer's mixed precision."""
    rows = [{"input_ids": torch.randint(3, 128, (8,), generator=torch.Generator().manual_seed(i)).tolist()} for i in range(16)]

    def collate(batch):
        ids = torch.tensor([r["input_ids"] for r in batch])
        return {"input_ids": ids, "labels": ids}

    model = tiny_model("llama", num_hidden_layers=4).train()
    before = [torch.cat([p.detach().reshape(-1) for p in layer.parameters()]).clone() for layer in model.model.layers]
    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, report_to=[], use_cpu=True, bf16=bf16, save_strategy="no", seed=0)
    losses = _Losses()
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[losses])
    lisa = LisaCallback(num_active_layers=1, interval_steps=2, seed=3, trainer=trainer)
    trainer.add_callback(lisa)
    trainer.train()
    changed = [i for i, (b, layer) in enumerate(zip(before, model.model.layers))
               if not torch.equal(b, torch.cat([p.detach().reshape(-1) for p in layer.parameters()]))]
    states = {v.dtype for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()}
    return {"losses": losses.losses, "changed": changed, "active": lisa.active_layers, "state_dtypes": states}


@pytest.fixture(scope="module")
def lisa_fp32(tmp_path_factory):
    return _train_lisa(tmp_path_factory.mktemp("lisa_fp32"), bf16=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lisa_with_mixed_precision(dtype, lisa_fp32, tmp_path):
    # bf16 here is the Trainer's mixed precision (autocast over fp32 weights): LISA trains the same
    # layers, the optimizer state stays fp32, and the first loss (before any update) is the fp32 one
    # within the forward bound.
    run = lisa_fp32 if dtype == torch.float32 else _train_lisa(tmp_path, bf16=True)
    assert run["changed"] == run["active"] and run["state_dtypes"] == {torch.float32}
    assert abs(run["losses"][0] - lisa_fp32["losses"][0]) / lisa_fp32["losses"][0] <= forward_bound(dtype, 4)


# -- 1-bit Adam -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_onebit_adam_over_bf16_weights(dtype):
    # The same gradients fed to fp32 and to `dtype` weights: moments do not depend on the weights, so
    # the only difference is rounding the weight once per step (and once at the start), each at most
    # u·|w|: after T steps |Δ| ≤ (T + 1)·u·max|w|. State and error buffers stay fp32.
    steps = 8
    start = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    grads = [torch.randn(4, 64, generator=torch.Generator().manual_seed(1 + t)) for t in range(steps)]
    weights = {}
    for dt in (torch.float32, dtype):
        p = torch.nn.Parameter(start.to(dt))
        optimizer = OneBitAdam([p], lr=1e-2, weight_decay=0.1, freeze_step=3, block_size=64)
        for g in grads:
            p.grad = g.to(dt)
            optimizer.step()
        weights[dt] = p.detach()
        assert {v.dtype for v in optimizer.state[p].values() if torch.is_tensor(v)} == {torch.float32}
        assert "worker_error" in optimizer.state[p]  # the compressed stage ran
    assert weights[dtype].dtype == dtype
    bound = 0.0 if dtype == torch.float32 else (steps + 1) * U * weights[torch.float32].abs().max().item()
    assert (weights[dtype].float() - weights[torch.float32]).abs().max().item() <= bound


# -- task vectors and merges ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_task_vectors_are_fp32_deltas_of_bf16_checkpoints(dtype, tmp_path):
    base, finetuned = tiny_model("llama").to(dtype), tiny_model("llama", seed=1).to(dtype)
    base.save_pretrained(tmp_path / "base")
    finetuned.save_pretrained(tmp_path / "ft")
    vector = TaskVector.from_models(tmp_path / "base", tmp_path / "ft")
    merged = merge("task_arithmetic", tmp_path / "base", [vector], weights=0.5)
    for name, p in base.named_parameters():
        delta = finetuned.state_dict()[name].float() - p.float()
        assert vector.get(name).dtype == torch.float32 and torch.equal(vector.get(name), delta)
        assert merged[name].dtype == dtype  # the base's dtype, computed in fp32 and rounded once
        assert torch.equal(merged[name], (p.float() + 0.5 * delta).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamerging(dtype):
    pytest.skip("AdaMerging in bf16: merging/adamerging*.py belongs to issue 22, which fills this test")


# -- recipes --------------------------------------------------------------------------------------
RECIPE = {
    "model": {"config": {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, "tokenizer": "tok"},
    "injections": [{"upcycle": {"num_experts": 4, "top_k": 2, "noise_std": 0.01}},
                   {"adamoe": {"num_null_experts": 2, "top_k": 3}}],
    "data": {"train": "train.jsonl", "max_length": 16},
    "lisa": {"num_active_layers": 1, "interval_steps": 1},
    "optimizer": {"name": "onebit_adam", "lr": 1e-3, "freeze_step": 1},
    "training": {"max_steps": 2, "per_device_train_batch_size": 2, "save_strategy": "no"},
    "output_dir": "run",
}


@pytest.fixture
def recipe_dir(tmp_path):
    from modular.app.corpora import train_tokenizer

    text = "Null experts cost nothing; layerwise sampling trains a few layers at a time."
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": f"{text} {i}"}) for i in range(8)))
    train_tokenizer([text]).save_pretrained(tmp_path / "tok")
    (tmp_path / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    (tmp_path / "zero0.json").write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    return tmp_path


def _recipe(folder, **sections):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, **sections}))
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_recipe_trains_in_the_model_dtype(dtype, recipe_dir):
    # upcycle + AdaMoE + LISA + OneBitAdam in one process, weights in `dtype` from loading on.
    final = run_recipe(load_recipe(_recipe(recipe_dir, model={**RECIPE["model"], "dtype": dtype})))
    assert {p.dtype for p in load_model(final).parameters()} == {getattr(torch, dtype)}


@pytest.mark.parametrize("sections,match", [
    ({"model": {**RECIPE["model"], "dtype": "float16"}}, r"model.dtype: 'float16' is not allowed"),
    ({"model": {**RECIPE["model"], "dtype": "bfloat16"}, "training": {"fp16": True}}, "mixes two half precisions"),
    ({"deepspeed": "zero0.json", "training": {"bf16": True}}, "onebit_adam under DeepSpeed needs training.bf16 off"),
    ({"model": {**RECIPE["model"], "dtype": "bfloat16"}, "optimizer": {"name": "adamw"}, "deepspeed": "zero2.json"},
     "under ZeRO-2 needs training.bf16: true"),
])
def test_precision_combinations_that_lose_fp32_state_are_refused(recipe_dir, sections, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(_recipe(recipe_dir, **sections))


# -- CUDA (make gpu-check) ------------------------------------------------------------------------
@pytest.mark.gpu
def test_adamoe_model_on_cuda_bf16(ids):
    # Everything the forward creates follows the model's device: same logits as on the CPU in fp32.
    model = tiny_model("mixtral", num_hidden_layers=2)
    inject_adamoe(model, {"num_null_experts": 2})
    model, reference = in_dtype_and_reference(model, torch.bfloat16)
    model = model.to("cuda")
    logits = model(ids.to("cuda"), labels=ids.to("cuda"))
    logits.loss.backward()
    with torch.no_grad():
        want = reference(ids).logits
    assert relative_error(logits.logits.cpu(), want) <= forward_bound(torch.bfloat16, 2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
def test_onebit_adam_on_cuda_bf16():
    p = torch.nn.Parameter(torch.randn(4, 64, device="cuda", dtype=torch.bfloat16))
    optimizer = OneBitAdam([p], lr=1e-2, freeze_step=2, block_size=64)
    for t in range(4):
        p.grad = torch.randn(4, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(t)).to(torch.bfloat16)
        optimizer.step()
    state = optimizer.state[p]
    assert {(v.device.type, v.dtype) for v in state.values() if torch.is_tensor(v)} == {("cuda", torch.float32)}
    assert "worker_error" in state and torch.isfinite(p).all()

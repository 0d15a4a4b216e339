"""ACM: prefix sums, gate labels, real skipping, the threshold knob, conversion, save/load, bad input."""

import copy
import io

import pytest
import torch
from torch import nn

from modular import ACMConfig, acmize, load_model
from modular.acm import (
    ACMLayer,
    acm_modules,
    budget_loss,
    choose_learners,
    compute_penalty,
    compute_stats,
    finetune_end_to_end,
    gate_labels,
    plot_stats,
    reset_stats,
    set_threshold,
)
from modular.acm.calibration import distillation_loss
from modular.acm.layer import inplace_activation
from modular.registry import UnknownArchitectureError
from modular.surgery import InjectionError, injection_records


def _hand_layer(gated=False):
    """d = 2, N = 2 learners of width 1, identity activation, weights set by hand."""
    layer = ACMLayer(2, 2, 1, nn.Identity(), gated=gated, bias_in=not gated, bias_out=not gated,
                     gate_hidden_size=4, dense_intermediate_size=2)
    with torch.no_grad():
        layer.w_in.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        layer.w_out.copy_(torch.tensor([[1.0, 1.0], [3.0, -1.0]]))
        if gated:
            layer.w_up.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
        else:
            layer.b_in.copy_(torch.tensor([0.5, -1.0]))
            layer.b_out.copy_(torch.tensor([[1.0, 0.0], [0.0, 10.0]]))
    return layer.eval()


def test_prefix_sums_by_hand():
    layer = _hand_layer()
    x = torch.tensor([[1.0, 2.0]])
    # learner 1: h = 1*1 + 0.5 = 1.5 -> 1.5*[1, 1] + [1, 0] = [2.5, 1.5]
    # learner 2: h = 2*2 - 1 = 3   -> 3*[3, -1] + [0, 10] = [9, 7]
    expected = torch.tensor([[[0.0, 0.0], [2.5, 1.5], [11.5, 8.5]]])
    assert torch.allclose(layer.prefix_outputs(x), expected)
    # the inference path, one token per choice: 0 learners, 1, 2
    with torch.no_grad():
        assert torch.allclose(layer.run_chosen(x.repeat(3, 1), torch.tensor([2, 0, 1])), expected[0, [2, 0, 1]])


def test_gated_prefix_sums_by_hand():
    layer = _hand_layer(gated=True)
    x = torch.tensor([[1.0, 2.0]])
    # learner 1: (1) * (2) = 2 -> [2, 2];  learner 2: (4) * (3) = 12 -> [36, -12]
    assert torch.allclose(layer.prefix_outputs(x), torch.tensor([[[0.0, 0.0], [2.0, 2.0], [38.0, -10.0]]]))


def test_gate_labels_follow_the_1_2_rule():
    errors = torch.tensor([
        [1.0, 0.5, 0.2, 0.1],   # every learner helps by >= 1.2 -> N = 3
        [1.0, 0.9, 0.5, 0.1],   # 1.0/0.9 < 1.2 -> 0
        [1.0, 0.5, 0.45, 0.1],  # 0.5/0.45 < 1.2 -> 1
        [1.0, 0.5, 0.25, 0.22],  # 0.25/0.22 < 1.2 -> 2
        [1.0, 0.0, 0.0, 0.0],   # exact after one learner -> 1
        [1.2, 1.0, 0.5, 0.1],   # ratio exactly 1.2 is not "< 1.2" -> 3
    ])
    assert gate_labels(errors, 1.2).tolist() == [3, 0, 1, 2, 1, 3]


def test_distillation_losses_by_hand():
    # two tokens, two prefixes, d = 2: token 0 has a big output, token 1 a small one
    y = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    prefixes = torch.tensor([[[8.0, 0.0], [10.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    # squared errors per (token, prefix), averaged over d: [[2, 0], [0.5, 0]]
    assert distillation_loss(prefixes, y, "mse").item() == pytest.approx((2 + 0 + 0.5 + 0) / 4)
    # divided by each token's mean squared output (50 and 0.5): [[0.04, 0], [1, 0]]
    assert distillation_loss(prefixes, y, "relative").item() == pytest.approx((0.04 + 1) / 4)


def test_choose_learners_threshold_is_monotonic():
    logits = torch.randn(200, 5)
    counts = [choose_learners(logits, t).sum().item() for t in (0.01, 0.2, 0.4, 0.6, 0.8, 0.99, 1.0)]
    assert counts == sorted(counts) and counts[0] < counts[-1] == 200 * 4
    assert torch.equal(choose_learners(logits, None), logits.argmax(-1))
    # cumulative probs [0.1, 0.3, 0.6, 1.0] for N = 3: threshold 0.25 -> j = 1, 0.6 -> 2
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert choose_learners(probs.log(), 0.25).item() == 1 and choose_learners(probs.log(), 0.55).item() == 2


def test_skipped_learners_are_never_computed():
    torch.manual_seed(0)
    layer = ACMLayer(8, 4, 4, nn.GELU(), gated=False, bias_in=True, bias_out=True, gate_hidden_size=8,
                     dense_intermediate_size=16).eval()
    x = torch.randn(12, 8)
    choice = torch.tensor([0, 1, 2, 3, 4, 1, 1, 2, 0, 3, 2, 1])
    expected = layer.prefix_outputs(x)[torch.arange(12), choice]
    with torch.no_grad():  # poison learner 4: any token that touched it would come out NaN
        layer.w_in[12:] = float("nan")
    out = layer.run_chosen(x, choice)
    assert torch.isfinite(out[choice < 4]).all() and torch.isnan(out[choice == 4]).all()
    assert torch.allclose(out[choice < 4], expected[choice < 4], atol=1e-6)
    assert layer.choice_counts.tolist() == [2, 4, 3, 2, 1]
    kept = choice < 4  # gradients through the in-place accumulation match those of the all-prefix path
    weight_grads = [torch.autograd.grad(y[kept].square().sum(), (layer.w_in, layer.w_out, layer.b_out))
                    for y in (out, layer.prefix_outputs(x)[torch.arange(12), choice])]
    assert all(torch.allclose(a[:12].nan_to_num(), b[:12].nan_to_num(), atol=1e-5) for a, b in zip(*weight_grads))
    with torch.no_grad():
        fast = layer.run_chosen(x, choice)
    assert torch.equal(torch.isnan(fast), torch.isnan(out)) and torch.allclose(fast[choice < 4], expected[choice < 4], atol=1e-6)
    assert (fast[choice == 0] == 0).all()
    # the learner matmuls see exactly sum_j j * count_j learner-rows: count them
    seen = []
    layer._hidden = lambda xs, units, f=layer._hidden: (seen.append((xs.shape[0], units.stop - units.start)), f(xs, units))[1]
    layer.run_chosen(x, choice)
    assert sum(r * u for r, u in seen) == (4 * 1 + 3 * 2 + 2 * 3 + 1 * 4) * 4
    assert seen == [(10, 4), (6, 4), (3, 4), (1, 4)]  # learner i over the tokens with j > i
    # no token stops after learner 1 or 3: learners 1-2 and 3-4 share their tokens, one matmul each
    seen.clear()
    gapped = torch.tensor([0, 2, 2, 4, 4, 2, 0, 4, 2, 2, 4, 2])
    out = layer.run_chosen(x, gapped)
    assert seen == [(10, 8), (4, 8)]
    assert torch.allclose(out[gapped < 4], layer.prefix_outputs(x)[torch.arange(12), gapped][gapped < 4], atol=1e-6)


@pytest.mark.parametrize("name", ["gelu", "gelu_pytorch_tanh", "silu", "relu"])
def test_inplace_activation_matches_the_models_activation(name):
    from transformers.activations import ACT2FN

    x = torch.randn(64, 8) * 4
    in_place = inplace_activation(ACT2FN[name])
    h = x.clone()
    assert in_place(h) is h and torch.equal(h, ACT2FN[name](x))


def test_layers_with_in_place_activations_still_pickle_and_copy():
    layer = ACMLayer(8, 2, 4, nn.SiLU(), gated=True, bias_in=False, bias_out=False, gate_hidden_size=4,
                     dense_intermediate_size=8).eval()
    x = torch.randn(5, 8)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    with torch.no_grad():
        expected = layer(x)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), expected)
        assert torch.equal(copy.deepcopy(layer)(x), expected)


def test_inplace_activation_declines_what_it_cannot_match():
    class QuickGelu(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x)

    assert inplace_activation(QuickGelu()) is None
    assert inplace_activation(nn.PReLU()) is None  # learned parameters: not a fixed function


def _calib(ids, n=3):
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}] * n


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_dense_init_with_all_learners_is_the_dense_model(model_type, tiny, input_ids):
    model = tiny(model_type)
    with torch.no_grad():
        reference = model(input_ids)[0]
    acmize(model, ACMConfig(distill_steps=0, gate_steps=1, threshold=1.0), _calib(input_ids), progress=False)
    with torch.no_grad():
        assert torch.allclose(model(input_ids)[0], reference, atol=1e-5)
    assert compute_stats(model)["mean_learners"] == 8  # the default N


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_acmize_trains_and_round_trips_through_load_model(model_type, tiny, input_ids, tmp_path):
    model = tiny(model_type)
    config = ACMConfig(num_learners=4, init="random", distill_steps=60, distill_lr=3e-3, gate_steps=40)
    acmize(model, config, _calib(input_ids), progress=False)
    for log in model.acm_conversion_log:  # distillation made every prefix better than nothing, refining
        rel = log["relative_error"]
        assert rel[0] == pytest.approx(1.0, abs=1e-4) and rel[-1] < rel[1] < 1.0
    set_threshold(model, 0.5)
    with torch.no_grad():
        expected = model(input_ids)[0]
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert injection_records(loaded)[0]["kind"] == "acm"
    set_threshold(loaded, 0.5)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids)[0], expected, atol=1e-5)
    if model_type == "bert":
        assert isinstance(loaded.encoder.layer[0].output.dense, nn.Identity)


def test_threshold_trades_compute_for_quality_without_retraining(tiny, input_ids):
    model = tiny("llama")
    with torch.no_grad():
        reference = model(input_ids).logits
    acmize(model, ACMConfig(distill_steps=30, gate_steps=60, label_factor=2.0), _calib(input_ids), progress=False)
    fractions, errors = [], []
    for threshold in (0.05, 0.3, 0.6, 0.9, 1.0):
        set_threshold(model, threshold)
        reset_stats(model)
        with torch.no_grad():
            errors.append((model(input_ids).logits - reference).pow(2).mean().item())
        fractions.append(compute_stats(model)["mean_learners"])
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1] == 8
    assert errors[-1] < errors[0]


def test_straight_through_gate_gets_task_gradient_and_budget_loss(tiny, input_ids):
    model = tiny("llama")
    config = ACMConfig(distill_steps=0, gate_steps=1, budget_target=0.25)
    acmize(model, config, _calib(input_ids), progress=False)
    model.train().requires_grad_(True)
    outputs = model(input_ids)
    outputs.logits.pow(2).mean().backward(retain_graph=True)  # a task loss only
    gate = model.model.layers[0].mlp.gate.net[0].weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    loss = budget_loss(model, config)(outputs, input_ids)
    penalty = compute_penalty(model, 0.25)
    task = model.loss_function(outputs.logits, input_ids, vocab_size=model.config.vocab_size)
    assert torch.allclose(loss, task + 0.1 * penalty)


def test_finetune_end_to_end_trains_only_the_acms_toward_the_task_and_budget(tiny, input_ids):
    dense = tiny("bert")
    with torch.no_grad():
        target = dense(input_ids).last_hidden_state
    config = ACMConfig(distill_steps=0, gate_steps=1, init="random", budget_target=0.25, budget_weight=1.0)
    model = acmize(tiny("bert"), config, _calib(input_ids), progress=False)
    model.embeddings.requires_grad_(True)  # the user's own flags outside the ACMs survive the call
    flags = {n: p.requires_grad for n, p in model.named_parameters() if ".intermediate." not in n}
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".intermediate." not in n}
    acm_before = {n: p.clone() for n, p in model.named_parameters() if ".intermediate." in n}

    def distill_hidden(m, ids):
        return (m(ids).last_hidden_state - target).pow(2).mean()

    torch.manual_seed(0)
    history = finetune_end_to_end(model, [input_ids], distill_hidden, config, steps=60, lr=1e-2, progress=False)
    assert len(history) == 60 and set(history[0]) == {"task", "penalty"}
    assert sum(h["task"] for h in history[-5:]) < 0.5 * sum(h["task"] for h in history[:5])
    assert sum(h["penalty"] for h in history[-5:]) < sum(h["penalty"] for h in history[:5])
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert {n: params[n].requires_grad for n in flags} == flags and any(flags.values())
    assert any(not torch.equal(params[n], p) for n, p in acm_before.items())
    assert all(not layer.training and not any(p.requires_grad for p in layer.parameters()) for _, layer in acm_modules(model))
    with pytest.raises(ValueError, match="no ACM modules"):
        finetune_end_to_end(tiny("bert"), [input_ids], distill_hidden, config, steps=1, lr=1e-2)
    with pytest.raises(ValueError, match="steps and lr must be positive"):
        finetune_end_to_end(model, [input_ids], distill_hidden, config, steps=0, lr=1e-2)
    short = ACMConfig(distill_steps=0, gate_steps=1, finetune_steps=3, finetune_lr=1e-2)
    assert len(finetune_end_to_end(model, [input_ids], distill_hidden, short, progress=False)) == 3  # steps from the config


def test_stats_plot(tiny, input_ids, tmp_path):
    model = acmize(tiny("bert"), ACMConfig(distill_steps=0, gate_steps=1, threshold=0.5), _calib(input_ids), progress=False)
    reset_stats(model)
    with torch.no_grad():
        model(input_ids)
    stats = compute_stats(model)
    assert [sum(layer["histogram"]) for layer in stats["layers"]] == [input_ids.numel()] * 2
    plot_stats(stats, tmp_path / "stats.png")
    assert (tmp_path / "stats.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_learners": 0}, "num_learners must be a positive int"),
        ({"init": "zeros"}, "init must be one of dense, random"),
        ({"label_factor": 1.0}, "label_factor must be > 1"),
        ({"threshold": 1.5}, r"threshold must be None \(argmax\) or in \(0, 1\]"),
        ({"distill_steps": -1}, "distill_steps must be an int >= 0"),
        ({"distill_loss": "l1"}, "distill_loss must be one of mse, relative"),
        ({"finetune_steps": 0}, "finetune_steps must be a positive int, got 0"),
        ({"finetune_lr": -1e-4}, "finetune_lr must be a positive float"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ACMConfig(**kwargs)


def test_bad_inputs(tiny, input_ids):
    with pytest.raises(ValueError, match="num_learners=5 does not divide the FFN intermediate size 64"):
        acmize(tiny("llama"), ACMConfig(num_learners=5), _calib(input_ids), progress=False)
    with pytest.raises(ValueError, match="init='dense' slices the dense FFN"):
        acmize(tiny("llama"), ACMConfig(num_learners=4, learner_width=10), _calib(input_ids), progress=False)
    with pytest.raises(ValueError, match="calibration_data is empty"):
        acmize(tiny("llama"), ACMConfig(), [], progress=False)
    with pytest.raises(ValueError, match="no \\(unmasked\\) tokens"):
        acmize(tiny("llama"), ACMConfig(), [{"input_ids": input_ids, "attention_mask": torch.zeros_like(input_ids)}], progress=False)
    odd = tiny("llama")
    odd.model.layers[0].mlp = torch.nn.Linear(32, 32)
    with pytest.raises(InjectionError, match="Linear, which cannot be read as a dense FFN"):
        acmize(odd, ACMConfig(), _calib(input_ids), progress=False)
    with pytest.raises(InjectionError, match="no dense FFN"):
        acmize(tiny("mixtral"), ACMConfig(), _calib(input_ids), progress=False)
    with pytest.raises(InjectionError, match="pattern 'nothing' matches no module"):
        acmize(tiny("llama"), ACMConfig(target_pattern="nothing"), _calib(input_ids), progress=False)
    model = tiny("llama")
    model.config.model_type = "mystery"
    with pytest.raises(UnknownArchitectureError, match="'mystery' is not in the modular-llm architecture registry"):
        acmize(model, ACMConfig(), _calib(input_ids), progress=False)
    with pytest.raises(ValueError, match="no ACM modules"):
        set_threshold(tiny("llama"), 0.5)


def test_load_model_finds_acm_through_the_entry_point(tiny, input_ids, tmp_path):
    """A fresh process that never imported modular.acm rebuilds the ACMs from the record."""
    import subprocess
    import sys

    model = acmize(tiny("llama"), ACMConfig(distill_steps=0, gate_steps=1), _calib(input_ids), progress=False)
    model.save_pretrained(tmp_path)
    code = (f"import sys; from modular import load_model; m = load_model({str(tmp_path)!r}); "
            "assert 'modular.acm' in sys.modules; print(type(m.model.layers[1].mlp).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ACMLayer", out.stderr


def test_example_runs_on_a_tiny_model(tmp_path):
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).parents[2] / "examples" / "acmize_minilm.py"))
    stats = example["main"](["--tiny", "--out", str(tmp_path)])
    assert 0 < stats["mean_learners"] <= 4 and (tmp_path / "acm_compute.png").is_file()

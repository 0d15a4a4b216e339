"""The AdaMoE load-balancing loss by hand, its Trainer plumbing, and the save/load round trip."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from finetune import MoEAuxLossCallback
from modular import load_model
from modular.app.cli import main as cli_main
from modular.registry import architecture_of
from moe import AdaMoEConfig, adamoe_aux_loss, inject_adamoe, load_balancing_loss, routing_stats
from moe.router import is_adamoe_router


def test_load_balancing_loss_by_hand():
    # 2 true + 2 null experts, k' = 2, 2 tokens
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    selected = torch.tensor([[0, 1], [3, 2]])
    # slot fractions: f = [1/4, 1/4, 1/4, 1/4] (nulls: mean of 1/4, 1/4); P = [.25, .25, .25, .25]
    assert load_balancing_loss(probs, selected, 2).item() == pytest.approx(4 * 4 * 0.25 * 0.25)
    selected = torch.tensor([[0, 2], [0, 2]])
    # f = [1/2, 0, 1/2, 0] -> nulls as a group: [1/2, 0, 1/4, 1/4]; P = [.25, .25, .25, .25]
    assert load_balancing_loss(probs, selected, 2).item() == pytest.approx(4 * (0.5 * 0.25 + 0.25 * 0.25 * 2))
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]])
    # P = [.6, .2, .1, .1]: 4 * (.5*.6 + 0*.2 + .25*.1 + .25*.1) = 1.4
    assert load_balancing_loss(probs, selected, 2).item() == pytest.approx(1.4)


def test_model_aux_loss_averages_layers_with_their_coefficient(tiny, input_ids):
    model = tiny("qwen3_moe")
    inject_adamoe(model, AdaMoEConfig(num_null_experts=3, top_k=3, aux_loss_coef=0.5))
    model(input_ids)
    routers = [r for r in model.modules() if is_adamoe_router(r)]
    by_hand = sum(0.5 * load_balancing_loss(r.last_probs, r.last_selected, 4) for r in routers) / len(routers)
    assert torch.allclose(adamoe_aux_loss(model), by_hand)


def _dataset(n=8, length=12):
    ids = torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(2))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(tmp_path, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, **kw,
    )


def test_callback_adds_the_aux_loss_to_the_training_loss(tiny, input_ids, tmp_path):
    model = tiny("mixtral")
    inject_adamoe(model, AdaMoEConfig(num_null_experts=4, top_k=3, aux_loss_coef=0.1))
    callback = MoEAuxLossCallback()
    callback.on_train_begin(_args(tmp_path, gradient_accumulation_steps=2), None, None, model=model)
    model.train()
    lm = model(input_ids, labels=input_ids)  # aux added: training mode, no num_items_in_batch
    with torch.no_grad():
        hooked = lm.loss.item()
        aux = adamoe_aux_loss(model).item()
    callback.on_train_end(None, None, None)
    plain = model(input_ids, labels=input_ids).loss.item()  # hook removed
    assert hooked == pytest.approx(plain + aux, rel=1e-6)
    callback.on_train_begin(_args(tmp_path, gradient_accumulation_steps=2), None, None, model=model)
    scaled = model(input_ids, labels=input_ids, num_items_in_batch=torch.tensor(22)).loss.item()
    callback.on_train_end(None, None, None)
    plain = model(input_ids, labels=input_ids, num_items_in_batch=torch.tensor(22)).loss.item()
    assert scaled == pytest.approx(plain + aux / 2, rel=1e-5)  # once per optimizer step, not per micro-batch


@pytest.mark.parametrize("with_callback", [True, False])
def test_trainer_trains_null_logits_only_through_the_aux_loss(with_callback, tiny, tmp_path):
    # with renormalised true weights the LM loss does not reach the null logits: only the aux loss moves them
    model = tiny("olmoe", norm_topk_prob=True)
    inject_adamoe(model, AdaMoEConfig(num_null_experts=4, top_k=3, aux_loss_coef=1.0, weighting="renormalized"))
    before = model.model.layers[0].mlp.gate.null_bias.detach().clone()
    callbacks = [MoEAuxLossCallback()] if with_callback else []
    Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=callbacks).train()
    moved = not torch.equal(model.model.layers[0].mlp.gate.null_bias, before)
    assert moved == with_callback


def test_aux_loss_lands_in_log_history(tiny, tmp_path):
    model = tiny("mixtral")
    inject_adamoe(model, AdaMoEConfig(num_null_experts=4, top_k=3, aux_loss_coef=0.1))
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[MoEAuxLossCallback()])
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    assert all(entry["moe_aux_loss"] > 0 for entry in steps)


def test_callback_needs_adamoe_routers(tiny, tmp_path):
    with pytest.raises(ValueError, match="no AdaMoE routers"):
        MoEAuxLossCallback().on_train_begin(_args(tmp_path), None, None, model=tiny("mixtral"))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_round_trip_inject_train_save_load(model_type, tiny, input_ids, tmp_path):
    model = tiny(model_type)
    inject_adamoe(model, AdaMoEConfig(num_null_experts=4, top_k=3, layers=[0]))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    (model(input_ids, labels=input_ids).loss + adamoe_aux_loss(model)).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
    assert model.model.layers[0].mlp.gate.null_bias.abs().sum() > 0  # the saved nulls are not the init
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert is_adamoe_router(loaded.model.layers[0].mlp.gate) and not is_adamoe_router(loaded.model.layers[1].mlp.gate)
    assert loaded.config._experts_implementation == "modular"
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids).logits, expected, atol=1e-6)


def test_routing_stats_plot_and_cli(tiny, tmp_path, capsys):
    model = tiny("mixtral")
    with pytest.raises(ValueError, match="no AdaMoE routers"):
        routing_stats(model)
    inject_adamoe(model, AdaMoEConfig(num_null_experts=4, top_k=3))
    with pytest.raises(ValueError, match="has not run yet"):
        routing_stats(model)
    with torch.no_grad():  # layer 0: every token picks null 0 first, then its original top-2
        architecture_of(model).routers()[0][1].null_bias[0] = 5.0
    model.save_pretrained(tmp_path / "model")
    assert cli_main(["moe-stats", str(tmp_path / "model"), "--out", str(tmp_path / "stats.png")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (tmp_path / "stats.png").stat().st_size > 1000
    assert [round(layer["experts_per_token"], 6) for layer in report["layers"]] == [2.0, 2.0]
    assert report["layers"][0]["null_share"] == pytest.approx(1 / 3)
    assert sum(report["layers"][0]["expert_load"]) == pytest.approx(2 / 3)
    assert cli_main(["moe-stats", str(tmp_path / "missing")]) == 2

"""LisaCallback with a plain transformers.Trainer (one process, tiny models, a few steps each)."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from finetune import LisaCallback
from finetune.lisa import sample_active_layers
from modular.registry import architecture_of
from modular.testing import tiny_model

K = 2  # steps per period


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by tensors in the optimizer's ``state``."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


class Recorder(TrainerCallback):
    """Per optimizer step: which decoder layers / embeddings / head / routers changed, and optimizer-state bytes."""

    def __init__(self, model, lisa):
        self.arch, self.lisa, self.steps = architecture_of(model), lisa, []

    def _snapshot(self):
        parts = {f"layer{i}": layer for i, layer in enumerate(self.arch.layers)}
        parts["embeddings"] = self.arch.input_embeddings
        parts.update({f"router{n.split('.')[2]}": m for n, m in self.arch.routers()})
        head = self.arch.output_head
        if head is not None and not self.arch.embeddings_tied:
            parts["head"] = head
        return {k: torch.cat([p.detach().reshape(-1) for p in m.parameters()]).clone() for k, m in parts.items()}

    def on_step_begin(self, args, state, control, **kwargs):
        self.before = self._snapshot()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        after = self._snapshot()
        self.steps.append({"active": list(self.lisa.active_layers),
                           "changed": {k for k in after if not torch.equal(after[k], self.before[k])},
                           "state_bytes": optimizer_state_bytes(optimizer),
                           "layer_steps": {i: int(optimizer.state[next(layer.parameters())]["step"])
                                           for i, layer in enumerate(self.arch.layers)
                                           if next(layer.parameters()) in optimizer.state}})


def _data(n=64, length=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 128, (length,), generator=g).tolist()} for _ in range(n)]


def _collate(rows):
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids}


def _train(model, lisa, out, max_steps=3 * K, resume=None, **kw):
    kw = {"save_strategy": "no", **kw}
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
                             lr_scheduler_type="constant", logging_steps=1000, report_to=[], use_cpu=True, seed=0, **kw)
    recorder = Recorder(model, lisa)
    Trainer(model=model, args=args, train_dataset=_data(), data_collator=_collate,
            callbacks=[lisa, recorder]).train(resume_from_checkpoint=resume)
    return recorder.steps


def test_each_sampled_layer_trains_in_its_period_and_only_then(tmp_path, caplog):
    model = tiny_model("llama", num_hidden_layers=4).train()
    lisa = LisaCallback(num_active_layers=1, interval_steps=K, seed=3)
    with caplog.at_level(logging.INFO, logger="finetune.lisa"):
        steps = _train(model, lisa, tmp_path, max_steps=4 * K)
    expected = [sample_active_layers(3, p, 4, 1) for p in range(4)]
    assert len({tuple(x) for x in expected}) > 1, "seed must give a schedule that really switches"
    for step, record in enumerate(steps):
        assert record["active"] == expected[step // K]
        assert record["changed"] == {f"layer{i}" for i in record["active"]} | {"embeddings", "head"}
    # One log line per period, and the schedule saved with the run.
    lines = [r.getMessage() for r in caplog.records if "LISA period" in r.getMessage()]
    assert len(lines) == 4 and f"active layers {expected[1]}" in lines[1]
    saved = json.loads((tmp_path / "lisa_schedule.json").read_text())
    assert [p["layers"] for p in saved["periods"]] == expected
    assert [p["start_step"] for p in saved["periods"]] == [0, 2, 4, 6]


def test_optimizer_state_is_only_for_active_params_across_periods(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4).train()
    lisa = LisaCallback(num_active_layers=2, interval_steps=K, seed=1)
    steps = _train(model, lisa, tmp_path, max_steps=4 * K)
    arch = architecture_of(model)
    layer_numel = sum(p.numel() for p in arch.layers[0].parameters())
    n_layer_tensors = len(list(arch.layers[0].parameters()))
    fixed = [p for n, p in model.named_parameters() if arch.parameter_roles()[n] in ("embeddings", "head", "other")]
    # AdamW: exp_avg + exp_avg_sq in fp32 (8 bytes/element) + a 4-byte step tensor per parameter.
    expected = 8 * (sum(p.numel() for p in fixed) + 2 * layer_numel) + 4 * (len(fixed) + 2 * n_layer_tensors)
    assert [s["state_bytes"] for s in steps] == [expected] * len(steps)
    # A fresh AdamW per period: the active layers' step count restarts at each switch.
    for step, record in enumerate(steps):
        assert record["layer_steps"] == {i: step % K + 1 for i in record["active"]}


def test_frozen_embeddings_and_head_with_gradient_checkpointing(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4).train()
    lisa = LisaCallback(num_active_layers=2, interval_steps=K, train_embeddings=False, train_head=False, seed=0)
    steps = _train(model, lisa, tmp_path, activation_checkpointing=True,
                   activation_checkpointing_kwargs={"use_reentrant": True})
    assert model.is_activation_checkpointing
    norm = model.model.norm.weight
    for record in steps:
        assert record["changed"] == {f"layer{i}" for i in record["active"]}
    assert not norm.requires_grad  # "other" params follow train_head


def test_adamoe_routers_of_inactive_layers_stay_frozen(tmp_path):
    from moe import inject_adamoe

    model = tiny_model("mixtral", num_hidden_layers=3).train()
    inject_adamoe(model, {"num_null_experts": 2})
    lisa = LisaCallback(num_active_layers=1, interval_steps=K, seed=2)
    steps = _train(model, lisa, tmp_path)
    for record in steps:
        layers = {f"layer{i}" for i in record["active"]}
        routers = {f"router{i}" for i in record["active"]}
        assert record["changed"] == layers | routers | {"embeddings", "head"}


def test_resume_replays_schedule_and_ends_with_same_weights(tmp_path):
    full = tiny_model("llama", num_hidden_layers=4).train()
    lisa_full = LisaCallback(num_active_layers=1, interval_steps=K, seed=5)
    steps_full = _train(full, lisa_full, tmp_path / "full", max_steps=4 * K, save_strategy="steps", save_steps=3)
    for checkpoint in ("checkpoint-3", "checkpoint-6"):  # mid-period and at a period boundary
        resumed = tiny_model("llama", num_hidden_layers=4).train()
        lisa = LisaCallback(num_active_layers=1, interval_steps=K, seed=5)
        steps = _train(resumed, lisa, tmp_path / "full", max_steps=4 * K, resume=str(tmp_path / "full" / checkpoint))
        done = int(checkpoint.split("-")[1])
        assert [s["active"] for s in steps] == [s["active"] for s in steps_full[done:]]
        assert lisa.schedule == lisa_full.schedule
        # Same data order, same restored AdamW state: equal up to fp32 reduction-order noise.
        for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_layer_frozen_before_optimizer_is_refused(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4).train()
    for p in architecture_of(model).layers[2].parameters():
        p.requires_grad_(False)  # LMFlow #726: Trainer then builds AdamW without layer 2
    with pytest.raises(ValueError, match=r"decoder layers \[2\]"):
        _train(model, LisaCallback(num_active_layers=1, interval_steps=K), tmp_path)


def test_tied_embeddings_must_agree_with_head():
    model = tiny_model("llama", tie_word_embeddings=True)
    assert architecture_of(model).embeddings_tied
    lisa = LisaCallback(num_active_layers=1, interval_steps=K, train_embeddings=True, train_head=False)
    with pytest.raises(ValueError, match="tied"):
        lisa._partition(model)


def test_zero3_and_bad_arguments_are_refused():
    args = SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config={"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="ZeRO-3"):
        LisaCallback(num_active_layers=1, interval_steps=2).on_train_begin(args, None, None, model=tiny_model("llama"), optimizer=None)
    with pytest.raises(ValueError, match="num_active_layers"):
        LisaCallback(num_active_layers=0)
    with pytest.raises(ValueError, match="interval_steps"):
        LisaCallback(interval_steps=0)


def _zero2_args(resume=None):
    return SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config={"zero_optimization": {"stage": 2}}),
                           resume_from_checkpoint=resume)


def test_zero2_without_the_trainer_is_refused():
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    with pytest.raises(ValueError, match="needs the trainer"):
        LisaCallback(num_active_layers=1, interval_steps=2).on_train_begin(_zero2_args(), state, None, model=tiny_model("llama"))


def test_zero2_resume_needs_the_checkpoint_before_train(tmp_path):
    # DeepSpeed loads the optimizer saved in the checkpoint's period into an engine LISA built for
    # period 0: LISA must refuse to go on, naming the setting that makes it build the right one.
    model = tiny_model("llama", num_hidden_layers=4)
    lisa = LisaCallback(num_active_layers=1, interval_steps=2, trainer=SimpleNamespace(model=model, args=_zero2_args()))
    assert sum(p.requires_grad for layer in architecture_of(model).layers for p in layer.parameters()) == 9  # one layer
    state = SimpleNamespace(global_step=4, is_world_process_zero=True)  # saved after step 4: period 1's optimizer
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        lisa.on_train_begin(_zero2_args(), state, None, model=model)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    lisa = LisaCallback(num_active_layers=1, interval_steps=2, trainer=SimpleNamespace(model=model, args=_zero2_args(str(tmp_path))))
    assert lisa._engine_period == 1
    with pytest.raises(ValueError, match="no trainer_state.json"):
        LisaCallback(num_active_layers=1, interval_steps=2, trainer=SimpleNamespace(model=model, args=_zero2_args(str(tmp_path / "x"))))

"""AdaMerging: entropy and agreement, gradient direction, clamping, early stopping, ++ inputs,
the data (generators, whole inputs, shuffling), outputs and the CLI."""

import json
import math

import pytest
import torch
import yaml
from torch import nn

from merging import AdaMergingConfig, EntropyTask, TaskVector, adamerge, entropy
from modular import load_model
from modular.app.cli import main
from modular.testing import tiny_model

from .conftest import perturbed

PAPER = {"objective": "entropy", "init": 0.3}  # the paper's objective and start (the defaults are agreement, init search)


def test_entropy_by_hand():
    assert torch.isclose(entropy(torch.zeros(3, 4)), torch.log(torch.tensor(4.0)))
    assert entropy(torch.tensor([[30.0, 0.0]])) < 1e-9
    per_position = torch.stack([torch.zeros(5), torch.tensor([30.0, 0, 0, 0, 0])])[None]  # (1, 2, 5)
    assert torch.isclose(entropy(per_position, torch.tensor([[1, 0]])), torch.log(torch.tensor(5.0)))
    assert entropy(per_position, torch.tensor([[0, 1]])) < 1e-9


class Toy(nn.Module):
    """Two linear maps: logits = W2 (W1 x). HF-style keyword input, output with ``.logits``."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 3, bias=False)
        self.second = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return type("Out", (), {"logits": self.second(self.first(x))})()


def _toy_setup(seed=0):
    torch.manual_seed(seed)
    model = Toy()
    tvs = [TaskVector.from_tensors({n: torch.randn(p.shape) for n, p in model.named_parameters()}, label=f"t{k}") for k in range(2)]
    tasks = [EntropyTask(f"t{k}", [{"x": torch.randn(8, 3)}]) for k in range(2)]
    return model, tvs, tasks


def _toy_loss(model, tvs, tasks, lam):
    """Σ_k H on θ0 + Σ λ τ written out by hand (lam: (rows, K), rows = 1 or one per tensor)."""
    w = {}
    for i, (n, p) in enumerate(model.named_parameters()):
        row = lam[i if len(lam) > 1 else 0]
        w[n] = p.detach() + sum(row[k] * tvs[k].get(n) for k in range(len(tvs)))
    total = 0.0
    for task in tasks:
        x = task.batches[0]["x"]
        total += entropy(x @ w["first.weight"].T @ w["second.weight"].T)
    return total


@pytest.mark.parametrize("granularity,rows", [("task", 1), ("layer", 2)])
def test_first_adam_step_follows_the_entropy_gradient(granularity, rows):
    model, tvs, tasks = _toy_setup()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    result = adamerge(model, tvs, tasks, granularity=granularity, steps=1, lr=0.01, progress=False, **PAPER)
    lam0 = torch.full((rows, 2), 0.3)
    grad = torch.zeros_like(lam0)
    for idx in [(r, k) for r in range(rows) for k in range(2)]:  # central finite differences
        step = torch.zeros_like(lam0)
        step[idx] = 1e-3
        grad[idx] = (_toy_loss(model, tvs, tasks, lam0 + step) - _toy_loss(model, tvs, tasks, lam0 - step)) / 2e-3
    # Adam's first step is lr · sign(gradient) (bias-corrected m/sqrt(v) = ±1)
    assert torch.allclose(result.coefficients, lam0 - 0.01 * grad.sign(), atol=1e-6)
    assert result.rows == (["first.weight", "second.weight"] if rows == 2 else ["all"])
    assert torch.isclose(torch.tensor(result.entropy[0]), _toy_loss(model, tvs, tasks, lam0), atol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # θ0 untouched


def _sharpening_setup():
    """τ = θ0 for both tasks: larger λ scales the logits up, so entropy falls as λ grows."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    model.forward = lambda x, _lin=model: type("Out", (), {"logits": torch.nn.functional.linear(x, _lin.weight)})()
    tvs = [TaskVector.from_tensors({"weight": model.weight.detach().clone()}) for _ in range(2)]
    tasks = [EntropyTask(str(k), [{"x": torch.randn(16, 4)}]) for k in range(2)]
    return model, tvs, tasks


def test_own_task_gradient_stops_a_task_vector_being_driven_by_other_tasks():
    """τ_0 slightly flattens task 0's logits but sharpens task 1's a lot: the summed objective
    raises λ_0 (task 1 gains), the own-task objective lowers it (task 0 loses)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4, bias=False)
    model.forward = lambda x, _lin=model: type("Out", (), {"logits": torch.nn.functional.linear(x, _lin.weight)})()
    w0 = model.weight.detach()
    tau0 = torch.cat([-0.1 * w0[:2], 3.0 * w0[2:]])
    tvs = [TaskVector.from_tensors({"weight": tau0}), TaskVector.from_tensors({"weight": torch.zeros(4, 4)})]
    x = torch.randn(16, 4)
    tasks = [EntropyTask("0", [{"x": x}], logits=lambda out, b: out.logits[:, :2]),
             EntropyTask("1", [{"x": x}], logits=lambda out, b: out.logits[:, 2:])]
    summed = adamerge(model, tvs, tasks, granularity="task", steps=1, lr=0.01, progress=False, **PAPER)
    own = adamerge(model, tvs, tasks, granularity="task", steps=1, lr=0.01, own_task_gradient=True, progress=False, **PAPER)
    assert torch.isclose(summed.coefficients[0, 0], torch.tensor(0.31))
    assert torch.isclose(own.coefficients[0, 0], torch.tensor(0.29))


def test_clamped_coefficients_stay_at_the_bound():
    model, tvs, tasks = _sharpening_setup()
    clamped = adamerge(model, tvs, tasks, objective="entropy", init=0.95, lr=0.05, steps=20, granularity="task", progress=False)
    assert torch.equal(clamped.coefficients, torch.ones(1, 2))
    free = adamerge(model, tvs, tasks, objective="entropy", init=0.95, lr=0.05, steps=20, granularity="task", clamp=None,
                    progress=False)
    assert (free.coefficients > 1.5).all()
    assert free.entropy[-1] < free.entropy[0]


def test_regularisation_toward_init_and_early_stopping():
    model, tvs, tasks = _sharpening_setup()
    free = adamerge(model, tvs, tasks, lr=0.05, steps=30, granularity="task", progress=False, **PAPER)
    pulled = adamerge(model, tvs, tasks, lr=0.05, steps=30, granularity="task", reg_to_init=50.0, progress=False, **PAPER)
    assert (pulled.coefficients - 0.3).abs().max() < (free.coefficients - 0.3).abs().min() / 3
    stopped = adamerge(model, tvs, tasks, lr=0.05, steps=30, granularity="task", patience=2, min_delta=0.5, progress=False,
                       **PAPER)
    assert len(stopped.entropy) == 3  # best at step 0, then 2 steps without a 50 % improvement


def test_adamerging_plus_plus_uses_ties_processed_vectors():
    model, tvs, tasks = _toy_setup()
    result = adamerge(model, tvs, tasks, steps=2, ties_density=0.2, progress=False)
    assert [tv.label for tv in result.task_vectors] == ["TIES(t0)", "TIES(t1)"]
    processed = result.task_vectors[0].get("first.weight")
    assert (processed != 0).sum() <= max(1, int(0.2 * 9))


def test_bad_input():
    model, tvs, tasks = _toy_setup()
    with pytest.raises(ValueError, match="task 't0': no batches"):
        adamerge(model, tvs, [EntropyTask("t0", []), tasks[1]], progress=False)
    with pytest.raises(ValueError, match="task 't0': no batches"):
        adamerge(model, tvs, [EntropyTask("t0", (b for b in [])), tasks[1]], progress=False)
    with pytest.raises(TypeError, match="task 't1': batch 0 is Tensor"):
        adamerge(model, tvs, [tasks[0], EntropyTask("t1", [torch.ones(3)])], progress=False)
    with pytest.raises(ValueError, match="exactly one of batches"):
        EntropyTask("t0")
    with pytest.raises(ValueError, match="same number of rows"):
        EntropyTask("t0", inputs={"x": torch.ones(3, 2), "y": torch.ones(4)})
    with pytest.raises(ValueError, match="2 task vectors but 1 tasks"):
        adamerge(model, tvs, tasks[:1], progress=False)
    with pytest.raises(KeyError, match="not parameters of the model"):
        adamerge(model, [TaskVector.from_tensors({"nope": torch.ones(1)})] * 2, tasks, progress=False)
    with pytest.raises(ValueError, match="granularity: 'tensor' is not allowed"):
        AdaMergingConfig(granularity="tensor")
    with pytest.raises(ValueError, match="objective: 'accuracy' is not allowed"):
        AdaMergingConfig(objective="accuracy")
    with pytest.raises(ValueError, match="init: expected a number or 'search'"):
        AdaMergingConfig(init="zero")
    with pytest.raises(ValueError, match="batch_size: must be >= 1"):
        AdaMergingConfig(batch_size=0)
    with pytest.raises(ValueError, match="change no parameter"):
        adamerge(model, [TaskVector.from_tensors({})] * 2, tasks, progress=False)


def test_classifier_heads_and_outputs(tmp_path):
    """(a) one frozen head per task on a shared tiny BERT backbone; JSON + heatmap + merged state."""
    base = tiny_model("bert")
    heads = [nn.Linear(32, c) for c in (2, 3)]
    tvs = [TaskVector.from_models(base, perturbed(tiny_model("bert"), seed=k)) for k in range(2)]
    ids = torch.randint(3, 128, (4, 10))
    tasks = [EntropyTask(f"task{k}", [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                         logits=lambda out, batch, h=heads[k]: h(out.last_hidden_state[:, 0])) for k in range(2)]
    result = adamerge(base, tvs, tasks, steps=3, lr=0.01, progress=False)
    assert result.coefficients.shape == (len(list(base.parameters())), 2)
    data = json.loads(result.save_json(tmp_path / "c.json").read_text())
    assert data["tasks"] == ["task0", "task1"] and len(data["coefficients"]) == len(data["rows"])
    assert result.plot(tmp_path / "c.png").stat().st_size > 1000
    merged = result.merge(base, progress=False)
    name = "encoder.layer.1.output.dense.weight"
    lam = result.coefficients[result.rows.index(name)]
    expected = base.state_dict()[name] + lam[0] * tvs[0].get(name) + lam[1] * tvs[1].get(name)
    assert torch.allclose(merged[name], expected, atol=1e-6)


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def test_causal_lm_adamerging_from_the_cli(tmp_path):
    """(b) next-token entropy on unlabelled prompts, through `modular merge`."""
    tokenizer = _byte_tokenizer()
    base = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    models = []
    for k in range(2):
        perturbed(tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id), seed=k).save_pretrained(tmp_path / f"ft{k}")
        (tmp_path / f"p{k}.txt").write_text("\n".join(f"prompt {k} number {i}" for i in range(5)))
        models.append({"model": str(tmp_path / f"ft{k}"), "data": str(tmp_path / f"p{k}.txt")})
    config = {"merge_method": "adamerging", "base_model": str(tmp_path / "base"), "models": models,
              "adamerging": {"granularity": "layer", "steps": 3, "batch_size": 2, "max_length": 16, "init": 0.5}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    out = tmp_path / "out"
    coeffs = json.loads((out / "adamerging_coefficients.json").read_text())
    assert len(coeffs["entropy"]) == 3 and (out / "adamerging_coefficients.png").is_file()
    assert "AdaMerging coefficients" in (out / "README.md").read_text() and (out / "tokenizer.json").is_file()
    merged, base_sd = load_model(out).state_dict(), load_model(tmp_path / "base").state_dict()
    fts = [load_model(tmp_path / f"ft{k}").state_dict() for k in range(2)]
    name = "model.layers.0.self_attn.q_proj.weight"
    lam = coeffs["coefficients"][coeffs["rows"].index(name)]
    expected = base_sd[name] + sum(lam[k] * (fts[k][name] - base_sd[name]) for k in range(2))
    assert torch.allclose(merged[name], expected, atol=1e-6)


def test_callback_snapshots_and_per_task_entropy():
    """The callback sees the coefficients each step evaluated (not the updated ones, also with
    clamp=None where λ is the optimised tensor itself); per-task entropies sum to the total."""
    model, tvs, tasks = _toy_setup()
    seen = []
    result = adamerge(model, tvs, tasks, granularity="task", steps=3, lr=0.01, clamp=None, progress=False, **PAPER,
                      callback=lambda step, snap: seen.append((step, snap.coefficients.clone(), snap.entropy[-1])))
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert torch.equal(seen[0][1], torch.full((1, 2), 0.3))
    for (_, lam, total), per_task in zip(seen, result.task_entropy):
        assert torch.isclose(torch.tensor(total), _toy_loss(model, tvs, tasks, lam), atol=1e-6)
        assert abs(sum(per_task) - total) < 1e-5 and len(per_task) == 2
    assert not torch.equal(seen[-1][1], result.coefficients)  # the final λ is one step further


def _bert_tasks(lengths=(10, 6)):
    """Two tasks on a tiny BERT, right-padded batches of different lengths, a head per task."""
    base = tiny_model("bert")
    torch.manual_seed(0)
    heads = [nn.Linear(32, c) for c in (2, 3)]
    tvs = [TaskVector.from_models(base, perturbed(tiny_model("bert"), seed=k)) for k in range(2)]
    tasks = []
    for k, width in enumerate(lengths):
        ids = torch.randint(3, 128, (4, width))
        mask = torch.ones_like(ids)
        mask[1, width // 2 :] = 0
        tasks.append(EntropyTask(f"task{k}", [{"input_ids": ids * mask, "attention_mask": mask}],
                                 logits=lambda out, batch, h=heads[k]: h(out.last_hidden_state[:, 0])))
    return base, tvs, tasks


@pytest.mark.parametrize("objective", ["entropy", "agreement"])
def test_fused_forward_takes_the_same_step(objective):
    base, tvs, tasks = _bert_tasks()
    fused = adamerge(base, tvs, tasks, steps=2, lr=0.01, objective=objective, progress=False)
    apart = adamerge(base, tvs, tasks, steps=2, lr=0.01, objective=objective, fuse_tasks=False, progress=False)
    assert torch.allclose(torch.tensor(fused.task_entropy), torch.tensor(apart.task_entropy), atol=1e-5)
    assert torch.allclose(fused.coefficients, apart.coefficients, atol=1e-6)


def test_agreement_is_zero_at_the_task_model_and_the_search_finds_it():
    base, tvs, tasks = _bert_tasks()
    at_model = adamerge(base, tvs[:1], tasks[:1], steps=1, init=1.0, granularity="task", objective="agreement", progress=False)
    assert at_model.entropy[0] < 1e-6
    searched = adamerge(base, tvs[:1], tasks[:1], steps=1, init="search", granularity="task", objective="agreement", progress=False)
    assert searched.init == 1.0 and searched.entropy[0] < 1e-6
    normalized = adamerge(base, tvs, tasks, steps=1, objective="entropy", normalize=True, progress=False)
    plain = adamerge(base, tvs, tasks, steps=1, objective="entropy", progress=False)
    for norm, raw, classes in zip(normalized.task_entropy[0], plain.task_entropy[0], (2, 3)):
        assert norm == pytest.approx(raw / math.log(classes), rel=1e-5)


def test_block_granularity_rows():
    from merging.adamerging import block_of

    assert block_of("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert block_of("embeddings.word_embeddings.weight") == "embeddings.word_embeddings"
    base, tvs, tasks = _bert_tasks()
    result = adamerge(base, tvs, tasks, steps=1, granularity="block", progress=False)
    assert "encoder.layer.1" in result.rows and len(result.rows) < len(list(base.parameters()))
    name = "encoder.layer.1.output.dense.weight"
    assert result.weights_for(name) == result.coefficients[result.rows.index("encoder.layer.1")].tolist()


def test_yaml_section_has_the_python_defaults_and_every_option(tmp_path):
    """`modular merge`'s `adamerging:` section: the same defaults as AdaMergingConfig, and the
    options of the learned merge (objective, init search, block granularity...) reach it."""
    import dataclasses

    from merging.config import load_merge_config

    (tmp_path / "a.txt").write_text("an input\n")

    def section(adamerging):
        config = {"merge_method": "adamerging", "base_model": str(tmp_path), "models": [{"model": str(tmp_path), "data": str(tmp_path / "a.txt")}]}
        if adamerging is not None:
            config["adamerging"] = adamerging
        (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
        return load_merge_config(tmp_path / "m.yaml").adamerging.method_config()

    assert dataclasses.asdict(section(None)) == dataclasses.asdict(AdaMergingConfig())
    assert section(None).objective == "agreement" and section(None).init == "search"
    given = {"objective": "entropy", "init": 0.3, "init_grid": [0.2, 0.4], "granularity": "block", "normalize": True,
             "fuse_tasks": False, "clamp": None, "lr": 1e-3, "steps": 500, "batch_size": 8, "shuffle": True, "seed": 3}
    assert {k: getattr(section(given), k) for k in given} == given
    with pytest.raises(ValueError, match="objective: 'accuracy' is not allowed"):
        section({"objective": "accuracy"})


def test_streamed_task_vectors_give_the_same_coefficients_and_are_not_held():
    """stream_task_vectors: the deltas are re-read from the task vectors (here, counted reads)
    whenever a step needs them, at most a module's worth is kept, and the result is the same."""
    from merging import adamerging as module

    base, tvs, tasks = _bert_tasks()
    held = adamerge(base, tvs, tasks, steps=3, progress=False)
    reads = []
    counted = [TaskVector(tv.shapes, lambda n, tv=tv: reads.append(n) or tv.get(n), label=tv.label) for tv in tvs]
    largest = []
    original = module._StreamedDeltas.__getitem__

    def watched(self, name):
        largest.append(len(self.recent))
        return original(self, name)

    module._StreamedDeltas.__getitem__ = watched
    try:
        streamed = adamerge(base, counted, tasks, steps=3, stream_task_vectors=True, progress=False)
    finally:
        module._StreamedDeltas.__getitem__ = original
    assert torch.equal(streamed.coefficients, held.coefficients)
    assert streamed.entropy == held.entropy
    tensors = len(list(base.parameters()))
    assert len(reads) > 2 * 3 * tensors * len(tvs)  # every tensor of every task, in forward and backward of each step
    assert max(largest) <= module._StreamedDeltas.KEEP


def test_batches_from_a_generator_from_whole_inputs_and_shuffled():
    """The data forms of EntropyTask: a generator is read once and cycled like the list it gave;
    ``inputs`` are cut into ``batch_size`` rows with unused right padding dropped; ``shuffle``
    visits every batch once per pass, in a seeded order that changes between passes."""
    from merging.adamerging import _cut_rows, _TaskBatches

    model, tvs, tasks = _toy_setup()
    batches = [{"x": torch.randn(4, 3)} for _ in range(3)]
    listed = adamerge(model, tvs, [EntropyTask("a", batches), tasks[1]], steps=5, init=0.3, progress=False)
    generated = adamerge(model, tvs, [EntropyTask("a", (b for b in batches)), tasks[1]], steps=5, init=0.3, progress=False)
    assert torch.equal(listed.coefficients, generated.coefficients)

    whole = adamerge(model, tvs, [EntropyTask("a", inputs={"x": torch.cat([b["x"] for b in batches])}), tasks[1]],
                     steps=5, init=0.3, batch_size=4, progress=False)
    assert torch.equal(whole.coefficients, listed.coefficients)

    ids = torch.arange(12).reshape(4, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    cut = _cut_rows({"input_ids": ids, "attention_mask": mask}, 2, None)
    assert [b["input_ids"].shape for b in cut] == [(2, 2), (2, 3)]
    assert torch.equal(cut[0]["input_ids"], ids[:2, :2])

    config = AdaMergingConfig(shuffle=True, seed=1)
    data = _TaskBatches(EntropyTask("a", [{"x": torch.full((1, 3), float(i))} for i in range(4)]), 0, config)
    passes = [[data.index(step) for step in range(p * 4, p * 4 + 4)] for p in range(3)]
    assert all(sorted(order) == [0, 1, 2, 3] for order in passes) and len({tuple(o) for o in passes}) > 1
    again = _TaskBatches(EntropyTask("a", data.kept), 0, config)
    assert [again.index(step) for step in range(12)] == [i for order in passes for i in order]

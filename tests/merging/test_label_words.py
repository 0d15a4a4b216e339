"""LabelWordTask: class scores of a causal LM at the last prompt position, accuracy, entropy."""

import math
from types import SimpleNamespace

import pytest
import torch

from merging import entropy
from merging.label_words import LabelWordTask, class_logits
from modular.app.corpora import train_tokenizer

WORDS = ["apple", "banana", "cherry"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["the apple and the banana and the cherry fruit salad"] * 20, vocab_size=160)


def test_class_logits_read_the_last_real_position_of_each_row():
    logits = torch.arange(2 * 4 * 6, dtype=torch.float).reshape(2, 4, 6)
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    out = class_logits(SimpleNamespace(logits=logits), batch, torch.tensor([5, 1]))
    # row 0 answers at position 2, row 1 at position 3; columns are vocab ids 5 and 1
    assert out.tolist() == [[logits[0, 2, 5].item(), logits[0, 2, 1].item()], [logits[1, 3, 5].item(), logits[1, 3, 1].item()]]


def test_batches_are_right_padded_prompts_without_special_tokens(tokenizer):
    task = LabelWordTask("fruit", ["the apple", "the banana and the cherry"], WORDS)
    (batch,) = task.batches(tokenizer, batch_size=8)
    ids = [tokenizer("the apple", add_special_tokens=False)["input_ids"], tokenizer("the banana and the cherry", add_special_tokens=False)["input_ids"]]
    assert batch["attention_mask"].sum(1).tolist() == [len(ids[0]), len(ids[1])]
    assert batch["input_ids"][0, : len(ids[0])].tolist() == ids[0]
    assert batch["input_ids"][1].tolist() == ids[1]


class _AnswerModel(torch.nn.Module):
    """Puts a high logit on ``answers[i]`` at the last real position of row i (one batch)."""

    def __init__(self, vocab: int, answers: list[int]):
        super().__init__()
        self.vocab, self.answers = vocab, answers

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        last = attention_mask.sum(1) - 1
        for i, token in enumerate(self.answers):
            logits[i, last[i], token] = 5.0
        return SimpleNamespace(logits=logits)


def test_accuracy_compares_argmax_over_label_words_with_labels(tokenizer):
    task = LabelWordTask("fruit", ["the apple", "the banana", "the cherry", "the apple"], WORDS, labels=[0, 1, 2, 2])
    ids = task.label_token_ids(tokenizer)
    model = _AnswerModel(len(tokenizer), [ids[0], ids[1], ids[2], ids[0]])  # last one wrong
    assert task.predict(model, tokenizer).tolist() == [0, 1, 2, 0]
    assert task.accuracy(model, tokenizer) == pytest.approx(0.75)


def test_accuracy_on_pretokenised_batches_does_not_tokenise_again(tokenizer, monkeypatch):
    task = LabelWordTask("fruit", ["the apple", "the banana", "the cherry", "the apple"], WORDS, labels=[0, 1, 2, 2])
    ids = task.label_token_ids(tokenizer)
    model = _AnswerModel(len(tokenizer), [ids[0], ids[1], ids[2], ids[0]])
    pretokenised = task.batches(tokenizer, batch_size=4)  # what a caller scoring several models keeps

    def tokenise_again(*args, **kwargs):
        raise AssertionError("prompts tokenised again")

    monkeypatch.setattr(task, "batches", tokenise_again)
    assert task.accuracy(model, tokenizer, batches=pretokenised) == pytest.approx(0.75)


def test_entropy_task_scores_only_the_label_words(tokenizer):
    task = LabelWordTask("fruit", ["the apple", "the banana"], WORDS)
    ids = task.label_token_ids(tokenizer)
    entropy_task = task.entropy_task(tokenizer)
    model = _AnswerModel(len(tokenizer), [ids[0], ids[1]])
    batch = entropy_task.batches[0]
    value = entropy(entropy_task.logits(model(**batch), batch), batch["attention_mask"]).item()
    p = torch.softmax(torch.tensor([5.0, 0.0, 0.0]), 0)  # one label word at 5, the two others at 0
    assert value == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)
    assert value < math.log(3)


def test_label_words_sharing_a_first_token_are_refused(tokenizer):
    with pytest.raises(ValueError, match="same token"):
        LabelWordTask("fruit", ["x"], ["apple", "apple"]).label_token_ids(tokenizer)


def test_labels_must_match_prompts():
    with pytest.raises(ValueError, match="2 labels for 1 prompts"):
        LabelWordTask("fruit", ["x"], WORDS, labels=[0, 1])


@pytest.mark.parametrize("objective", ["entropy", "agreement"])
def test_causal_lm_adamerging_on_label_words(tokenizer, objective):
    """Label-word AdaMerging of two tiny llamas: agreement starts at 0 on the task model itself,
    and one fused forward over both tasks' prompts gives the same step as one forward per task."""
    from merging import TaskVector, adamerge
    from modular.testing import tiny_model

    from .conftest import perturbed

    base = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=0)
    tvs = [TaskVector.from_models(base, perturbed(tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=0), seed=k)) for k in range(2)]
    tasks = [LabelWordTask("a", ["the apple and", "the cherry fruit salad and the"], WORDS).entropy_task(tokenizer),
             LabelWordTask("b", ["banana", "the fruit"], WORDS[:2]).entropy_task(tokenizer)]
    fused = adamerge(base, tvs, tasks, steps=2, lr=0.01, objective=objective, progress=False)
    apart = adamerge(base, tvs, tasks, steps=2, lr=0.01, objective=objective, fuse_tasks=False, progress=False)
    assert torch.allclose(fused.coefficients, apart.coefficients, atol=1e-6)
    assert torch.allclose(torch.tensor(fused.task_entropy), torch.tensor(apart.task_entropy), atol=1e-5)
    if objective == "agreement":
        own = adamerge(base, tvs[:1], tasks[:1], steps=1, init=1.0, granularity="task", objective=objective, progress=False)
        assert own.entropy[0] < 1e-6

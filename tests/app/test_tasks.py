"""Classification tasks (modular.app.tasks) on synthetic dictionary entries and package
descriptions (no GCIDE, no apt index needed)."""

from __future__ import annotations

import pytest

from modular.app import tasks

FIELD_LABELS = {"Anat": "anatomy", "Min": "mineralogy", "Naut": "navigation", "Mus": "music", "Arch": "architecture"}


def _entry(word: str, pos: str, label: str, origin: str, number: int) -> str:
    return (f'{word}{number} \\{word}"{number}\\, {pos} [{origin}. {word}us.] ({label}.)\n'
            f"   A {word} thing of kind {number} used in {label.lower()} and other matters.\n"
            "   [1913 Webster]")


@pytest.fixture
def fake_gcide(monkeypatch):
    """10 entries per field label, each also carrying a part of speech and a source language."""
    entries = []
    for k, label in enumerate(FIELD_LABELS):
        for i in range(10):
            entries.append(_entry(f"w{k}", ["n.", "v. t.", "a.", "adv."][i % 4], label, ["L", "F", "Gr", "AS"][i % 4], i))
    monkeypatch.setattr(tasks, "gcide_entries", lambda: entries)
    return entries


def test_field_task_is_balanced_labelled_and_label_free(fake_gcide):
    task = tasks.text_tasks(("field",), train=30, test=20)["field"]
    assert task.classes == sorted(FIELD_LABELS.values())
    examples = task.train + task.test
    assert len(task.train) == 30 and len(task.test) == 20
    assert [sum(label == c for _, label in examples) for c in range(5)] == [10] * 5
    for text, label in examples:  # the label mark is removed; the text still names the field it came from
        assert "(" not in text
        abbreviation = [a for a, word in FIELD_LABELS.items() if word == task.classes[label]][0]
        assert abbreviation.lower() in text


def test_a_tasks_split_does_not_depend_on_the_other_tasks_requested(fake_gcide):
    alone = tasks.text_tasks(("etymology",), train=12, test=8)["etymology"]
    together = tasks.text_tasks(("pos", "field", "etymology"), train=12, test=8)["etymology"]
    assert alone.train == together.train and alone.test == together.test
    assert tasks.text_tasks(("etymology",), train=12, test=8, seed=1)["etymology"].train != alone.train


def test_unknown_task_and_too_few_examples_are_clear_errors(fake_gcide):
    with pytest.raises(KeyError, match="unknown task"):
        tasks.text_tasks(("sentiment",))
    with pytest.raises(ValueError, match="needed"):
        tasks.text_tasks(("field",), train=100, test=100)


def test_software_task_maps_sections_to_class_words_and_drops_parentheticals(monkeypatch):
    sections = {"games": "games", "graphics": "graphics", "mail": "email", "science": "science", "sound": "audio"}
    packages = [(section, f"{section} tool number {i} (data files)") for section in sections for i in range(4)]
    packages += [("libs", "a library nobody asked for"), ("games", "tiny (x)")]  # other section; < 3 words
    monkeypatch.setattr(tasks, "debian_package_descriptions", lambda: packages)
    monkeypatch.setattr(tasks, "gcide_entries", lambda: pytest.fail("GCIDE read for a software-only request"))
    task = tasks.text_tasks(("software",), train=15, test=5)["software"]
    assert task.classes == sorted(sections.values())
    for text, label in task.train + task.test:
        section = text.split()[0]
        assert sections[section] == task.classes[label] and "(" not in text


def test_validation_split_is_disjoint_and_leaves_the_test_split_of_its_size(fake_gcide):
    split = tasks.text_tasks(("field",), train=20, validation=10, test=10)["field"]
    assert (len(split.train), len(split.validation), len(split.test)) == (20, 10, 10)
    texts = [{t for t, _ in part} for part in (split.train, split.validation, split.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert tasks.text_tasks(("field",), train=30, test=10)["field"].validation == []

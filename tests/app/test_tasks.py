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


def test_confirmation_tasks_map_sources_to_their_classes(monkeypatch):
    """wn_noun / wn_verb keep their four lexicographer files; foldoc merges hardware, processor and
    storage and takes the first tag; fortune labels a cookie by its file; short texts are dropped."""
    nouns = [(f"noun.{c}", f"a {c} gloss number {i}") for c in ("act", "artifact", "person", "state", "animal") for i in range(3)]
    verbs = [(f"verb.{c}", f"to {c} something {i}") for c in ("change", "communication", "contact", "motion") for i in range(3)]
    verbs.append(("verb.motion", "move fast"))  # under 3 words
    monkeypatch.setattr(tasks, "wordnet_glosses", lambda pos: {"noun": nouns, "verb": verbs}[pos])
    foldoc = [(f"h{i}", [tag, "language"], f"an entry about {tag} number {i} here") for tag in ("hardware", "processor", "storage")
              for i in range(2)]
    foldoc += [(f"l{i}", ["language"], f"a language entry {i} with words") for i in range(6)]
    foldoc += [(f"n{i}", ["networking"], f"a networking entry {i} with words") for i in range(6)]
    foldoc += [(f"p{i}", ["programming"], f"a programming entry {i} with words") for i in range(6)]
    foldoc += [("x", ["games"], "a games entry that is not a class"), ("y", ["language"], "too short")]
    monkeypatch.setattr(tasks, "foldoc_entries", lambda: foldoc)
    monkeypatch.setattr(tasks, "fortune_cookies", lambda name: [f"{name} cookie number {i}" for i in range(3)] + ["two words"])
    monkeypatch.setattr(tasks, "gcide_entries", lambda: pytest.fail("GCIDE read for the confirmation set"))
    got = tasks.text_tasks("confirm", train=8, validation=0, test=4)
    assert list(got) == ["wn_noun", "wn_verb", "foldoc", "fortune"]
    assert got["wn_noun"].classes == ["act", "artifact", "person", "state"]
    assert got["foldoc"].classes == ["hardware", "language", "networking", "programming"]
    assert got["fortune"].classes == ["politics", "science", "songs-poems", "work"]
    for task in got.values():
        for text, label in task.train + task.test:
            assert len(text.split()) >= 3
            if task.name == "foldoc":
                expected = "hardware" if text.split()[3] in ("hardware", "processor", "storage") else text.split()[1]
                assert task.classes[label] == expected
            else:  # "a act gloss ...", "to change something ...", "politics cookie ..."
                assert task.classes[label] == text.split()[0 if task.name == "fortune" else 1]
    assert tasks.TASK_SETS["dev"] == ("pos", "domain", "etymology", "software")
    assert set(tasks.TASK_SETS["dev"]).isdisjoint(tasks.TASK_SETS["confirm"])

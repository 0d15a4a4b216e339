"""Real text-classification tasks from data that ships offline (reproducible, no hub).

Four map a GCIDE dictionary definition to a class word:

* ``pos``: the headword's part of speech (noun / verb / adjective / adverb), from its first
  definition with the headword removed;
* ``domain``: the entry's subject label (zoology / botany / chemistry / medicine / law), from
  the definition with the label itself removed;
* ``field``: the entry's field label, another set of subjects (anatomy / mineralogy /
  navigation / music / architecture), label removed as for ``domain``;
* ``etymology``: the headword's source language (latin / french / greek / anglo-saxon), from
  "headword: definition".

One maps a Debian package's one-line description (apt's package index) to its section:

* ``software``: games / graphics / email (section mail) / science / audio (section sound),
  with a trailing parenthetical such as "(data files)" removed.

Classes are balanced and the split is seeded, so every run sees the same examples.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .corpora import debian_package_descriptions, gcide_entries

__all__ = ["GCIDE_TASKS", "TASK_NAMES", "TextTask", "text_tasks"]

_HEADER = re.compile(r"^(?P<word>[^\\\n]+?) \\[^\\]*\\(?: \([^)]*\))?,? (?P<pos>n\.|v\. t\.|v\. i\.|a\.|adv\.)")
_POS = {"n.": "noun", "v. t.": "verb", "v. i.": "verb", "a.": "adjective", "adv.": "adverb"}
_DOMAINS = {"Zool": "zoology", "Bot": "botany", "Chem": "chemistry", "Med": "medicine", "Law": "law"}
_FIELDS = {"Anat": "anatomy", "Min": "mineralogy", "Naut": "navigation", "Mus": "music", "Arch": "architecture"}
# subject-label tasks: task -> (label mark in an entry, class word per label)
_LABEL_TASKS = {name: (re.compile(r"\((" + "|".join(labels) + r")\.?\)"), labels)
                for name, labels in (("domain", _DOMAINS), ("field", _FIELDS))}
_ORIGINS = {"L": "latin", "F": "french", "Gr": "greek", "AS": "anglo-saxon"}
_ORIGIN_MARK = re.compile(r"\[(L|F|Gr|AS)\.")
_SECTIONS = {"games": "games", "graphics": "graphics", "mail": "email", "science": "science", "sound": "audio"}
_PARENTHETICAL = re.compile(r"\s*\([^)]*\)\s*$")
GCIDE_TASKS = ("pos", "domain", "field", "etymology")
TASK_NAMES = (*GCIDE_TASKS, "software")


@dataclass
class TextTask:
    """``train``/``validation``/``test``: lists of (text, class index); ``classes``: the class words."""

    name: str
    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    validation: list[tuple[str, int]] = field(default_factory=list)


def _first_definition(entry: str, header_end: int) -> str:
    """First sense of an entry: etymology/usage brackets, quotation authors and markup removed."""
    body = re.sub(r"\[[^\]\[\s]{1,5}\]", "", entry[header_end:])  # character markup such as [=i]
    body = re.split(r"\[(?:1913 Webster|WordNet|PJC)", body)[0]
    body = re.sub(r"\[[^\]]*\]?", " ", body)  # etymology and usage brackets (may span lines)
    body = re.sub(r"--[A-Z][\w.]*", " ", body)  # quotation authors
    body = re.sub(r"[{}]", "", body)
    body = re.sub(r"^[\s;,.]*(?:1\.\s*)?", "", body)
    return re.sub(r"\s+", " ", body).strip()


def _gcide_pools() -> dict[str, dict[str, list[str]]]:
    pools: dict[str, dict[str, list[str]]] = {name: {} for name in GCIDE_TASKS}
    for entry in gcide_entries():
        header = _HEADER.match(entry)
        if not header:
            continue
        definition = _first_definition(entry, header.end())
        if len(definition.split()) < 4:
            continue
        pools["pos"].setdefault(_POS[header.group("pos")], []).append(definition)
        for name, (mark, labels) in _LABEL_TASKS.items():
            label = mark.search(entry)
            if label:
                pools[name].setdefault(labels[label.group(1)], []).append(mark.sub("", definition).strip())
        origin = _ORIGIN_MARK.search(entry[:400])
        if origin:
            word = header.group("word").split(",")[0].strip()
            pools["etymology"].setdefault(_ORIGINS[origin.group(1)], []).append(f"{word}: {definition}")
    return pools


def _software_pools() -> dict[str, dict[str, list[str]]]:
    pools: dict[str, list[str]] = {}
    for section, description in debian_package_descriptions():
        text = _PARENTHETICAL.sub("", description).strip()
        if section in _SECTIONS and len(text.split()) >= 3:
            pools.setdefault(_SECTIONS[section], []).append(text)
    return {"software": pools}


def _class_pools(names: tuple[str, ...]) -> dict[str, dict[str, list[str]]]:
    """Class -> texts for each requested task, reading only the corpora those tasks need."""
    pools = _gcide_pools() if set(names) & set(GCIDE_TASKS) else {}
    if "software" in names:
        pools.update(_software_pools())
    return pools


def text_tasks(names: tuple[str, ...] = TASK_NAMES, *, train: int = 1200, test: int = 400, validation: int = 0,
               seed: int = 0) -> dict[str, TextTask]:
    """Balanced, seeded classification tasks (``train`` + ``validation`` + ``test`` examples each,
    disjoint; with ``validation=0`` the splits are those of earlier versions)."""
    unknown = set(names) - set(TASK_NAMES)
    if unknown:
        raise KeyError(f"unknown task(s) {sorted(unknown)}; known: {', '.join(TASK_NAMES)}")
    pools = _class_pools(tuple(names))
    tasks = {}
    for name in names:
        rng = random.Random(f"{seed}:{name}")  # a task's split does not depend on the others requested
        classes = sorted(pools[name])
        per_class = (train + validation + test) // len(classes)
        examples = []
        for label, cls in enumerate(classes):
            texts = sorted(set(pools[name][cls]))
            if len(texts) < per_class:
                raise ValueError(f"task {name}: class {cls!r} has {len(texts)} distinct examples, {per_class} needed")
            rng.shuffle(texts)
            examples += [(text, label) for text in texts[:per_class]]
        rng.shuffle(examples)
        tasks[name] = TextTask(name, classes, train=examples[test + validation:], test=examples[:test],
                               validation=examples[test:test + validation])
    return tasks

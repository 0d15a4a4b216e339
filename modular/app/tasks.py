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

Four more from other offline sources (the AdaMerging confirmation set):

* ``wn_noun``: a WordNet 3.0 noun gloss (definition only, no lemma, no example sentence) ->
  its lexicographer file: act / artifact / person / state;
* ``wn_verb``: the same for verbs: change / communication / contact / motion;
* ``foldoc``: the first paragraph of a FOLDOC entry, category tags removed -> its first
  category: hardware (FOLDOC's hardware, processor and storage) / language / networking /
  programming;
* ``fortune``: a fortune cookie -> its fortune file: politics / science / songs-poems / work.

Classes are balanced and the split is seeded, so every run sees the same examples.
``TASK_SETS`` names the development and confirmation sets of the AdaMerging benchmark.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .corpora import debian_package_descriptions, foldoc_entries, fortune_cookies, gcide_entries, wordnet_glosses

__all__ = ["GCIDE_TASKS", "TASK_NAMES", "TASK_SETS", "TextTask", "text_tasks"]

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
_WORDNET_CLASSES = {"wn_noun": ("noun", ("act", "artifact", "person", "state")),
                    "wn_verb": ("verb", ("change", "communication", "contact", "motion"))}
_FOLDOC_CLASSES = {"hardware": "hardware", "processor": "hardware", "storage": "hardware",
                   "language": "language", "networking": "networking", "programming": "programming"}
_FORTUNE_FILES = ("politics", "science", "songs-poems", "work")
GCIDE_TASKS = ("pos", "domain", "field", "etymology")
TASK_NAMES = (*GCIDE_TASKS, "software", "wn_noun", "wn_verb", "foldoc", "fortune")
# the AdaMerging benchmark's task sets: every choice is made on "dev"; "confirm" only checks it
TASK_SETS = {"dev": ("pos", "domain", "etymology", "software"), "confirm": ("wn_noun", "wn_verb", "foldoc", "fortune")}


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


def _wordnet_pools(name: str) -> dict[str, list[str]]:
    """Lexicographer file -> glosses of 3 words or more."""
    pos, classes = _WORDNET_CLASSES[name]
    pools: dict[str, list[str]] = {}
    for lexname, definition in wordnet_glosses(pos):
        cls = lexname.split(".", 1)[1]
        if cls in classes and len(definition.split()) >= 3:
            pools.setdefault(cls, []).append(definition)
    return pools


def _foldoc_pools() -> dict[str, list[str]]:
    """First paragraph -> first category; entries under 6 words (bare cross-references) are skipped."""
    pools: dict[str, list[str]] = {}
    for _, tags, paragraph in foldoc_entries():
        if tags and tags[0] in _FOLDOC_CLASSES and len(paragraph.split()) >= 6:
            pools.setdefault(_FOLDOC_CLASSES[tags[0]], []).append(paragraph)
    return pools


def _fortune_pools() -> dict[str, list[str]]:
    return {name: [c for c in fortune_cookies(name) if len(c.split()) >= 3] for name in _FORTUNE_FILES}


def _class_pools(names: tuple[str, ...]) -> dict[str, dict[str, list[str]]]:
    """Class -> texts for each requested task, reading only the corpora those tasks need."""
    pools = _gcide_pools() if set(names) & set(GCIDE_TASKS) else {}
    if "software" in names:
        pools.update(_software_pools())
    for name in set(names) & set(_WORDNET_CLASSES):
        pools[name] = _wordnet_pools(name)
    if "foldoc" in names:
        pools["foldoc"] = _foldoc_pools()
    if "fortune" in names:
        pools["fortune"] = _fortune_pools()
    return pools


def text_tasks(names: tuple[str, ...] = TASK_NAMES, *, train: int = 1200, test: int = 400, validation: int = 0,
               seed: int = 0) -> dict[str, TextTask]:
    """Balanced, seeded classification tasks (``train`` + ``validation`` + ``test`` examples each,
    disjoint; with ``validation=0`` the splits are those of earlier versions).

    ``names`` may also be one task's name or a key of ``TASK_SETS`` (``"dev"``, ``"confirm"``).
    """
    if isinstance(names, str):
        names = TASK_SETS.get(names, (names,))
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

"""The output vocabulary of a merge (mergekit's ``tokenizer:`` section) and the embedding rows
re-indexed to it, tensor by tensor.

``source``: ``base`` (the base's tokenizer), ``union`` (the base's vocabulary, then every other
model's tokens it lacks, in config order), or a model folder (its tokenizer). ``tokens:`` adds
tokens and says where a token's row comes from. Every vocabulary tensor (embeddings, output
head) of every input is re-indexed to the output vocabulary *before* the merge method runs
(mergekit 0.1.5, ``tokenizer/embed.py``): a token's row is the model's own row when the model has
the token (and it is not ``force``d); otherwise, in this order, the row ``tokens:`` names, the
row of the only model that has the token, the base's row, or the mean of the rows of the
models that have it. Rows added by ``pad_to_multiple_of`` are the mean of the real rows.

The tokenizer itself is built with transformers, once, before any tensor is read; per input only
an index map (one int per output token) is kept.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHAT_TEMPLATES", "Participant", "TokenizerSection", "VocabularyPlan", "chat_template_text", "check_chat_template",
           "set_chat_template"]

# Built-in chat template names (mergekit's `chat_template: NAME`), written for this project.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


@dataclass
class TokenizerSection:
    """mergekit's ``tokenizer:`` section (``tokenizer_source: X`` is ``tokenizer: {source: X}``)."""

    source: str = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of: {self.pad_to_multiple_of!r} is not allowed; expected a positive integer")
        for token, spec in (self.tokens or {}).items():
            _token_rule(token, spec or {})

    def referenced_models(self) -> list[str]:
        """Model paths named by ``tokens:`` entries (and ``source``), for input checks."""
        found = [] if self.source in ("union", "base") else [self.source]
        for spec in (self.tokens or {}).values():
            source = (spec or {}).get("source")
            if isinstance(source, str):
                found.append(source)
            elif isinstance(source, dict) and source.get("kind") == "model_token":
                found.append(source["model"])
        return found


def _token_rule(token: str, spec: Mapping) -> tuple[str, Any, bool]:
    """``(kind, detail, force)`` of one ``tokens:`` entry; kind is model, zero or model_token."""
    where = f"tokenizer.tokens.{token}"
    extra = sorted(set(spec) - {"source", "force"})
    if extra:
        raise ValueError(f"{where}: unknown key(s) {', '.join(extra)}; allowed: source, force")
    force = spec.get("force", False)
    if not isinstance(force, bool):
        raise ValueError(f"{where}.force: {force!r} is not allowed; expected true or false")
    source = spec.get("source")
    if source is None or isinstance(source, str):
        return "model", source, force
    if isinstance(source, dict) and source.get("kind") == "zero":
        return "zero", None, force
    if isinstance(source, dict) and source.get("kind") == "model_token" and isinstance(source.get("model"), str):
        if ("token" in source) == ("token_id" in source):
            raise ValueError(f"{where}.source: give exactly one of token and token_id")
        return "model_token", source, force
    raise ValueError(f"{where}.source: {source!r} is not allowed; expected a model, {{kind: zero}} or "
                     "{kind: model_token, model: M, token: T | token_id: N}")


@dataclass
class Participant:
    """One input as the vocabulary sees it: a label (its model string), the folder holding its
    tokenizer and config, and whether it is the base."""

    label: str
    folder: Path
    is_base: bool = False
    vocab: dict[str, int] = field(default_factory=dict)
    vocab_size: int = 0


def _vocab_size(folder: Path, tokenizer) -> int:
    config = folder / "config.json"
    size = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    return size or len(tokenizer.get_vocab())


def _load(folder: Path, fallback: Path | None = None):
    """``folder``'s tokenizer; for a model without one, ``fallback``'s (the base's), as mergekit assumes."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # transformers raises many kinds for a folder without a usable tokenizer
        if fallback is not None:
            warnings.warn(f"tokenizer: none loads from {str(folder)!r}; assuming the base's, as mergekit does", stacklevel=2)
            return _load(fallback)
        raise ValueError(f"tokenizer: cannot load a tokenizer from {str(folder)!r} ({err})") from None


def _union(base_tokenizer, others: Sequence) -> Any:
    """The base tokenizer plus every other tokenizer's tokens it lacks (normal ones first, then
    added/special tokens, first settings win), as mergekit's ``build_union_tokenizer``."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        base_tokenizer.save_pretrained(folder)
        union = AutoTokenizer.from_pretrained(folder)
    base_vocab = base_tokenizer.get_vocab()
    normal, added = {}, {}
    for tokenizer, vocab_size in others:
        special = tokenizer.added_tokens_decoder
        special_text = {info.content for info in special.values()}
        for token, index in tokenizer.get_vocab().items():
            if index < vocab_size and token not in special_text:
                normal.setdefault(token, None)
        for index, info in special.items():
            if index < vocab_size:
                added.setdefault(info.content, info)
    for token in normal:
        if token not in added and token not in base_vocab:
            union.add_tokens(token)
    for info in added.values():
        union.add_tokens(info)
    return union


class VocabularyPlan:
    """The output tokenizer and, per participant (the models in config order, then the base),
    the row of its embedding that each output token takes."""

    def __init__(self, section: TokenizerSection, participants: Sequence[Participant], tensors: Sequence[str]):
        self.section, self.participants, self.tensors = section, list(participants), list(tensors)
        base = next((i for i, p in enumerate(self.participants) if p.is_base), 0)
        tokenizers = [_load(p.folder, fallback=None if i == base else self.participants[base].folder)
                      for i, p in enumerate(self.participants)]
        for p, tokenizer in zip(self.participants, tokenizers):
            p.vocab, p.vocab_size = tokenizer.get_vocab(), _vocab_size(p.folder, tokenizer)
        unused = [t for t, i in self.participants[base].vocab.items() if i >= self.participants[base].vocab_size]
        if unused:
            raise ValueError(f"tokenizer: the base tokenizer has {len(unused)} tokens beyond its model's vocab_size "
                             f"(e.g. {unused[:3]}); stripping them is not supported yet")
        self.tokenizer = self._output_tokenizer(tokenizers, base)
        for token in section.tokens or {}:
            if token not in self.tokenizer.get_vocab():
                self.tokenizer.add_tokens(token)
        self.vocab = self.tokenizer.get_vocab()
        rows = len(self.vocab)
        multiple = section.pad_to_multiple_of
        self.vocab_size = -(-rows // multiple) * multiple if multiple else rows
        self.rows = {id(p): self._rows(p) for p in self.participants}
        self.rules = self._default_rules(base)

    def _output_tokenizer(self, tokenizers: Sequence, base: int):
        source = self.section.source
        if source == "base":
            return tokenizers[base]
        if source == "union":
            others = [(t, p.vocab_size) for i, (t, p) in enumerate(zip(tokenizers, self.participants)) if i != base]
            return _union(tokenizers[base], others)
        return _load(Path(source))

    def _rows(self, p: Participant) -> torch.Tensor:
        """For each output token id: p's row for that token, or −1."""
        rows = torch.full((len(self.vocab),), -1, dtype=torch.long)
        for token, new in self.vocab.items():
            old = p.vocab.get(token, -1)
            if 0 <= old < p.vocab_size:
                rows[new] = old
        return rows

    def _participant(self, model: str, where: str) -> int:
        from os.path import realpath

        for i, p in enumerate(self.participants):
            if p.label == model or realpath(p.label) == realpath(model):
                return i
        raise ValueError(f"{where}: {model!r} is not one of the merged models")

    def _default_rules(self, base: int) -> dict[int, tuple]:
        """Output token id -> how its row is filled where a participant lacks it (or it is forced):
        ("row", participant, row) | ("zero",) | ("mean",)."""
        rules, configured = {}, {}
        for token, spec in (self.section.tokens or {}).items():
            configured[token] = _token_rule(token, spec or {})
        for token, new in self.vocab.items():
            has = [int(self.rows[id(p)][new]) >= 0 for p in self.participants]
            forced = token in configured and configured[token][2]
            if all(has) and not forced:
                continue
            kind, detail, _ = configured.get(token, (None, None, False))
            where = f"tokenizer.tokens.{token}"
            if kind == "zero":
                rules[new] = ("zero",)
            elif kind == "model_token":
                i = self._participant(detail["model"], where)
                row = detail["token_id"] if "token_id" in detail else self.participants[i].vocab.get(detail["token"])
                if row is None or not 0 <= row < self.participants[i].vocab_size:
                    raise ValueError(f"{where}: token {detail.get('token', row)!r} is not in {detail['model']!r}")
                rules[new] = ("row", i, row)
            elif kind == "model" and detail is not None:
                i = self._participant(detail, where)
                if not has[i]:
                    raise ValueError(f"{where}: {detail!r} does not have token {token!r}")
                rules[new] = ("row", i, int(self.rows[id(self.participants[i])][new]))
            elif sum(has) == 1:
                i = has.index(True)
                rules[new] = ("row", i, int(self.rows[id(self.participants[i])][new]))
            elif sum(has) == 0:
                rules[new] = ("zero",)
            elif has[base]:
                rules[new] = ("row", base, int(self.rows[id(self.participants[base])][new]))
            else:
                rules[new] = ("mean",)
        self.forced = {self.vocab[t] for t, (_, _, force) in configured.items() if force and t in self.vocab}
        return rules

    @property
    def trivial(self) -> bool:
        """Every participant already has the output vocabulary, row for row: nothing to re-index."""
        identity = torch.arange(len(self.vocab))
        return (not self.rules and self.vocab_size == len(self.vocab)
                and all(p.vocab_size == self.vocab_size and torch.equal(self.rows[id(p)], identity) for p in self.participants))

    def shape(self, name: str, shape: torch.Size) -> torch.Size:
        return torch.Size((self.vocab_size, *shape[1:]))

    def align(self, name: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` (one per participant, in order) with rows re-indexed to the output vocabulary."""
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        shape = tensors[0].shape[1:]
        defaults = {}
        for new, rule in self.rules.items():
            if rule[0] == "zero":
                defaults[new] = torch.zeros(shape, dtype=dtype)
            elif rule[0] == "row":
                defaults[new] = tensors[rule[1]][rule[2]]
            else:
                rows = [tensors[i][int(self.rows[id(p)][new])] for i, p in enumerate(self.participants) if self.rows[id(p)][new] >= 0]
                mean = torch.zeros(shape, dtype=dtype)
                for row in rows:
                    mean = mean + row
                defaults[new] = mean / len(rows)
        aligned = []
        for p, tensor in zip(self.participants, tensors):
            rows = self.rows[id(p)]
            out = torch.zeros((self.vocab_size, *shape), dtype=dtype)
            own = (rows >= 0).nonzero().flatten().tolist()
            own = [i for i in own if i not in self.forced]
            out[own] = tensor[rows[own]].to(dtype)
            for new, row in defaults.items():
                if new in self.forced or rows[new] < 0:
                    out[new] = row
            if self.vocab_size > len(self.vocab):
                out[len(self.vocab):] = out[: len(self.vocab)].mean(dim=0)
            aligned.append(out)
        return aligned

    def save_tokenizer(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))


def chat_template_text(template: str, folders: Sequence[Path]) -> str | None:
    """The Jinja text of ``chat_template``: ``auto`` (the most common template among the inputs;
    None if none has one), a built-in name (:data:`CHAT_TEMPLATES`), or a template itself."""
    if template == "auto":
        found = []
        for folder in folders:
            text = getattr(_load(folder), "chat_template", None)
            if isinstance(text, dict):
                text = text.get("default")
            if text:
                found.append(text.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    check_chat_template(template)
    return CHAT_TEMPLATES.get(template, template)


def check_chat_template(template: str) -> None:
    """A ValueError unless ``template`` is ``auto``, a built-in name or a Jinja template (mergekit's rule)."""
    if template != "auto" and template not in CHAT_TEMPLATES and (len(template) < 20 or "{" not in template):
        raise ValueError(f"chat_template: {template!r} is not allowed; expected auto, a built-in name "
                         f"({', '.join(CHAT_TEMPLATES)}) or a Jinja template")


def set_chat_template(folder: Path, template: str) -> None:
    """Rewrite ``folder``'s tokenizer files with ``template`` as its chat template."""
    tokenizer = _load(folder)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))

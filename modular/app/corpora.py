"""Real text that ships offline, for the demo, benchmarks and examples (never fetched from a hub).

- Text: the GNU Collaborative International Dictionary of English, Debian package
  ``dict-gcide`` (``make demo`` installs it; the functions here only read it).
- Text with labels: the one-line descriptions and sections of Debian's packages, from apt's
  package index (``/var/lib/apt/lists/*_Packages*``, written by ``apt-get update``); WordNet 3.0
  synset glosses with their lexicographer files (Debian ``wordnet-base``); the Free On-line
  Dictionary of Computing with its category tags (``dict-foldoc``); fortune cookies by file
  (``fortunes``). The functions here only read these; a missing package is named in the error.
- A tokenizer trained on such text (:func:`train_tokenizer`).
"""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import subprocess
from pathlib import Path

__all__ = [
    "APT_LISTS", "FOLDOC", "FORTUNES", "GCIDE", "WORDNET", "debian_package_descriptions", "foldoc_entries",
    "fortune_cookies", "gcide_entries", "gcide_paragraphs", "train_tokenizer", "wordnet_glosses",
]

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
FOLDOC = Path("/usr/share/dictd/foldoc.dict.dz")
WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
APT_LISTS = Path("/var/lib/apt/lists")
# WordNet 3.0 lexicographer files (lexnames), by number
WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person "
    "noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social "
    "verb.stative verb.weather adj.ppl"
).split()


def _debian_file(path: Path, package: str) -> Path:
    """``path``, which the Debian ``package`` ships; one clear error when it is not installed."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install the Debian package {package} (apt-get install {package})")
    return path


def _gcide() -> Path:
    return _debian_file(GCIDE, "dict-gcide")


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


def wordnet_glosses(pos: str = "noun", root: Path = WORDNET) -> list[tuple[str, str]]:
    """(lexicographer file, definition) of every WordNet 3.0 synset of part of speech ``pos``
    (``noun``, ``verb``, ``adj``, ``adv``), from ``wordnet-base``'s ``data.POS``.

    The definition is the gloss up to its first example sentence (examples quote the lemma);
    the lemmas themselves are not included.
    """
    if pos not in ("noun", "verb", "adj", "adv"):
        raise ValueError(f"wordnet_glosses: pos={pos!r}; expected noun, verb, adj or adv")
    path = _debian_file(Path(root) / f"data.{pos}", "wordnet-base")
    pairs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" ") or " | " not in line:
            continue  # licence header
        fields, gloss = line.split(" | ", 1)
        definition = re.split(r';\s*"', gloss)[0].strip().rstrip(";").strip()
        pairs.append((WORDNET_LEXNAMES[int(fields.split()[1])], definition))
    return pairs


def foldoc_entries(path: Path = FOLDOC) -> list[tuple[str, list[str], str]]:
    """(headword, category tags, first paragraph) of every FOLDOC entry (``dict-foldoc``).

    Tags are the ``<...>`` marks of the entry (``<language>``, ``<networking, standard>`` ->
    ``["networking", "standard"]``, in order of appearance); the paragraph has the tags,
    ``{cross-reference}`` braces and dates removed, and whitespace collapsed.
    """
    text = gzip.open(_debian_file(Path(path), "dict-foldoc"), "rt", encoding="utf-8", errors="replace").read()
    entries = []
    for block in re.split(r"\n(?=\S)", text):
        head, _, body = block.partition("\n")
        if not body.strip() or head.startswith("00-database"):
            continue
        tags = [t.strip() for m in re.findall(r"<([a-z][a-z ,]*)>", body) for t in m.split(",")]
        paragraph = re.split(r"\n\s*\n", body.strip())[0]
        paragraph = re.sub(r"<[a-z][a-z ,]*>|[{}]|\(\d{4}-\d\d-\d\d\)", " ", paragraph)
        entries.append((head.strip(), tags, " ".join(paragraph.split())))
    return entries


def fortune_cookies(name: str, root: Path = FORTUNES) -> list[str]:
    """The fortunes of one fortune file (``fortunes``: ``politics``, ``science``...), whitespace collapsed."""
    path = _debian_file(Path(root) / name, "fortunes" if name != "fortunes" else "fortunes-min")
    cookies = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
    return [" ".join(c.split()) for c in cookies if c.strip() and c.strip() != "%"]


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

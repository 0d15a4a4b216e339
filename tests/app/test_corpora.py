"""modular.app.corpora: the sentence-transformers pooling of all-MiniLM-L6-v2, by hand; apt's
package index read from plain and compressed files."""

import gzip
import lzma
import shutil
import subprocess

import pytest
import torch

from modular.app.corpora import debian_package_descriptions
from modular.app.minilm import minilm_distillation_loss, minilm_encode, minilm_sentence_embedding

STANZAS = {
    "a": "Package: tux-race\nVersion: 1\nSection: games\nDescription: 3D racing game\nTag: game::arcade\n",
    "b": "Package: mutt\nSection: mail\nDescription: text-based mailreader\n",
    "c": "Package: gimp-plugin\nSection: contrib/graphics\nDescription: plug-in for GIMP (data)\n",
    "d": "Package: no-section\nDescription: skipped: no Section field\n",
}


def test_mean_over_unpadded_tokens_then_unit_length():
    hidden = torch.tensor([[[3.0, 0.0], [1.0, 4.0], [100.0, 100.0]]])  # the last position is padding
    mask = torch.tensor([[1, 1, 0]])
    # mean of the two real tokens = [2, 2] -> unit length [1/√2, 1/√2]
    expected = torch.tensor([[2 ** -0.5, 2 ** -0.5]])
    assert torch.allclose(minilm_sentence_embedding(hidden, mask), expected)


def test_encode_pools_the_models_last_hidden_state():
    hidden = torch.tensor([[[3.0, 0.0], [1.0, 4.0], [100.0, 100.0]]])
    batch = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}

    def model(input_ids, attention_mask):
        assert torch.equal(input_ids, batch["input_ids"])
        return type("Output", (), {"last_hidden_state": hidden})

    assert torch.allclose(minilm_encode(model, batch), torch.tensor([[2 ** -0.5, 2 ** -0.5]]))
    # the student's embedding [1/√2, 1/√2] against teachers [1, 0] (cos 1/√2) and itself (cos 1)
    teacher = torch.tensor([[1.0, 0.0]])
    assert minilm_distillation_loss(model, (batch, teacher)).item() == pytest.approx(1 - 2 ** -0.5)
    assert minilm_distillation_loss(model, (batch, minilm_encode(model, batch))).item() == pytest.approx(0.0, abs=1e-6)


def test_apt_index_stanzas_from_plain_gz_and_xz_files(tmp_path):
    (tmp_path / "main_binary-amd64_Packages").write_text(STANZAS["a"] + "\n" + STANZAS["d"])
    with gzip.open(tmp_path / "contrib_binary-amd64_Packages.gz", "wt") as f:
        f.write(STANZAS["c"] + "\n" + STANZAS["a"])  # tux-race again: counted once
    with lzma.open(tmp_path / "main_binary-i386_Packages.xz", "wt") as f:
        f.write(STANZAS["b"])
    (tmp_path / "main_Translation-en").write_text(STANZAS["b"])  # not a Packages index
    assert sorted(debian_package_descriptions(tmp_path)) == [
        ("games", "3D racing game"), ("graphics", "plug-in for GIMP (data)"), ("mail", "text-based mailreader")]


def test_missing_apt_index_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*apt-get update"):
        debian_package_descriptions(tmp_path)


@pytest.mark.skipif(not shutil.which("lz4"), reason="needs the lz4 tool (Debian's apt stores its lists lz4-compressed)")
def test_apt_index_stored_lz4_compressed(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text(STANZAS["b"])
    subprocess.run(["lz4", "-q", str(plain), str(tmp_path / "main_binary-amd64_Packages.lz4")], check=True)
    plain.unlink()
    assert debian_package_descriptions(tmp_path) == [("mail", "text-based mailreader")]


def test_wordnet_glosses_lexicographer_file_and_definition_without_examples(tmp_path):
    from modular.app.corpora import wordnet_glosses

    (tmp_path / "data.verb").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by\n"
        '00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 * 00005041 v 0000 02 + 02 00 | '
        'draw air into, and expel out of, the lungs; "I can breathe better when the air is clean"; "The patient is respiring"  \n'
        "00002325 30 v 01 respire 1 005 $ 00001740 v 0000 01 + 02 00 | undergo the processes of respiration  \n")
    # lexicographer files 29 and 30 are verb.body and verb.change (WordNet 3.0's lexnames)
    assert wordnet_glosses("verb", root=tmp_path) == [
        ("verb.body", "draw air into, and expel out of, the lungs"), ("verb.change", "undergo the processes of respiration")]
    with pytest.raises(FileNotFoundError, match="data.noun not found: install the Debian package wordnet-base"):
        wordnet_glosses("noun", root=tmp_path)
    with pytest.raises(ValueError, match="pos='nouns'"):
        wordnet_glosses("nouns", root=tmp_path)


def test_foldoc_entries_tags_and_cleaned_first_paragraph(tmp_path):
    from modular.app.corpora import foldoc_entries

    text = ("00-database-short\n     The Free On-line Dictionary of Computing\n"
            "Ada\n\n   <language> A {programming language} designed for\n   embedded systems.\n\n"
            "   Second paragraph, not read.\n\n   (1999-01-02)\n"
            "router\n\n   <networking, hardware> A device that forwards {packets} (2003-05-06).\n"
            "see-also\n")
    with gzip.open(tmp_path / "foldoc.dict.dz", "wt") as f:
        f.write(text)
    assert foldoc_entries(tmp_path / "foldoc.dict.dz") == [
        ("Ada", ["language"], "A programming language designed for embedded systems."),
        ("router", ["networking", "hardware"], "A device that forwards packets ."),
    ]
    with pytest.raises(FileNotFoundError, match="dict-foldoc"):
        foldoc_entries(tmp_path / "missing.dz")


def test_fortune_cookies_split_on_percent_lines(tmp_path):
    from modular.app.corpora import fortune_cookies

    (tmp_path / "work").write_text("Work is\n   the curse\nof the drinking classes.\n%\nA second one.\n%\n")
    assert fortune_cookies("work", root=tmp_path) == ["Work is the curse of the drinking classes.", "A second one."]
    with pytest.raises(FileNotFoundError, match="install the Debian package fortunes"):
        fortune_cookies("politics", root=tmp_path)

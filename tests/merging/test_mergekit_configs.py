"""mergekit's published configs, unedited but for model paths, through ``modular merge``: the
same tensors as mergekit 0.1.5.

Two references per config (``mergekit_reference.py`` builds the tiny models and runs mergekit):
the outputs committed in ``mergekit_reference/`` (always checked), and a fresh mergekit run when
an interpreter with mergekit is at hand (``MODULAR_MERGEKIT_PYTHON=/path/to/python``, or mergekit
importable here: the ``compare`` extra).

* float32 runs (configs without a half dtype, and every config's float32 variant): ≤ 1e-6.
* Half-precision configs: with ``compute_dtype: mergekit`` (compute in the config's dtype, as
  mergekit does) equal to mergekit's run; with our default (float32, then cast) equal to
  mergekit's float32 run cast to that dtype.
* DARE/DELLA: the masks are mergekit's when both use the same seed and the same torch version
  (torch's generator); with another torch version only the statistics can agree, so those
  comparisons are skipped there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging import load_merge_config, run_merge
from modular.checkpoint import SafetensorsCheckpoint

from . import mergekit_reference as reference

CONFIGS = reference.config_files()
MANIFEST = json.loads((reference.REFERENCES / "manifest.json").read_text())
HALF_ULP = {torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _mergekit_python() -> str | None:
    if os.environ.get("MODULAR_MERGEKIT_PYTHON"):
        return os.environ["MODULAR_MERGEKIT_PYTHON"]
    return sys.executable if importlib.util.find_spec("mergekit") is not None else None


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return reference.build_models(tmp_path_factory.mktemp("mergekit-models"))


@pytest.fixture(scope="module", params=["committed", "mergekit"])
def references(request, tmp_path_factory) -> Path:
    """Where mergekit's outputs are: the committed ones, or a fresh run of mergekit."""
    if request.param == "committed":
        return reference.REFERENCES
    python = _mergekit_python()
    if python is None:
        pytest.skip("mergekit not installed (pip install -e '.[compare]', or set MODULAR_MERGEKIT_PYTHON)")
    out = tmp_path_factory.mktemp("mergekit-fresh")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run([python, str(Path(reference.__file__)), str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _ours(config: Path, variant: str, models: Path, tmp_path: Path, compute_dtype: str | None = None) -> dict[str, torch.Tensor]:
    yml = tmp_path / f"{config.stem}.{variant}.yml"
    yml.write_text(reference.variant_text(config, models, variant))
    out = tmp_path / f"out-{config.stem}-{variant}-{compute_dtype}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what mergekit ignores is ignored with a warning (tested below)
        run_merge(load_merge_config(yml), out, progress=False, random_seed=reference.SEED, compute_dtype=compute_dtype)
    checkpoint = SafetensorsCheckpoint(out)
    return {name: checkpoint.get(name) for name in checkpoint.names()}


def _assert_same(ours: dict, theirs: dict, *, atol: float = 0.0, ulps: float = 0.0) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), name
        allowed = atol + ulps * HALF_ULP.get(expected.dtype, 0.0) * expected.double().abs()
        worst = ((got.double() - expected.double()).abs() - allowed).max().item()
        assert worst <= 0, f"{name}: exceeds the tolerance by {worst:.3g}"


def _same_generator(config: Path) -> None:
    if config.name[:2] in reference.SEEDED and torch.__version__ != MANIFEST["torch"]:
        pytest.skip(f"random masks come from torch's generator: references made with torch {MANIFEST['torch']}, "
                    f"this is {torch.__version__}")


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.name.startswith("18")], ids=lambda c: c.stem)  # 18: below
def test_float32_tensors_equal_mergekit(config, models, references, tmp_path):
    _same_generator(config)
    variant = "fp32" if reference.half_dtype(config) else "published"
    theirs = load_file(str(references / reference.reference_name(config, variant)))
    _assert_same(_ours(config, variant, models, tmp_path), theirs, atol=1e-6)


@pytest.mark.parametrize("config", [c for c in CONFIGS if reference.half_dtype(c)], ids=lambda c: c.stem)
def test_half_precision_equal_mergekit_in_its_dtype_or_cast_from_float32(config, models, references, tmp_path):
    _same_generator(config)
    published = load_file(str(references / reference.reference_name(config, "published")))
    _assert_same(_ours(config, "published", models, tmp_path, compute_dtype="mergekit"), published)
    float32 = load_file(str(references / reference.reference_name(config, "fp32")))
    cast = {name: t.to(published[name].dtype) for name, t in float32.items()}
    _assert_same(_ours(config, "published", models, tmp_path), cast, ulps=1)


def test_edge_config_resolution_matches_mergekit(models, references, tmp_path):
    """Filters falling through to the global value, a gradient under a filter, ``*``, a global
    parameter under a model (mergekit ignores it: a warning here), and a typo mergekit ignores
    (refused here: without that line, the same tensors)."""
    config = next(c for c in CONFIGS if c.name.startswith("18"))
    text = reference.variant_text(config, models, "published")
    typo = tmp_path / "typo.yml"
    typo.write_text(text)
    with pytest.raises(ValueError, match=r"models\[1\]\.parameters: unknown key\(s\) densty for merge method 'ties'; allowed: weight, density"):
        load_merge_config(typo)
    fixed = tmp_path / "fixed.yml"
    fixed.write_text("\n".join(line for line in text.splitlines() if "densty" not in line))
    with pytest.warns(UserWarning, match=r"models\[0\]\.parameters: ignored, as mergekit ignores them: normalize \(a global parameter"):
        parsed = load_merge_config(fixed)
    run_merge(parsed, tmp_path / "out", progress=False)
    checkpoint = SafetensorsCheckpoint(tmp_path / "out")
    theirs = load_file(str(references / reference.reference_name(config, "published")))
    _assert_same({n: checkpoint.get(n) for n in checkpoint.names()}, theirs, atol=1e-6)


def test_pattern_key_is_ignored_as_mergekit_does_with_a_warning(models, tmp_path):
    config = next(c for c in CONFIGS if c.name.startswith("08"))
    yml = tmp_path / "08.yml"
    yml.write_text(reference.variant_text(config, models, "fp32"))
    with pytest.warns(UserWarning, match="`pattern:` is ignored, as mergekit 0.1.5 ignores it"):
        load_merge_config(yml)


def test_union_tokenizer_and_chat_template_are_written(models, tmp_path):
    from transformers import AutoTokenizer

    union = next(c for c in CONFIGS if c.name.startswith("09"))
    yml = tmp_path / "09.yml"
    yml.write_text(reference.variant_text(union, models, "fp32"))
    run_merge(load_merge_config(yml), tmp_path / "union", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "union"))
    assert len(tokenizer) == reference.VOCAB + 2 and tokenizer.convert_tokens_to_ids(reference.CHAT_TOKENS) == [32, 33]
    assert json.loads((tmp_path / "union" / "config.json").read_text())["vocab_size"] == reference.VOCAB + 2

    chat = next(c for c in CONFIGS if c.name.startswith("19"))
    yml = tmp_path / "19.yml"
    yml.write_text(reference.variant_text(chat, models, "published"))
    run_merge(load_merge_config(yml), tmp_path / "chat", progress=False, config_text=yml.read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "chat"))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"
    assert len(tokenizer) == reference.VOCAB + 1  # source base, plus the `tokens:` entry it lacks (<|im_start|>)
    assert (tmp_path / "chat" / "mergekit_config.yml").read_text() == yml.read_text()

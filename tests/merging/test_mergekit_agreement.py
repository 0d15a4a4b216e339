"""Agreement with mergekit 0.1.5 (the `compare` extra): same inputs and parameters, max abs diff ≤ 1e-6."""

import pytest

from merging import TaskVector, merge
from modular.checkpoint import SafetensorsCheckpoint

mergekit_config = pytest.importorskip("mergekit.config", reason="mergekit not installed (pip install -e '.[compare]')")
mergekit_merge = pytest.importorskip("mergekit.merge")

WEIGHTS, DENSITIES = [1.0, 0.5, 0.8], [0.5, 0.3, 0.7]


def _mergekit(method, base, fts, parameters, out):
    config = mergekit_config.MergeConfiguration.model_validate({
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": w, "density": d}} for f, w, d in zip(fts, WEIGHTS, DENSITIES)],
        "parameters": parameters,
        "dtype": "float32",
    })
    options = mergekit_merge.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    mergekit_merge.run_merge(config, str(out), options)
    return SafetensorsCheckpoint(out)


@pytest.mark.parametrize(
    "method,mk_params,ours",
    [
        ("task_arithmetic", {"lambda": 0.7}, dict(lambda_=0.7)),
        ("ties", {"lambda": 0.9, "normalize": True}, dict(lambda_=0.9, density=DENSITIES, combine="mergekit")),
        ("ties", {"normalize": False}, dict(density=DENSITIES, combine="sum")),
    ],
)
def test_matches_mergekit(llama_folders, tmp_path, method, mk_params, ours):
    base, fts = llama_folders
    theirs = _mergekit(method, base, fts, mk_params, tmp_path / "mk")
    mine = merge(method, base, [TaskVector.from_models(base, f) for f in fts], weights=WEIGHTS, progress=False, **ours)
    assert set(theirs.names()) == set(mine)
    worst = max((theirs.get(n) - mine[n]).abs().max().item() for n in mine)
    assert worst <= 1e-6

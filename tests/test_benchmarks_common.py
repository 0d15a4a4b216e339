"""The quality benchmarks' shared helpers (benchmarks/common.py): the settings-keyed model cache,
mean ± sd, staged jobs."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from common import cache_path, cached_model, mean_sd, run_stages  # noqa: E402


def test_mean_sd_by_hand():
    assert mean_sd([1.0, 2.0, 4.0]) == {"mean": 2.3333, "sd": 1.5275, "values": [1.0, 2.0, 4.0]}  # sd = sqrt(7/3)
    assert mean_sd([0.5]) == {"mean": 0.5, "sd": 0.0, "values": [0.5]}
    diverged = mean_sd([1.0, float("nan")])
    assert diverged["mean"] != diverged["mean"] and diverged["sd"] != diverged["sd"]  # NaN: a diverged seed is not averaged away


def test_cached_model_trains_once_per_settings(tmp_path):
    calls = []

    def empty():
        torch.manual_seed(0)
        return nn.Linear(3, 2)

    def train(model):
        calls.append(1)
        with torch.no_grad():
            model.weight.add_(len(calls))

    first, from_cache = cached_model(tmp_path, "m", {"lr": 1e-3}, empty, train)
    assert not from_cache and len(calls) == 1
    again, from_cache = cached_model(tmp_path, "m", {"lr": 1e-3}, empty, train)
    assert from_cache and len(calls) == 1 and torch.equal(again.weight, first.weight)
    other, from_cache = cached_model(tmp_path, "m", {"lr": 2e-3}, empty, train)
    assert not from_cache and len(calls) == 2 and not torch.equal(other.weight, first.weight)
    assert cache_path(tmp_path, "m", {"lr": 1e-3}).is_file()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json", ".safetensors", ".safetensors"]  # no temp files


def _record(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def _fail() -> None:
    raise RuntimeError("job failed")


def test_run_stages_in_order_and_raises(tmp_path):
    log = tmp_path / "log.txt"
    run_stages([[(_record, (str(log), "a")), (_record, (str(log), "a"))], [(_record, (str(log), "b"))]], workers=2)
    assert log.read_text() == "aab"
    with pytest.raises(RuntimeError, match="job failed"):
        run_stages([[(_fail, ()), (_record, (str(log), "c"))]], workers=2)

"""benchmarks/end_to_end.py's summary of per-seed demo evaluations: means, sds, the merge chosen on
validation, and the keys the issue names."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("end_to_end", Path(__file__).parents[2] / "benchmarks" / "end_to_end.py")
end_to_end = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(end_to_end)

MERGES = ["task arithmetic", "TIES", "AdaMerging (task-wise)", "AdaMerging (layer-wise)"]


def _evaluation(shift: float, best: str, base_label: str = "base (injected)") -> dict:
    models = {base_label: {"accuracy": {"a": 0.5, "b": 0.4}},
              "task model: a": {"accuracy": {"a": 0.9 + shift, "b": 0.4}},
              "task model: b": {"accuracy": {"a": 0.5, "b": 0.8}}}
    for i, label in enumerate(MERGES):
        models[label] = {"accuracy": {"a": 0.7 + 0.01 * i, "b": 0.6 + shift}, "validation_average": 0.9 if label == best else 0.5}
    for row in models.values():
        acc = row["accuracy"]
        row["compute_fraction"] = 0.6
        row["normalized"] = {"a": acc["a"] / (0.9 + shift), "b": acc["b"] / 0.8}
        row["normalized_average"] = sum(row["normalized"].values()) / 2
        row["average"] = sum(acc.values()) / 2
        row["recovered"] = {"a": (acc["a"] - 0.5) / (0.4 + shift), "b": (acc["b"] - 0.4) / 0.4}
    return {"tasks": ["a", "b"], "models": models, "lambda_grids": {}}


def test_summary_means_sds_and_the_merge_chosen_on_validation():
    encoder = [_evaluation(0.0, "TIES"), _evaluation(0.02, "TIES")]
    causal = [_evaluation(0.0, "task arithmetic", "base (upcycled, AdaMoE)")]
    result = end_to_end.summarise(encoder, causal)
    assert {"tasks", "base_acc", "task_model_acc", "merges", "normalized", "real_compute_fraction", "causal_recovered"} <= set(result)
    assert set(result["merges"]) == {"task_arithmetic", "ties", "adamerging_task", "adamerging_layer"}
    assert result["task_model_acc"]["a"] == pytest.approx(0.91)
    assert result["sd"]["task_model_acc"]["a"] == pytest.approx(0.0141, abs=1e-4)
    assert result["merges"]["ties"]["b"] == pytest.approx(0.61)
    assert result["normalized"]["ties"]["a"] == pytest.approx((0.71 / 0.9 + 0.71 / 0.92) / 2, abs=1e-4)
    assert result["best_merge"] == "ties" and result["causal_best_merge"] == "task_arithmetic"
    assert result["causal_recovered"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}
    assert result["real_compute_fraction"] == 0.6

"""Our streaming merge vs mergekit 0.1.5: agreement, peak memory and wall time, side by side.

Builds a ~300M-parameter llama from a config (random init), writes it and 4 "fine-tuned"
variants (base + seeded Gaussian deltas) as sharded fp32 safetensors, then runs each merge in
its own subprocess (peak RSS from ``wait4``'s rusage, wall time around the merge call):

* TIES (density 0.5, weights 1.0/0.9/0.8/0.7, λ 1, mergekit's ``normalize: true``) — the timed
  and measured run, same output shard size on both sides;
* task arithmetic (λ 0.3) — agreement only.

Needs mergekit (``pip install -e '.[compare]'``). Models are cached in
``benchmarks/out/merge_vs_mergekit/models`` (delete to rebuild).

    flock /tmp/modular-bench.lock .venv/bin/python benchmarks/merge_vs_mergekit.py

Last line: JSON with task_arithmetic_max_abs_diff, ties_max_abs_diff, model_mb, ours_peak_mb,
mergekit_peak_mb, ours_s, mergekit_s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "merge_vs_mergekit"
MODELS = OUT / "models"
N_MODELS = 4
WEIGHTS = [1.0, 0.9, 0.8, 0.7]
DENSITY = 0.5
SHARD_BYTES = 500_000_000
CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False,
)
RUNS = {
    "ties": ({"normalize": True}, dict(density=DENSITY, combine="mergekit")),
    "task_arithmetic": ({"lambda": 0.3}, dict(lambda_=0.3)),
}


def build_models() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modular.checkpoint import SafetensorsCheckpoint, ShardedWriter

    stamp = MODELS / "done.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == CONFIG:
        print("reusing cached models", flush=True)
        return
    shutil.rmtree(MODELS, ignore_errors=True)
    MODELS.mkdir(parents=True)
    print("building the base model from config ...", flush=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**CONFIG))
    base.save_pretrained(MODELS / "base", max_shard_size=SHARD_BYTES)
    del base
    source = SafetensorsCheckpoint(MODELS / "base")
    for k in range(N_MODELS):
        print(f"writing fine-tuned model {k} ...", flush=True)
        folder = MODELS / f"ft{k}"
        folder.mkdir()
        generator = torch.Generator().manual_seed(1000 + k)
        writer = ShardedWriter(folder, [(n, source.shape(n), source.dtype(n)) for n in source.names()], SHARD_BYTES)
        for name in source.names():
            tensor = source.get(name)
            writer.add(name, tensor + torch.randn(tensor.shape, generator=generator) * 0.002)
        writer.close()
        shutil.copy(MODELS / "base" / "config.json", folder / "config.json")
    stamp.write_text(json.dumps(CONFIG))


def side(which: str, method: str, out: Path) -> None:
    """One merge in this process; prints its wall time (s) as the last line."""
    shutil.rmtree(out, ignore_errors=True)
    fts = [MODELS / f"ft{k}" for k in range(N_MODELS)]
    mk_params, ours = RUNS[method]
    start = time.perf_counter()
    if which == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        models = [{"model": str(f), "parameters": {"weight": w, "density": DENSITY}} for f, w in zip(fts, WEIGHTS)]
        config = MergeConfiguration.model_validate(
            {"merge_method": method, "base_model": str(MODELS / "base"), "models": models, "parameters": mk_params, "dtype": "float32"}
        )
        run_merge(config, str(out), MergeOptions(out_shard_size=SHARD_BYTES, copy_tokenizer=False, write_model_card=False, quiet=True))
    else:
        from merging import TaskVector, merge

        base = MODELS / "base"
        tvs = [TaskVector.from_models(base, f) for f in fts]
        merge(method, base, tvs, weights=WEIGHTS, out=out, max_shard_bytes=SHARD_BYTES, progress=False, **ours)
    print(time.perf_counter() - start)


def run_side(which: str, method: str) -> tuple[float, float, Path]:
    """(wall seconds, peak RSS MiB, output folder) of one side, in a fresh subprocess."""
    out = OUT / f"{which}-{method}"
    proc = subprocess.Popen([sys.executable, __file__, "--side", which, "--method", method, "--out", str(out)],
                            stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{which} {method} failed:\n{stdout}")
    seconds = float(stdout.strip().splitlines()[-1])
    peak_mb = usage.ru_maxrss / 1024
    print(f"  {which:8s} {method:16s} {seconds:7.1f} s   peak RSS {peak_mb:7.0f} MiB", flush=True)
    return seconds, peak_mb, out


def max_abs_diff(a: Path, b: Path) -> float:
    from modular.checkpoint import SafetensorsCheckpoint

    ca, cb = SafetensorsCheckpoint(a), SafetensorsCheckpoint(b)
    if set(ca.names()) != set(cb.names()):
        raise SystemExit(f"tensor names differ between {a} and {b}")
    return max((ca.get(n) - cb.get(n)).abs().max().item() for n in ca.names())


def main() -> None:
    build_models()
    model_mb = sum(f.stat().st_size for f in (MODELS / "base").glob("*.safetensors")) / 2**20
    print(f"model size {model_mb:.0f} MiB; merging {N_MODELS} fine-tuned models", flush=True)
    result = {"model_mb": round(model_mb, 1)}
    for method in RUNS:
        mk_s, mk_mb, mk_out = run_side("mergekit", method)
        our_s, our_mb, our_out = run_side("ours", method)
        result[f"{method}_max_abs_diff"] = max_abs_diff(mk_out, our_out)
        if method == "ties":
            result.update(ours_peak_mb=round(our_mb, 1), mergekit_peak_mb=round(mk_mb, 1), ours_s=round(our_s, 2), mergekit_s=round(mk_s, 2))
        shutil.rmtree(mk_out)
        shutil.rmtree(our_out)
    result["peak_ratio_to_model"] = round(result["ours_peak_mb"] / model_mb, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["ours", "mergekit"])
    parser.add_argument("--method", choices=list(RUNS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.side:
        side(args.side, args.method, args.out)
    else:
        main()

"""AdaMoE with the library's defaults vs plain top-k fine-tuning of an upcycled Mixtral-architecture
model on real text: held-out eval loss and true experts per token, mean ± sd over seeds.

Protocol (fixed before any test number was read):

1. Text: GCIDE dictionary paragraphs (Debian package ``dict-gcide``; :func:`common.gcide_splits`),
   byte-level tokens (vocabulary 256 + 3 specials), dealt out in file order: paragraph
   i % 3 == 0 trains, 1 validates, 2 tests. The earlier versions of this benchmark drew every
   paragraph from the i % 3 == 0 stream (training and their eval chunks alike), and their
   settings (weighting, aux coefficient) were chosen on those eval chunks; the validation and
   test paragraphs here were never read by any earlier run.
2. Per seed: a small dense llama is trained on the first half of the training chunks (cached),
   then upcycled into Mixtral (8 experts, top-2, noise 1e-3 on the expert copies).
3. Two arms fine-tune that same model on the second half, same data order and steps, with
   ``Trainer`` and ``MoEAuxLossCallback``:
   * ``topk``: ``AdaMoEConfig(num_null_experts=0, extra_top_k=0)``: plain top-2 routing, whose
     aux loss is then the plain Switch loss (what a user would run without AdaMoE);
   * ``adamoe``: ``AdaMoEConfig()``: the library's defaults (``--weighting`` /
     ``--aux-loss-coef`` override them, e.g. the paper's ``renormalized`` / 1e-4).
4. Each arm's fine-tuning learning rate is chosen from ``--lrs`` by its validation loss with the
   first seed; the other seeds then run at that rate (test is not read for this).
5. Test loss and mean true experts per token (``routing_stats``) are computed once per arm, at
   its chosen learning rate, for every seed; the JSON reports mean ± sd over the seeds.

Trained models are cached under ``benchmarks/out/adamoe_quality/cache`` (safetensors, keyed by
every setting that produced them), so a re-run only evaluates.

    flock /tmp/modular-bench.lock .venv/bin/python benchmarks/adamoe_quality.py
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import LMBlocks, cache_path, cached_model, gcide_splits, mean_sd, run_stages
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from finetune import MoEAuxLossCallback
from moe import AdaMoEConfig, inject_adamoe, mean_experts_per_token, plot_routing_stats, routing_stats, upcycle_to_moe

OUT = Path(__file__).parent / "out" / "adamoe_quality"
CACHE = OUT / "cache"
BOS, EOS, PAD = 256, 257, 258
TOPK = AdaMoEConfig(num_null_experts=0, extra_top_k=0)


def byte_chunks(paragraphs: list[str], length: int) -> torch.Tensor:
    """(N, length) byte-token chunks of the concatenated paragraphs (BOS ... EOS per paragraph)."""
    ids: list[int] = []
    for p in paragraphs:
        ids += [BOS, *p.encode("utf-8", errors="replace"), EOS]
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def spread(chunks: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` chunks evenly spread over ``chunks`` (so an eval set spans the alphabet)."""
    return chunks[:: max(1, len(chunks) // count)][:count]


def train(model, chunks, args, steps: int, lr: float, seed: int, tag: str, callbacks=()) -> None:
    targs = TrainingArguments(
        output_dir=str(OUT / "trainer" / tag), per_device_train_batch_size=args.batch_size, max_steps=steps,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=min(50, steps // 10), weight_decay=0.0,
        logging_steps=max(1, steps // 5), report_to=[], save_strategy="no", use_cpu=True, seed=seed, data_seed=seed,
        disable_tqdm=False, dataloader_num_workers=0,
    )
    start = time.perf_counter()
    Trainer(model=model, args=targs, train_dataset=LMBlocks(chunks), callbacks=list(callbacks)).train()
    print(f"[{tag}] {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)


@torch.no_grad()
def evaluate(model, chunks, batch_size) -> tuple[float, float | None, list[dict] | None]:
    """Mean token loss over ``chunks``; mean true experts per token and the last batch's stats."""
    model.eval()
    losses, per_token, stats = [], [], None
    for batch in chunks.split(batch_size):
        losses.append(model(batch, labels=batch).loss.item())
        if hasattr(model.config, "modular_injections"):
            stats = routing_stats(model)
            per_token.append(mean_experts_per_token(stats))
    mean = sum(per_token) / len(per_token) if per_token else None
    return sum(losses) / len(losses), mean, stats


def dense_model(seed: int, seq_len: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=259, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=seq_len, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD, tie_word_embeddings=True,
    ))


def moe_model(dense, config: AdaMoEConfig, seed: int):
    model = upcycle_to_moe(dense, num_experts=8, top_k=2, noise_std=1e-3, seed=seed)
    inject_adamoe(model, config)
    return model


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")], default=[0, 1, 2])
    parser.add_argument("--lrs", type=lambda t: [float(s) for s in t.split(",")], default=[5e-4, 1e-3, 2e-3],
                        help="fine-tuning learning rates; each arm's is chosen on validation")
    parser.add_argument("--weighting", choices=["renormalized", "softmax"], default=None,
                        help="override AdaMoEConfig.weighting (default: the library's)")
    parser.add_argument("--aux-loss-coef", type=float, default=None, help="override AdaMoEConfig.aux_loss_coef")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--dense-lr", type=float, default=3e-3)
    parser.add_argument("--finetune-steps", type=int, default=250)
    parser.add_argument("--eval-chunks", type=int, default=256, help="validation and test chunks each")
    parser.add_argument("--workers", type=int, default=2, help="training processes at once")
    parser.add_argument("--validation-only", action="store_true",
                        help="stop before the test split (to compare settings on validation)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    return parser.parse_args()


def _setup(threads: int) -> None:
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()


def _dense_settings(args, seed: int) -> dict:
    return {**{k: getattr(args, k) for k in ("seq_len", "batch_size", "dense_steps", "dense_lr")}, "seed": seed}


def _finetune_settings(args, seed: int, config: AdaMoEConfig, lr: float) -> dict:
    return {**_dense_settings(args, seed), "arm": asdict(config), "lr": lr, "finetune_steps": args.finetune_steps}


def _not_cached(model) -> None:
    raise RuntimeError("the dense model of this seed should have been trained by the previous stage")


def dense(args, seed: int, chunks: torch.Tensor | None = None):
    """The seed's pretrained dense model (trained on ``chunks`` when not cached)."""
    def fit(model):
        train(model, chunks, args, args.dense_steps, args.dense_lr, seed, f"dense-s{seed}")
    return cached_model(CACHE, "dense", _dense_settings(args, seed), lambda: dense_model(seed, args.seq_len),
                        fit if chunks is not None else _not_cached)[0]


def finetuned(args, seed: int, arm: str, config: AdaMoEConfig, lr: float, chunks: torch.Tensor | None = None):
    """The seed's upcycled model fine-tuned with ``config`` at ``lr`` (trained on ``chunks`` when not cached)."""
    base = dense(args, seed)

    def fit(model):
        train(model, chunks, args, args.finetune_steps, lr, seed, f"{arm}-lr{lr:g}-s{seed}", [MoEAuxLossCallback()])
    return cached_model(CACHE, arm, _finetune_settings(args, seed, config, lr), lambda: moe_model(base, config, seed),
                        fit if chunks is not None else _not_cached)[0]


def dense_job(args, seed: int, chunks: torch.Tensor) -> None:
    _setup(args.threads)
    dense(args, seed, chunks)


def finetune_job(args, seed: int, arm: str, config: AdaMoEConfig, lr: float, chunks: torch.Tensor) -> None:
    _setup(args.threads)
    finetuned(args, seed, arm, config, lr, chunks)


def main() -> None:
    args = parse_args()
    _setup(args.threads)
    overrides = {k: v for k, v in (("weighting", args.weighting), ("aux_loss_coef", args.aux_loss_coef)) if v is not None}
    arms = {"topk": TOPK, "adamoe": AdaMoEConfig(**overrides)}
    started = time.time()

    splits = gcide_splits()
    train_chunks = byte_chunks(splits["train"], args.seq_len)
    dense_chunks, finetune_chunks = train_chunks[: len(train_chunks) // 2], train_chunks[len(train_chunks) // 2:]
    val_chunks = spread(byte_chunks(splits["validation"], args.seq_len), args.eval_chunks)
    test_chunks = spread(byte_chunks(splits["test"], args.seq_len), args.eval_chunks)
    print(f"GCIDE: {len(train_chunks)} train / {len(val_chunks)} validation / {len(test_chunks)} test chunks "
          f"of {args.seq_len} bytes", flush=True)

    first = args.seeds[0]

    def dense_jobs(seeds):
        return [(dense_job, (args, s, dense_chunks)) for s in seeds
                if not cache_path(CACHE, "dense", _dense_settings(args, s)).is_file()]

    def finetune_jobs(runs):
        return [(finetune_job, (args, s, arm, arms[arm], lr, finetune_chunks)) for s, arm, lr in runs
                if not cache_path(CACHE, arm, _finetune_settings(args, s, arms[arm], lr)).is_file()]

    grid = [(first, arm, lr) for arm in arms for lr in args.lrs]
    run_stages([dense_jobs([first]), finetune_jobs(grid) + dense_jobs(args.seeds[1:])], args.workers)
    start_val = {arm: mean_sd([evaluate(moe_model(dense(args, s), config, s), val_chunks, args.batch_size)[0]
                               for s in args.seeds]) for arm, config in arms.items()}
    validation = {arm: {lr: evaluate(finetuned(args, first, arm, arms[arm], lr), val_chunks, args.batch_size)[:2]
                        for lr in args.lrs} for arm in arms}
    chosen = {arm: min(args.lrs, key=lambda lr, arm=arm: validation[arm][lr][0]) for arm in arms}
    for arm in arms:
        print(f"[{arm}] validation (loss, experts per token) by lr, seed {first}: {validation[arm]} -> lr {chosen[arm]:g}",
              flush=True)
    if args.validation_only:
        ratio = validation["adamoe"][chosen["adamoe"]][0] / validation["topk"][chosen["topk"]][0]
        print(json.dumps({"validation_loss_ratio": round(ratio, 4), "chosen_lr": chosen, "validation_by_lr": validation,
                          "config": {**vars(args), "adamoe": asdict(arms["adamoe"])}}))
        return
    run_stages([finetune_jobs([(s, arm, chosen[arm]) for s in args.seeds[1:] for arm in arms])], args.workers)
    print(f"training done at {time.time() - started:.0f} s", flush=True)
    dense_test = [evaluate(dense(args, s), test_chunks, args.batch_size)[0] for s in args.seeds]
    models = {(s, arm): finetuned(args, s, arm, arms[arm], chosen[arm]) for s in args.seeds for arm in arms}

    test = {}
    for arm in arms:  # the test split, read once per arm at its chosen lr
        results = [evaluate(models[s, arm], test_chunks, args.batch_size) for s in args.seeds]
        test[arm] = {"loss": mean_sd([r[0] for r in results]), "experts_per_token": mean_sd([r[1] for r in results], 3)}
        plot_routing_stats(results[0][2], OUT / f"{arm}_routing.png")
        print(f"[{arm}] test loss {test[arm]['loss']}, true experts per token {test[arm]['experts_per_token']}", flush=True)

    topk, ada = test["topk"], test["adamoe"]
    ratios = [a / t for a, t in zip(ada["loss"]["values"], topk["loss"]["values"])]
    reductions = [1 - a / t for a, t in zip(ada["experts_per_token"]["values"], topk["experts_per_token"]["values"])]
    print(f"total {time.time() - started:.0f} s", flush=True)
    print(json.dumps({
        "topk_eval_loss": topk["loss"]["mean"], "topk_eval_loss_sd": topk["loss"]["sd"],
        "adamoe_eval_loss": ada["loss"]["mean"], "adamoe_eval_loss_sd": ada["loss"]["sd"],
        "topk_experts_per_token": topk["experts_per_token"]["mean"],
        "adamoe_experts_per_token": ada["experts_per_token"]["mean"],
        "adamoe_experts_per_token_sd": ada["experts_per_token"]["sd"],
        "loss_ratio": mean_sd(ratios), "experts_reduction": mean_sd(reductions, 3),
        "seeds": args.seeds, "per_seed": test, "dense_eval_loss": mean_sd(dense_test),
        "start_validation_loss": start_val, "chosen_lr": chosen,
        "validation_by_lr": {arm: {lr: [round(v, 4) for v in values] for lr, values in by_lr.items()} for arm, by_lr in validation.items()},
        "plots": [str(OUT / f"{arm}_routing.png") for arm in arms],
        "config": {**vars(args), "adamoe": asdict(arms["adamoe"]), "topk": asdict(TOPK),
                   "adamoe_is_library_default": arms["adamoe"] == AdaMoEConfig()},
    }))


if __name__ == "__main__":
    main()

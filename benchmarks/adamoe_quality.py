"""AdaMoE vs plain top-2 fine-tuning of an upcycled Mixtral-architecture model on real text.

1. Real text: GCIDE dictionary paragraphs (Debian package ``dict-gcide``; installed with
   apt-get when missing), byte-level tokens (vocabulary 256 + 3 specials), held-out split.
2. A small dense llama is trained on it for a few minutes.
3. It is upcycled into Mixtral (8 experts, top-2, small noise on the expert copies).
4. Two fine-tunes from that same model, same data order, same steps, both with ``Trainer`` and
   ``MoEAuxLossCallback``:
   * top-k: ``AdaMoEConfig(num_null_experts=0, top_k=None)`` — plain top-2 routing, whose
     aux loss is then the plain Switch loss;
   * AdaMoE: 16 null experts, top-4 (the official m, k'), ``weighting="softmax"`` with aux
     coefficient 1e-1 by default. The official weighting (``--weighting renormalized
     --aux-coef 1e-4``) lost 6.7 % eval loss here: its LM loss never reaches the null logits.
5. Eval loss on held-out text and mean true experts per token (``routing_stats``).

    flock /tmp/modular-bench.lock .venv/bin/python benchmarks/adamoe_quality.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from finetune import MoEAuxLossCallback
from modular.app.corpora import gcide_paragraphs
from moe import AdaMoEConfig, inject_adamoe, mean_experts_per_token, plot_routing_stats, routing_stats, upcycle_to_moe

OUT = Path(__file__).parent / "out" / "adamoe_quality"
BOS, EOS, PAD = 256, 257, 258


def byte_chunks(paragraphs: list[str], length: int) -> torch.Tensor:
    """(N, length) byte-token chunks of the concatenated paragraphs (BOS ... EOS per paragraph)."""
    ids: list[int] = []
    for p in paragraphs:
        ids += [BOS, *p.encode("utf-8", errors="replace"), EOS]
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


class Chunks(torch.utils.data.Dataset):
    def __init__(self, chunks: torch.Tensor):
        self.chunks = chunks

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def train(model, chunks, args, steps, lr, tag, callbacks=()):
    targs = TrainingArguments(
        output_dir=str(OUT / tag), per_device_train_batch_size=args.batch_size, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=min(50, steps // 10), weight_decay=0.0, logging_steps=max(1, steps // 5),
        report_to=[], save_strategy="no", use_cpu=True, seed=args.seed, data_seed=args.seed, disable_tqdm=False,
        dataloader_num_workers=0,
    )
    start = time.perf_counter()
    Trainer(model=model, args=targs, train_dataset=Chunks(chunks), callbacks=list(callbacks)).train()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=250)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--null-experts", type=int, default=16, help="AdaMoE m (official run: 16)")
    parser.add_argument("--adamoe-top-k", type=int, default=4, help="AdaMoE k' (official run: 4)")
    parser.add_argument("--weighting", default="softmax", choices=["renormalized", "softmax"],
                        help="AdaMoEConfig.weighting of the AdaMoE run")
    parser.add_argument("--aux-coef", type=float, default=1e-1, help="AdaMoE aux loss coefficient")
    parser.add_argument("--eval-chunks", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    OUT.mkdir(parents=True, exist_ok=True)

    paragraphs = gcide_paragraphs(min_chars=41)  # bodies of more than 40 characters
    chunks = byte_chunks(paragraphs[:: max(1, len(paragraphs) // 40000)], args.seq_len)
    held_out = torch.zeros(len(chunks), dtype=torch.bool)
    held_out[:: len(chunks) // args.eval_chunks] = True  # spread over the file, never trained on
    eval_chunks, train_chunks = chunks[held_out][: args.eval_chunks], chunks[~held_out]
    dense_chunks, finetune_chunks = train_chunks[: len(train_chunks) // 2], train_chunks[len(train_chunks) // 2 :]
    print(f"GCIDE: {len(paragraphs)} paragraphs -> {len(train_chunks)} train / {len(eval_chunks)} eval chunks "
          f"of {args.seq_len} bytes", flush=True)

    torch.manual_seed(args.seed)
    dense = LlamaForCausalLM(LlamaConfig(
        vocab_size=259, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=args.seq_len, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD, tie_word_embeddings=True,
    ))
    train(dense, dense_chunks, args, args.dense_steps, 3e-3, "dense")
    dense_loss, _, _ = evaluate(dense, eval_chunks, args.batch_size)
    print(f"dense eval loss {dense_loss:.4f}", flush=True)

    results = {}
    for tag, config in {
        "topk": AdaMoEConfig(num_null_experts=0, top_k=None),
        "adamoe": AdaMoEConfig(num_null_experts=args.null_experts, top_k=args.adamoe_top_k,
                               aux_loss_coef=args.aux_coef, weighting=args.weighting),
    }.items():
        model = upcycle_to_moe(dense, num_experts=8, top_k=2, noise_std=1e-3, seed=args.seed)
        inject_adamoe(model, config)
        start_loss, _, _ = evaluate(model, eval_chunks, args.batch_size)
        train(model, finetune_chunks, args, args.finetune_steps, args.finetune_lr, tag, [MoEAuxLossCallback()])
        loss, per_token, stats = evaluate(model, eval_chunks, args.batch_size)
        plot_routing_stats(stats, OUT / f"{tag}_routing.png")
        results[tag] = (loss, per_token)
        print(f"[{tag}] eval loss {start_loss:.4f} -> {loss:.4f}, true experts per token {per_token:.3f}", flush=True)

    (topk_loss, topk_k), (ada_loss, ada_k) = results["topk"], results["adamoe"]
    print(json.dumps({
        "topk_eval_loss": round(topk_loss, 4),
        "adamoe_eval_loss": round(ada_loss, 4),
        "topk_experts_per_token": round(topk_k, 3),
        "adamoe_experts_per_token": round(ada_k, 3),
        "dense_eval_loss": round(dense_loss, 4),
        "loss_ratio": round(ada_loss / topk_loss, 4),
        "experts_reduction": round(1 - ada_k / topk_k, 3),
        "plots": [str(OUT / f"{t}_routing.png") for t in results],
        "config": vars(args),
    }))


if __name__ == "__main__":
    main()

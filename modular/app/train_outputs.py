"""What ``modular train`` writes and measures after training: the final model, ``metrics.json``
(losses, accuracy, routing statistics, LISA schedule, 1-bit Adam's bytes on the wire) and ``loss.png``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from modular.surgery import injection_records

__all__ = ["accuracy", "comm_stats", "plot_loss", "write_outputs"]


def accuracy(prediction) -> dict:
    """Classification runs: ``eval_accuracy`` next to ``eval_loss``."""
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def comm_stats(trainer, max_steps: int) -> dict:
    """1-bit Adam's bytes on the wire from this rank: the fp32 all-reduce of its warm-up steps and
    the compressed one after (since this process started: a resumed run counts its own part)."""
    optimizer = trainer.optimizer
    while not hasattr(optimizer, "comm_stats"):  # accelerate / DeepSpeed wrappers
        optimizer = optimizer.optimizer
    stats = optimizer.comm_stats
    return {"bytes_sent": dict(stats.bytes_sent), "calls": stats.calls, "freeze_step": optimizer.freeze_step,
            "steps": min(optimizer.global_step, max_steps)}


def write_outputs(trainer, tokenizer, final: Path, metrics: dict, eval_data) -> None:
    from modular.checkpoint import atomic_output_dir, atomic_write_text

    model = trainer.model
    with atomic_output_dir(final, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    metrics["log_history"] = trainer.state.log_history
    if any(r["kind"] == "adamoe" for r in injection_records(model)) and eval_data is not None:
        from moe import mean_experts_per_token, routing_stats

        batch = trainer.data_collator([eval_data[i] for i in range(min(8, len(eval_data)))])
        with torch.no_grad():
            model.eval()(**{k: batch[k].to(model.device) for k in ("input_ids", "attention_mask") if k in batch})
        metrics["routing_stats"] = routing_stats(model)
        metrics["mean_experts_per_token"] = mean_experts_per_token(metrics["routing_stats"])
    schedule = Path(trainer.args.output_dir) / "lisa_schedule.json"
    if schedule.is_file():
        metrics["lisa_schedule"] = json.loads(schedule.read_text())
    out = Path(trainer.args.output_dir)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    plot_loss(metrics["log_history"], out / "loss.png")
    print(f"modular train: model in {final}, metrics in {out / 'metrics.json'}", flush=True)


def plot_loss(history: list[dict], path: Path) -> None:
    from modular.checkpoint import atomic_write_text
    from modular.plotting import pyplot

    from .report import draw_losses

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    draw_losses(ax, history)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write_text(path, image.getvalue())

"""Adaptive Computation Modules (METHODS.md "ACM"): PEFT's shape — ``config.py`` (ACMConfig),
``layer.py`` (ACMLayer and its gate), ``convert.py`` (acmize and its phases), plus ``stats.py``."""

from .config import ACMConfig
from .convert import acm_modules, acmize, budget_loss, compute_penalty, finetune_end_to_end, rebuild, set_threshold
from .layer import ACMGate, ACMLayer, choose_learners, gate_labels
from .stats import compute_stats, plot_stats, reset_stats

__all__ = [
    "ACMConfig", "ACMGate", "ACMLayer", "acm_modules", "acmize", "budget_loss", "choose_learners", "compute_penalty",
    "compute_stats", "finetune_end_to_end", "gate_labels", "plot_stats", "rebuild", "reset_stats", "set_threshold",
]

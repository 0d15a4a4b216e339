"""Adaptive Computation Modules (``docs/methods.md``, "ACM"), in PEFT's shape: ``config.py``
(ACMConfig), ``layer.py`` (ACMLayer and its gate), ``model.py`` (acmize, the ``acm`` injection
kind, run-time threshold); ``sites.py`` finds the dense FFNs, ``calibration.py`` runs phases 1-2,
``training.py`` phase 3, ``stats.py`` counts per-token compute."""

from .config import ACMConfig
from .layer import ACMGate, ACMLayer, choose_learners, gate_labels
from .model import acm_modules, acmize, rebuild, set_threshold
from .stats import compute_stats, plot_stats, reset_stats
from .training import budget_loss, compute_penalty, finetune_end_to_end

__all__ = [
    "ACMConfig", "ACMGate", "ACMLayer", "acm_modules", "acmize", "budget_loss", "choose_learners", "compute_penalty",
    "compute_stats", "finetune_end_to_end", "gate_labels", "plot_stats", "rebuild", "reset_stats", "set_threshold",
]

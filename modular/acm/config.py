"""``ACMConfig``: every knob of an Adaptive Computation Module conversion (``docs/methods.md``, "ACM")."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ACMConfig"]

_INITS = ("dense", "random")
_DISTILL_LOSSES = ("mse", "relative")


def _positive(name: str, value, kind=int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ACMConfig.{name} must be a positive {kind.__name__}, got {value!r}")


@dataclass
class ACMConfig:
    """How to turn dense FFNs into ACMs, train them, and run them.

    The defaults are the settings ``benchmarks/acm.py`` runs (all-MiniLM-L6-v2's FFNs, about
    11 000 calibration sentences; results in ``benchmarks/RESULTS.md``, first table). Where they
    differ from the paper's (4 learners, plain MSE, fresh learners), the paper's setting lost
    there and stays an option.

    Structure
        num_learners: N, learners per module; choice j in 0..N runs the first j (0 = zero output).
            Default 8 (the paper uses 4): finer steps of compute per token.
        learner_width: hidden width of one learner; ``None`` = dense intermediate size / N (which
            must then divide exactly). Any width works with ``init="random"``; ``init="dense"``
            needs ``N * learner_width == intermediate size``.
        target_pattern: regex (``re.search``) on the registry's dense-FFN names selecting which
            FFNs to convert; ``None`` = all of them.
        gate_hidden_size: hidden width of each module's gating MLP (d -> g -> N + 1 logits).
        init: ``"dense"`` (default) slices the dense FFN's neurons into the learners, most
            important neurons first (importance = mean |activation| x output-weight norm on the
            calibration data), so that all N learners start equal to the dense FFN;
            ``"random"`` is the paper's fresh initialisation.

    Phase 1, representation distillation (per module, base frozen)
        distill_steps, distill_lr, distill_batch_size (tokens per step): Adam. The paper uses
        1e-3 on fresh learners; from the dense init 3e-4 for 1500 steps keeps what the slices
        already know and still refines them.
        distill_loss: ``"relative"`` (default) divides each token's squared error by its
        output's squared norm, so every token counts alike (what a post-LayerNorm block sees);
        ``"mse"`` (paper) averages squared errors over tokens, so the few tokens with very large
        FFN outputs (BERT's special tokens and punctuation) dominate.

    Phase 2, gate training
        gate_steps, gate_lr, gate_batch_size; label_factor: a token's label is the smallest j with
        error[j] / error[j + 1] < label_factor (paper: 1.2).

    Inference
        threshold: ``None`` = argmax of the gate; a float in (0, 1] = run the smallest j whose
        cumulative gate probability P(choice <= j) reaches it. Higher threshold, more compute;
        change it at run time with :func:`modular.acm.set_threshold` (no retraining).

    Phase 3, end-to-end fine-tuning (:func:`modular.acm.finetune_end_to_end`, or
    :func:`modular.acm.budget_loss` under ``Trainer``)
        budget_target: target fraction of learner compute (paper: 0.25-0.75); budget_weight: the
        penalty's weight (paper: 0.1); gumbel_tau: temperature of the Gumbel-softmax gate.
        finetune_steps, finetune_lr: :func:`~modular.acm.finetune_end_to_end`'s steps and peak
        learning rate (Adam, linear decay to 0); phase 3 is what lifts the low-budget points
        (600 steps gave a cosine 0.009 lower at 50 % of the FLOPs than 2400 on the benchmark).

    seed: seeds initialisation and the sampling of distillation / gate batches.
    """

    num_learners: int = 8
    learner_width: int | None = None
    target_pattern: str | None = None
    gate_hidden_size: int = 64
    init: str = "dense"
    distill_steps: int = 1500
    distill_lr: float = 3e-4
    distill_batch_size: int = 1024
    distill_loss: str = "relative"
    gate_steps: int = 200
    gate_lr: float = 1e-3
    gate_batch_size: int = 1024
    label_factor: float = 1.2
    threshold: float | None = None
    budget_target: float = 0.5
    budget_weight: float = 0.1
    gumbel_tau: float = 1.0
    finetune_steps: int = 2400
    finetune_lr: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_learners", "gate_hidden_size", "distill_batch_size", "gate_batch_size", "finetune_steps"):
            _positive(name, getattr(self, name))
        if self.learner_width is not None:
            _positive("learner_width", self.learner_width)
        for name in ("distill_steps", "gate_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ACMConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("distill_lr", "gate_lr", "gumbel_tau", "finetune_lr"):
            _positive(name, float(getattr(self, name)), float)
        if self.distill_loss not in _DISTILL_LOSSES:
            raise ValueError(f"ACMConfig.distill_loss must be one of {', '.join(_DISTILL_LOSSES)}, got {self.distill_loss!r}")
        if self.init not in _INITS:
            raise ValueError(f"ACMConfig.init must be one of {', '.join(_INITS)}, got {self.init!r}")
        if not self.label_factor > 1.0:
            raise ValueError(f"ACMConfig.label_factor must be > 1 (paper: 1.2), got {self.label_factor!r}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"ACMConfig.threshold must be None (argmax) or in (0, 1], got {self.threshold!r}")
        if not 0.0 <= self.budget_target <= 1.0:
            raise ValueError(f"ACMConfig.budget_target must be in [0, 1], got {self.budget_target!r}")
        if self.budget_weight < 0:
            raise ValueError(f"ACMConfig.budget_weight must be >= 0, got {self.budget_weight!r}")

    def width_for(self, intermediate_size: int) -> int:
        """Learner width for a dense FFN of ``intermediate_size``; clear error when N does not divide it."""
        if self.learner_width is not None:
            if self.init == "dense" and self.learner_width * self.num_learners != intermediate_size:
                raise ValueError(
                    f"ACMConfig: init='dense' slices the dense FFN, so num_learners * learner_width "
                    f"({self.num_learners} * {self.learner_width}) must equal its intermediate size "
                    f"{intermediate_size}; use init='random' for another total width"
                )
            return self.learner_width
        if intermediate_size % self.num_learners:
            raise ValueError(
                f"ACMConfig.num_learners={self.num_learners} does not divide the FFN intermediate size "
                f"{intermediate_size}; choose a divisor, or set learner_width (with init='random')"
            )
        return intermediate_size // self.num_learners

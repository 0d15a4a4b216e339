"""``AdaMoEConfig``: every knob of the AdaMoE injection, validated once."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AdaMoEConfig", "DEFAULT_EXTRA_TOP_K", "EXPERTS_IMPLEMENTATIONS", "NULL_LOGIT_INITS", "UpcycleConfig", "WEIGHTINGS"]

NULL_LOGIT_INITS = ("anchored", "repeat_gate")
WEIGHTINGS = ("renormalized", "softmax")
EXPERTS_IMPLEMENTATIONS = ("modular", "megablocks", "eager")


DEFAULT_EXTRA_TOP_K = 2


@dataclass
class AdaMoEConfig:
    """AdaMoE null-expert routing (Zeng et al., 2024; ``docs/methods.md``, "AdaMoE").

    The defaults are the settings ``benchmarks/adamoe_quality.py`` runs and measures (mean over
    3 seeds, held-out test split; ``benchmarks/RESULTS.md``, first table): with them the
    fine-tuned model stays within 1 % of plain top-k fine-tuning's eval loss while running
    fewer true experts per token.

    Attributes:
        num_null_experts: m, null experts added next to the n true experts of each block.
            Null experts output zero and cost no FLOPs.
        top_k: k', experts picked per token over all n + m, as an absolute number; it must be
            at least the model's own k (injection refuses a smaller one: AdaMoE adds null picks,
            it never takes true experts away). ``None`` (default): k' = k + ``extra_top_k``,
            read from each router, so families with k = 8 (OLMoE, Qwen3-MoE) get k' = 10 and
            Mixtral (k = 2) gets the paper's k' = 4.
        extra_top_k: k' − k when ``top_k`` is ``None`` (``None`` here: 2, the paper's k' − k).
            Set one of ``top_k`` / ``extra_top_k``, not both. ``num_null_experts=0,
            extra_top_k=0`` leaves the model unchanged (plain top-k routing, e.g. to measure it
            with :func:`moe.routing_stats`).
        aux_loss_coef: weight of the AdaMoE load-balancing loss in the training loss
            (added by ``finetune.MoEAuxLossCallback``); with ``weighting="softmax"`` it trades
            the LM loss against null picks (1e-4 there let the routers use almost all k' true
            experts on the benchmark).
        null_logit_init: how null logits start.
            ``"anchored"`` (default): null logit j = a(x) + w_j·x + b_j with w, b = 0 at init,
            where a(x) is the midpoint between the token's k-th and (k+1)-th largest true
            logit (k = the model's original top-k; a is not differentiated). At init every
            token picks exactly its original k true experts plus k' − k nulls. This is our
            choice: the paper does not say, and ``"repeat_gate"`` is the official code's: null
            logits w_j·x with w_j = the pretrained gate row j mod n (clones of true logits, so
            at init tokens use fewer true experts than before).
        weighting: the weights of the picked true experts.
            ``"softmax"`` (default; ours): each pick keeps its softmax probability over all
            n + m experts, renormalised over all k' picks (nulls included) when the family
            renormalises; null picks then contribute zero output, so the LM loss sees the
            cost of choosing a null. With anchored nulls the injected model starts close to,
            not exactly at, the original (the k' − k null picks take a share of the
            normalisation; the first fine-tuning steps recover it).
            ``"renormalized"`` (paper and official code): the family's own weights over the
            n true experts only (softmax over true logits, renormalised over the picked true
            experts when the family renormalises); with anchored nulls the injected model
            computes exactly what the original did. The LM loss then gives no gradient to the
            null logits, only the aux loss moves them, and the routers drift to the aux loss's
            balance point: on the benchmark, with the paper's coefficient 1e-4, eval loss
            ended several % above top-k (measured result: benchmarks/RESULTS.md).
        layers: indices of the decoder layers whose MoE blocks get AdaMoE; ``None`` = all.
        experts_implementation: the ``ExpertsInterface`` entry the model is switched to; it
            must skip the null (sentinel) index: ``"modular"`` (CPU/GPU torch, default),
            ``"megablocks"`` (CUDA, optional dependency) or HF's ``"eager"``.
    """

    num_null_experts: int = 16
    top_k: int | None = None
    extra_top_k: int | None = None
    aux_loss_coef: float = 0.1
    null_logit_init: str = "anchored"
    weighting: str = "softmax"
    layers: list[int] | None = None
    experts_implementation: str = "modular"

    def __post_init__(self) -> None:
        if not isinstance(self.num_null_experts, int) or self.num_null_experts < 0:
            raise ValueError(f"AdaMoEConfig.num_null_experts must be an integer >= 0, got {self.num_null_experts!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"AdaMoEConfig.top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.extra_top_k is not None and (not isinstance(self.extra_top_k, int) or self.extra_top_k < 0):
            raise ValueError(f"AdaMoEConfig.extra_top_k must be an integer >= 0 or None, got {self.extra_top_k!r}")
        if self.top_k is not None and self.extra_top_k is not None:
            raise ValueError(
                f"AdaMoEConfig: set top_k (absolute k', got {self.top_k!r}) or extra_top_k (k' - k, got "
                f"{self.extra_top_k!r}), not both"
            )
        if not self.aux_loss_coef >= 0:
            raise ValueError(f"AdaMoEConfig.aux_loss_coef must be >= 0, got {self.aux_loss_coef!r}")
        if self.null_logit_init not in NULL_LOGIT_INITS:
            raise ValueError(
                f"AdaMoEConfig.null_logit_init must be one of {', '.join(NULL_LOGIT_INITS)}, got {self.null_logit_init!r}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"AdaMoEConfig.weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(
                f"AdaMoEConfig.experts_implementation must be one of {', '.join(EXPERTS_IMPLEMENTATIONS)}, "
                f"got {self.experts_implementation!r}"
            )
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]
            if any(i < 0 for i in self.layers):
                raise ValueError(f"AdaMoEConfig.layers must hold layer indices >= 0, got {self.layers!r}")

    def top_k_for(self, model_top_k: int) -> int:
        """k' for a router whose own top-k is ``model_top_k`` (``top_k``, else k + ``extra_top_k``)."""
        if self.top_k is not None:
            return self.top_k
        return model_top_k + (DEFAULT_EXTRA_TOP_K if self.extra_top_k is None else self.extra_top_k)


@dataclass
class UpcycleConfig:
    """Sparse upcycling of a dense model into its registry MoE family (:func:`moe.upcycle_to_moe`).

    Attributes:
        num_experts, top_k: experts per layer and experts per token.
        noise_std: std of Gaussian noise added to every expert copy (breaks the symmetry so
            experts can specialise); 0 keeps them identical, and then the MoE model computes
            the dense model's logits (the picked weights sum to 1).
        router_init_std: std of the fresh router weights (``None``: the config's ``initializer_range``).
        seed: seeds the noise and the router init.
    """

    num_experts: int = 8
    top_k: int = 2
    noise_std: float = 0.0
    router_init_std: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"UpcycleConfig.num_experts must be an integer >= 1, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"UpcycleConfig.top_k must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if not self.noise_std >= 0:
            raise ValueError(f"UpcycleConfig.noise_std must be >= 0, got {self.noise_std!r}")
        if self.router_init_std is not None and not self.router_init_std > 0:
            raise ValueError(f"UpcycleConfig.router_init_std must be > 0 or None, got {self.router_init_std!r}")

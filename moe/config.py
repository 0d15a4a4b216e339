"""``AdaMoEConfig``: every knob of the AdaMoE injection, validated once."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AdaMoEConfig", "EXPERTS_IMPLEMENTATIONS", "NULL_LOGIT_INITS", "UpcycleConfig", "WEIGHTINGS"]

NULL_LOGIT_INITS = ("anchored", "repeat_gate")
WEIGHTINGS = ("renormalized", "softmax")
EXPERTS_IMPLEMENTATIONS = ("modular", "megablocks", "eager")


@dataclass
class AdaMoEConfig:
    """AdaMoE null-expert routing (Zeng et al., 2024; ``docs/methods.md``, "AdaMoE").

    Attributes:
        num_null_experts: m, null experts added next to the n true experts of each block.
            Null experts output zero and cost no FLOPs. 0 with the model's own ``top_k``
            leaves the model unchanged.
        top_k: k', experts picked per token over all n + m. ``None`` keeps the model's own k.
        aux_loss_coef: weight of the AdaMoE load-balancing loss in the training loss
            (added by ``finetune.MoEAuxLossCallback``); it steers how many nulls are used.
        null_logit_init: how null logits start.
            ``"anchored"`` (default): null logit j = a(x) + w_j·x + b_j with w, b = 0 at init,
            where a(x) is the midpoint between the token's k-th and (k+1)-th largest true
            logit (k = the model's original top-k; a is not differentiated). At init every
            token picks exactly its original k true experts plus k' − k nulls, so the
            injected model computes exactly what the original did; fine-tuning then moves
            the null logits. This is our choice: the paper does not say, and
            ``"repeat_gate"`` is the official code's: null logits w_j·x with w_j = the
            pretrained gate row j mod n (clones of true logits, so at init tokens use fewer
            true experts than before).
        weighting: the weights of the picked true experts.
            ``"renormalized"`` (default; paper and official code): the family's own weights
            over the n true experts only (softmax over true logits, renormalised over the
            picked true experts when the family renormalises). The LM loss then gives no
            gradient to the null logits; only the aux loss moves them.
            ``"softmax"`` (our option): each pick keeps its softmax probability over all
            n + m experts, renormalised over all k' picks (nulls included) when the family
            renormalises; null picks then contribute zero output, so the LM loss sees the
            cost of choosing a null. With m = 0 both are the family's own weights; with
            anchored nulls the start is no longer exact (the k' − k null picks take a share
            of the normalisation: +4.2 % starting eval loss in benchmarks/adamoe_quality.py),
            and the aux coefficient now really trades the LM loss against nulls (1e-4 let
            the routers use 2.9 true experts per token there).
            The library default stays the official one (paper parity; it also needs no aux
            coefficient tuning to reach the aux loss's balance point). On our benchmark it
            lost 6.7 % eval loss, while ``"softmax"`` with ``aux_loss_coef=0.1`` (m=16, k'=4)
            stayed within 1 % at −21 % true experts per token: use that for quality
            (benchmarks/RESULTS.md, AdaMoE section).
        layers: indices of the decoder layers whose MoE blocks get AdaMoE; ``None`` = all.
        experts_implementation: the ``ExpertsInterface`` entry the model is switched to; it
            must skip the null (sentinel) index: ``"modular"`` (CPU/GPU torch, default),
            ``"megablocks"`` (CUDA, optional dependency) or HF's ``"eager"``.
    """

    num_null_experts: int = 16
    top_k: int | None = 4
    aux_loss_coef: float = 1e-4
    null_logit_init: str = "anchored"
    weighting: str = "renormalized"
    layers: list[int] | None = None
    experts_implementation: str = "modular"

    def __post_init__(self) -> None:
        if not isinstance(self.num_null_experts, int) or self.num_null_experts < 0:
            raise ValueError(f"AdaMoEConfig.num_null_experts must be an integer >= 0, got {self.num_null_experts!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"AdaMoEConfig.top_k must be an integer >= 1 or None, got {self.top_k!r}")
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

"""The AdaMoE router: scores n true + m null experts, picks top-k' over all of them.

It is built as a subclass of the model's own router class (``MixtralTopKRouter``,
``Qwen2MoeTopKRouter``, …) so that transformers' ``OutputRecorder`` still records its logits,
and it keeps the original router's ``weight`` parameter (same name, same tensor), so HF's
checkpoint layout is untouched; the null logits get new parameters ``null_weight``/``null_bias``.

Every supported family's router is "linear → softmax → top-k → optionally renormalise"
(``norm_topk_prob``; Mixtral always renormalises), so one class serves them all: the only
per-family knob is whether the family renormalises, read from the router it replaces.

Weights of the picked experts (``AdaMoEConfig.weighting``; ``"softmax"``: the pick's probability
over all n + m experts, renormalised over all k' picks when the family renormalises, nulls then
zeroed). Default ``"renormalized"`` (paper and official code; for renormalising families, which
includes Mixtral, they are the same): the family's own weights computed over the **true**
experts only — softmax over the n true logits, renormalised over the picked true experts when
the family renormalises. A null pick gets weight 0 and index ``n`` (the experts module's
sentinel), so no compute is spent on it; a token that picks only nulls gets a zero MoE output.
With no renormalisation this means null picks simply drop true experts, keeping the remaining
experts' original weights (softmax over n + m would shrink every weight as nulls appear).

The router keeps what it saw in its last forward (``last_probs``, ``last_selected``), read by
:func:`moe.loss.adamoe_aux_loss` (the load-balancing loss) and :func:`moe.stats.routing_stats`.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdaMoERouterMixin", "adamoe_router_class", "is_adamoe_router"]


class AdaMoERouterMixin:
    """Forward of the AdaMoE router; mixed in front of the model's router class."""

    weight: nn.Parameter  # (n, hidden): the pretrained gate, trained further
    null_weight: nn.Parameter  # (m, hidden)
    null_bias: nn.Parameter  # (m,)

    def _init_adamoe(self, base: nn.Module, *, num_null: int, top_k: int, anchor_rank: int | None,
                     renormalize: bool, aux_loss_coef: float, weighting: str = "renormalized") -> None:
        self.weight = base.weight
        self.num_experts = base.num_experts  # n: the experts module's sentinel index
        self.hidden_dim = base.hidden_dim
        self.top_k = top_k
        self.num_null_experts = num_null
        self.anchor_rank = anchor_rank
        self.renormalize = renormalize
        self.weighting = weighting
        self.aux_loss_coef = aux_loss_coef
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.null_weight = nn.Parameter(torch.zeros(num_null, self.hidden_dim, **factory))
        self.null_bias = nn.Parameter(torch.zeros(num_null, **factory))
        self.last_probs: torch.Tensor | None = None
        self.last_selected: torch.Tensor | None = None

    def _anchor(self, true_logits: torch.Tensor) -> torch.Tensor:
        """Midpoint between the k-th and (k+1)-th largest true logit per token, (T, 1)."""
        k = self.anchor_rank
        if k >= self.num_experts:  # every true expert was picked before: nulls start below all of them
            return true_logits.min(-1, keepdim=True).values - 1.0
        top = torch.topk(true_logits, k + 1, dim=-1).values
        return (top[:, k - 1 : k] + top[:, k : k + 1]) / 2

    def forward(self, hidden_states: torch.Tensor):
        """hidden_states (..., hidden) -> (logits (T, n+m) fp32, weights (T, k') in the input's dtype, indices (T, k')).

        ``indices`` hold true expert ids, or ``n`` (sentinel) for null picks, whose weight is 0.
        """
        x = hidden_states.reshape(-1, self.hidden_dim)
        n = self.num_experts
        # Logits in fp32 whatever the model's dtype: in bf16, near-tied logits would round together
        # and the top-k (which experts run, and the null picks) would flip with rounding noise.
        true_logits = F.linear(x.float(), self.weight.float())
        null_logits = F.linear(x.float(), self.null_weight.float(), self.null_bias.float())
        if self.anchor_rank is not None:
            null_logits = null_logits + self._anchor(true_logits).detach()
        logits = torch.cat([true_logits, null_logits], dim=-1)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        _, selected = torch.topk(probs, self.top_k, dim=-1)
        is_true = selected < n
        if self.weighting == "softmax":  # nulls share the normalisation, then output zero
            weights = probs.gather(-1, selected)
            if self.renormalize:
                weights = weights / weights.sum(-1, keepdim=True)
            weights = weights * is_true
        else:
            true_probs = F.softmax(true_logits, dim=-1, dtype=torch.float)
            weights = true_probs.gather(-1, selected.clamp(max=n - 1)) * is_true
            if self.renormalize:
                weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        self.last_probs, self.last_selected = probs, selected.detach()
        indices = torch.where(is_true, selected, torch.full_like(selected, n))
        return logits, weights.to(x.dtype), indices


def adamoe_router_class(base_class: type) -> type:
    """``AdaMoE<Base>``: the mixin in front of ``base_class``. Cached as a module attribute so
    that models holding it still pickle."""
    name = f"AdaMoE{base_class.__name__}"
    module = sys.modules[__name__]
    cls = getattr(module, name, None)
    if cls is None:
        cls = type(name, (AdaMoERouterMixin, base_class), {"__module__": __name__})
        setattr(module, name, cls)
    return cls


def make_adamoe_router(base: nn.Module, **kwargs) -> nn.Module:
    """A new AdaMoE router sharing ``base``'s gate weight (``base``'s own ``__init__`` wants a
    config; the mixin sets every attribute the forward needs instead)."""
    cls = adamoe_router_class(type(base))
    router = cls.__new__(cls)
    nn.Module.__init__(router)
    router._init_adamoe(base, **kwargs)
    router.train(base.training)
    return router


def is_adamoe_router(module: nn.Module) -> bool:
    return isinstance(module, AdaMoERouterMixin)

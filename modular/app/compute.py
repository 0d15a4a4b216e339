"""FFN compute per token of an injected model, measured on real (non-padding) tokens.

Counts, while the model runs on batches, what each token really runs in every feed-forward:
an ACM's learners (``modular.acm``: j learners + its gate) and an experts block's true experts
(``moe.ffn_experts``: AdaMoE's null picks cost nothing, the router's logits are counted), against
the dense FFNs they replaced; dense FFNs left as they were count in full. The result,
``compute_fraction``, is the FFN FLOPs per token relative to the dense model's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from modular.acm.layer import ACMLayer, choose_learners
from modular.acm.sites import find_ffn_sites
from modular.registry import architecture_of
from moe.ffn_experts import FFNExpertsBlock

__all__ = ["FFNComputeMeter"]


class FFNComputeMeter:
    """Hooks on every ACM and experts block of ``model``; :meth:`tokens` marks the real tokens of
    the next forward (its ``attention_mask``). Use as a context manager around the forwards."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.mask: torch.Tensor | None = None
        self.acm_histogram: list[int] | None = None
        self.flops = 0.0  # FFN FLOPs run, summed over tokens and layers
        self.dense = 0.0  # FFN FLOPs of the dense model on the same tokens
        self.true_experts = 0  # true expert picks, summed over tokens and experts blocks
        self.expert_tokens = 0  # tokens seen by experts blocks (tokens x blocks)
        self._handles: list = []
        plain = [re.escape(name) for name, module in architecture_of(model).mlps() if not isinstance(module, ACMLayer)]
        sites = find_ffn_sites(model, "^(" + "|".join(plain) + ")$", what="FFNComputeMeter") if plain else []
        self._plain_flops = sum(2 * s.w_in.shape[1] * s.intermediate_size * (3 if s.w_up is not None else 2) for s in sites)

    def __enter__(self) -> FFNComputeMeter:
        for module in self.model.modules():
            if isinstance(module, ACMLayer):
                self._handles.append(module.register_forward_pre_hook(self._acm))
                self.acm_histogram = self.acm_histogram or [0] * (module.num_learners + 1)
            elif isinstance(module, FFNExpertsBlock):
                self._handles.append(module.router.register_forward_hook(self._router(module)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def tokens(self, attention_mask: torch.Tensor) -> None:
        """The next forward's real tokens; dense FFNs (not injected) count in full on them."""
        self.mask = attention_mask.reshape(-1).bool()
        plain = int(self.mask.sum()) * self._plain_flops
        self.flops += plain
        self.dense += plain

    def _acm(self, layer: ACMLayer, args) -> None:
        x = args[0].reshape(-1, layer.hidden_size)[self.mask]
        with torch.no_grad():
            choice = choose_learners(layer.gate(x), layer.threshold)
        counts = torch.bincount(choice, minlength=layer.num_learners + 1).tolist()
        self.acm_histogram = [a + b for a, b in zip(self.acm_histogram, counts)]
        learners = sum(j * c for j, c in enumerate(counts))
        self.flops += learners * layer.learner_flops_per_token() + len(x) * layer.gate.flops_per_token()
        self.dense += len(x) * layer.dense_flops_per_token()

    def _router(self, block: FFNExpertsBlock):
        def hook(_router, _args, output) -> None:
            picks = output[2][self.mask]  # (tokens, k): expert ids, n for null picks
            true = int((picks < block.experts.num_experts).sum())
            self.true_experts += true
            self.expert_tokens += len(picks)
            self.flops += true * block.expert_flops_per_token() + len(picks) * block.router_flops_per_token()
            self.dense += len(picks) * block.dense_flops_per_token()
        return hook

    def run(self, batches: Iterable[dict]) -> None:
        """Forward every batch (no gradients), counting its real tokens."""
        with torch.no_grad():
            for batch in batches:
                self.tokens(batch["attention_mask"])
                self.model(**batch)

    def summary(self) -> dict:
        return {
            "compute_fraction": self.flops / self.dense if self.dense else float("nan"),
            "acm_histogram": self.acm_histogram,
            "true_experts_per_token": self.true_experts / self.expert_tokens if self.expert_tokens else None,
        }

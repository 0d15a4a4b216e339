"""The dense FFNs an ACM can replace: where each one is (through the architecture registry) and its
weights in the ACM's layout (hidden units as rows).

Supported FFNs: llama-style gated MLPs (``gate_proj``/``up_proj``/``down_proj``/``act_fn``) and
BERT's split FFN (registry ``mlp`` = ``intermediate``, ``mlp_output`` = ``output.dense``): there
the ACM replaces ``intermediate`` and produces the whole FFN output, and ``output.dense`` becomes
``nn.Identity`` (BertOutput still applies dropout, the residual and LayerNorm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..injections import InjectionError
from ..registry import architecture_of
from ..surgery import find_modules
from .config import ACMConfig
from .layer import ACMLayer

__all__ = ["FFNSite", "ffn_sites", "new_layer"]


@dataclass
class FFNSite:
    """One dense FFN: where it is, and its weights in the ACM's layout (hidden units as rows)."""

    name: str  # module the ACM replaces
    output_name: str | None  # BERT: second half of the FFN, replaced by nn.Identity
    act_fn: nn.Module
    w_in: torch.Tensor  # (h, d)
    b_in: torch.Tensor | None
    w_up: torch.Tensor | None  # (h, d), gated FFNs only
    b_up: torch.Tensor | None
    w_out: torch.Tensor  # (h, d) = down/output weight transposed
    b_out: torch.Tensor | None  # (d,)

    @property
    def intermediate_size(self) -> int:
        return self.w_in.shape[0]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The dense FFN's hidden activations (T, h)."""
        h = self.act_fn(F.linear(x, self.w_in, self.b_in))
        return h * F.linear(x, self.w_up, self.b_up) if self.w_up is not None else h


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def _site(model: nn.Module, name: str, module: nn.Module, output_name: str | None) -> FFNSite:
    if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return FFNSite(name, None, module.act_fn, module.gate_proj.weight.detach(), _bias(module.gate_proj),
                     module.up_proj.weight.detach(), _bias(module.up_proj), module.down_proj.weight.detach().T,
                     _bias(module.down_proj))
    if output_name is not None and hasattr(module, "dense") and hasattr(module, "intermediate_act_fn"):
        out = model.get_submodule(output_name)
        if isinstance(module.dense, nn.Linear) and isinstance(out, nn.Linear):
            return FFNSite(name, output_name, module.intermediate_act_fn, module.dense.weight.detach(), _bias(module.dense),
                         None, None, out.weight.detach().T, _bias(out))
    raise InjectionError(
        f"acmize: {name} is a {type(module).__name__}, which ACM does not know how to convert; supported FFNs are "
        "llama-style gated MLPs (gate_proj/up_proj/down_proj/act_fn) and BERT-style split FFNs "
        "(intermediate.dense + output.dense)"
    )


def ffn_sites(model: nn.Module, config: ACMConfig) -> list[FFNSite]:
    arch = architecture_of(model)  # unknown model_type: UnknownArchitectureError naming the registry
    if not arch.mlps():
        raise InjectionError(f"acmize: this {arch.model_type} model has no dense FFN to convert (ACM targets dense MLPs)")
    outputs = dict(zip([n for n, _ in arch.mlps()], [n for n, _ in arch.mlp_outputs()]))
    found = find_modules(model, role="mlp", pattern=config.target_pattern)
    return [_site(model, name, module, outputs.get(name)) for name, module in found]


def new_layer(site: FFNSite, config: ACMConfig) -> ACMLayer:
    return ACMLayer(
        site.w_in.shape[1], config.num_learners, config.width_for(site.intermediate_size), site.act_fn,
        gated=site.w_up is not None, bias_in=site.b_in is not None, bias_out=site.b_out is not None,
        gate_hidden_size=config.gate_hidden_size, dense_intermediate_size=site.intermediate_size,
        threshold=config.threshold, gumbel_tau=config.gumbel_tau, dtype=site.w_in.dtype, device=site.w_in.device,
    )

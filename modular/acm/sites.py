"""The dense FFNs an ACM (or an experts block, ``moe.ffn_experts``) can replace: where each one is
(through the architecture registry) and its weights in one layout (hidden units as rows).

Supported FFNs: llama-style gated MLPs (``gate_proj``/``up_proj``/``down_proj``/``act_fn``), GPT-2's
``c_fc``/``act``/``c_proj`` (``Conv1D``) and BERT's split FFN (registry ``mlp`` = ``intermediate``,
``mlp_output`` = ``output.dense``): there the replacement takes ``intermediate``'s place and produces
the whole FFN output, and ``output.dense`` becomes ``nn.Identity`` (BertOutput still applies
dropout, the residual and LayerNorm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..injections import InjectionError
from ..registry import architecture_of
from ..surgery import find_modules, replace_module
from .config import ACMConfig
from .layer import ACMLayer

__all__ = ["FFNSite", "ffn_sites", "find_ffn_sites", "new_layer", "replace_ffn"]


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
    if all(type(getattr(module, a, None)).__name__ == "Conv1D" for a in ("c_fc", "c_proj")) and hasattr(module, "act"):
        # GPT-2: Conv1D stores (in, out) weights, so c_fc's is transposed and c_proj's is already (h, d)
        return FFNSite(name, None, module.act, module.c_fc.weight.detach().T, _bias(module.c_fc), None, None,
                       module.c_proj.weight.detach(), _bias(module.c_proj))
    if output_name is not None and hasattr(module, "dense") and hasattr(module, "intermediate_act_fn"):
        out = model.get_submodule(output_name)
        if isinstance(module.dense, nn.Linear) and isinstance(out, nn.Linear):
            return FFNSite(name, output_name, module.intermediate_act_fn, module.dense.weight.detach(), _bias(module.dense),
                         None, None, out.weight.detach().T, _bias(out))
    raise InjectionError(
        f"{name} is a {type(module).__name__}, which cannot be read as a dense FFN; supported FFNs are "
        "llama-style gated MLPs (gate_proj/up_proj/down_proj/act_fn), GPT-2 MLPs (c_fc/act/c_proj) and BERT-style split FFNs "
        "(intermediate.dense + output.dense)"
    )


def find_ffn_sites(model: nn.Module, pattern: str | None = None, *, what: str = "acmize") -> list[FFNSite]:
    """The dense FFNs of ``model`` (those whose name matches ``pattern``, ``re.search``), read
    through the registry; ``what`` names the caller in errors."""
    arch = architecture_of(model)  # unknown model_type: UnknownArchitectureError naming the registry
    if not arch.mlps():
        raise InjectionError(f"{what}: this {arch.model_type} model has no dense FFN to convert")
    outputs = dict(zip([n for n, _ in arch.mlps()], [n for n, _ in arch.mlp_outputs()]))
    found = find_modules(model, role="mlp", pattern=pattern)
    return [_site(model, name, module, outputs.get(name)) for name, module in found]


def ffn_sites(model: nn.Module, config: ACMConfig) -> list[FFNSite]:
    return find_ffn_sites(model, config.target_pattern)


def new_layer(site: FFNSite, config: ACMConfig) -> ACMLayer:
    return ACMLayer(
        site.w_in.shape[1], config.num_learners, config.width_for(site.intermediate_size), site.act_fn,
        gated=site.w_up is not None, bias_in=site.b_in is not None, bias_out=site.b_out is not None,
        gate_hidden_size=config.gate_hidden_size, dense_intermediate_size=site.intermediate_size,
        threshold=config.threshold, gumbel_tau=config.gumbel_tau, dtype=site.w_in.dtype, device=site.w_in.device,
    )


def replace_ffn(model: nn.Module, site: FFNSite, module: nn.Module) -> list[str]:
    """Put ``module`` (producing the whole FFN output) where the FFN at ``site`` is; the second
    half of a split FFN becomes ``nn.Identity``. Returns the replaced module names."""
    replace_module(model, site.name, module)
    if site.output_name is None:
        return [site.name]
    replace_module(model, site.output_name, nn.Identity())
    return [site.name, site.output_name]

"""Experts implementations for transformers' ``ExpertsInterface`` that skip null experts.

HF routes a token to ``num_experts`` (one past the last expert) to mean "no expert": only
``eager`` skips that sentinel outside expert parallelism. AdaMoE maps every null-expert pick
to it, so these implementations drop sentinel pairs **before** any matmul: a null pick costs
nothing.

Both share one dispatch (:func:`_experts_forward`): sort the (token, expert) pairs by expert,
gather the tokens once, run the up and down projections as grouped matmuls, weight, and
scatter-add back. They differ only in the grouped matmul:

* ``modular``: :class:`_GroupedMatmul`, a loop of dense ``torch.mm`` per expert with a
  hand-written backward that writes each expert's weight gradient straight into one
  gradient tensor (autograd through ``weight[e]`` would allocate and add a full-size zero
  gradient per expert, which is where HF ``eager`` loses time in backward).
* ``megablocks``: megablocks' grouped GEMM (CUDA only; optional dependency, imported lazily).

Registered at import under the names ``"modular"`` and ``"megablocks"``; select one with
``model.set_experts_implementation("modular")`` (``inject_adamoe`` does it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.integrations.moe import ExpertsInterface

__all__ = ["megablocks_experts_forward", "modular_experts_forward"]

GroupedLinear = Callable[[torch.Tensor, torch.Tensor, list[int], bool], torch.Tensor]


class _GroupedMatmul(torch.autograd.Function):
    """``out[rows of e] = x[rows of e] @ W[e]ᵀ`` (or ``@ W[e]`` when ``transposed``).

    Shapes: x (S, in) sorted by expert, W (E, out, in) — or (E, in, out) when transposed —,
    counts: E Python ints summing to S. Returns (S, out).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: list[int], transposed: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.transposed = counts, transposed
        out = x.new_empty(x.shape[0], weight.shape[2] if transposed else weight.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                w = weight[e] if transposed else weight[e].t()
                torch.mm(x[start : start + n], w, out=out[start : start + n])
                start += n
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                if grad_w is not None:  # only unused experts need zeros: saves a full-size fill
                    grad_w[e].zero_()
                continue
            rows = slice(start, start + n)
            if grad_x is not None:  # dx = dy @ W[e]  (or W[e]ᵀ)
                torch.mm(grad_out[rows], weight[e].t() if ctx.transposed else weight[e], out=grad_x[rows])
            if grad_w is not None:  # dW[e] = dyᵀ x  (or xᵀ dy)
                if ctx.transposed:
                    torch.mm(x[rows].t(), grad_out[rows], out=grad_w[e])
                else:
                    torch.mm(grad_out[rows].t(), x[rows], out=grad_w[e])
            start += n
        return grad_x, grad_w, None, None


def _torch_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int], transposed: bool) -> torch.Tensor:
    return _GroupedMatmul.apply(x, weight, counts, transposed)


def _experts_forward(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    grouped_linear: GroupedLinear,
) -> torch.Tensor:
    """The shared dispatch. hidden_states (T, H), top_k_index / top_k_weights (T, K); an index
    ``>= experts.num_experts`` is a null pick and is dropped. Returns (T, H)."""
    num_experts, top_k = experts.num_experts, top_k_index.shape[-1]
    flat_index = top_k_index.reshape(-1)
    with torch.no_grad():
        pairs = torch.nonzero(flat_index < num_experts).squeeze(-1)
        expert_of_pair, order = torch.sort(flat_index[pairs], stable=True)
        pairs = pairs[order]
        counts = torch.bincount(expert_of_pair, minlength=num_experts).tolist()
        tokens = pairs // top_k
    x = hidden_states.index_select(0, tokens)

    up_weight = experts.gate_up_proj if experts.has_gate else experts.up_proj
    h = grouped_linear(x, up_weight, counts, experts.is_transposed)
    if experts.has_bias:
        h = h + (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias)[expert_of_pair]
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = grouped_linear(h, experts.down_proj, counts, experts.is_transposed)
    if experts.has_bias:
        y = y + experts.down_proj_bias[expert_of_pair]
    if experts.has_post_expert_norm:
        y = experts.post_expert_norm(y)

    y = y * top_k_weights.reshape(-1)[pairs].unsqueeze(-1).to(y.dtype)
    out = torch.zeros_like(hidden_states)
    return out.index_add(0, tokens, y.to(out.dtype))


def modular_experts_forward(experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """``ExpertsInterface`` entry ``"modular"``: torch grouped matmuls, null picks skipped."""
    return _experts_forward(experts, hidden_states, top_k_index, top_k_weights, _torch_grouped_linear)


def _megablocks_gmm():
    try:
        from megablocks import grouped_gemm_util as gg
    except ImportError as err:
        raise ImportError(
            "experts implementation 'megablocks' needs megablocks (CUDA): pip install 'modular-llm[megablocks]'"
        ) from err
    if not gg.grouped_gemm_is_available():
        raise ImportError("megablocks is installed without its grouped_gemm kernels: pip install grouped_gemm")
    return gg.ops.gmm


def megablocks_experts_forward(experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """``ExpertsInterface`` entry ``"megablocks"``: megablocks' grouped GEMM (CUDA only).

    megablocks' own ``dMoE`` takes a fixed top-k with indices in [0, E); here null pairs are
    dropped by the shared dispatch first, and only its grouped GEMM is used.
    """
    gmm = _megablocks_gmm()

    def grouped_linear(x, weight, counts, transposed):
        batch_sizes = torch.tensor(counts, dtype=torch.int64)  # megablocks wants them on the CPU
        return gmm(x.contiguous(), weight, batch_sizes, trans_b=not transposed)

    return _experts_forward(experts, hidden_states, top_k_index, top_k_weights, grouped_linear)


ExpertsInterface.register("modular", modular_experts_forward)
ExpertsInterface.register("megablocks", megablocks_experts_forward)

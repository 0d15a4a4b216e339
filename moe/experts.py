"""Experts implementations for transformers' ``ExpertsInterface`` that skip null experts.

HF routes a token to ``num_experts`` (one past the last expert) to mean "no expert": only
``eager`` skips that sentinel outside expert parallelism. AdaMoE maps every null-expert pick
to it, so these implementations drop sentinel pairs **before** any matmul: a null pick costs
nothing.

Both share one dispatch (:func:`_experts_forward`): drop the null pairs, sort the (token, expert)
pairs by expert, gather the tokens once, run the up and down projections as grouped matmuls,
weight, and scatter-add back. It reads the per-expert counts on the host (one sync), which costs
nothing on the CPU. They differ only in the grouped matmul:

* ``modular``: :class:`_GroupedMatmul`, a loop of dense ``torch.mm`` per expert with a
  hand-written backward that writes each expert's weight gradient straight into one
  gradient tensor (autograd through ``weight[e]`` would allocate and add a full-size zero
  gradient per expert, which is where HF ``eager`` loses time in backward).
* ``megablocks``: megablocks' grouped GEMM (CUDA only; optional dependency, imported lazily).
  It wants bf16 and per-expert counts on the host: inputs and weights are cast to bf16 and the
  output back to the input's dtype (a no-op for a bf16 model).

On CUDA with bf16 weights, ``modular`` runs :func:`_experts_forward_on_device` instead, with no
host sync: the pairs are sorted with the null ones last, per-expert offsets are computed on the
device, and torch's grouped matmul (``torch.nn.functional.grouped_mm``, what transformers'
``grouped_mm`` uses) computes only the rows before the last offset, so null pairs cost no matmul;
their rows, which the kernel leaves uninitialised, are masked before and after.

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


def _torch_grouped_mm():
    """torch's grouped matmul (``F.grouped_mm``, torch >= 2.10; ``torch._grouped_mm`` before), or None."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _runs_on_device(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """The sync-free path: CUDA, bf16 weights (what torch's grouped matmul supports on SM80+)."""
    return (hidden_states.is_cuda and weight.dtype == torch.bfloat16 and _torch_grouped_mm() is not None
            and torch.cuda.get_device_capability(hidden_states.device) >= (8, 0))


def _experts_forward_on_device(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """The same computation as :func:`_experts_forward` without reading anything on the host.

    Every (token, expert) pair keeps a row; sorting puts the null pairs (index ``num_experts``) last,
    after the last offset, where the grouped matmul computes nothing. Its output rows there (and the
    input-gradient rows in backward) are uninitialised: the gathered input is zeroed on those rows
    (its backward then zeroes their gradient) and so is the output (``NaN · 0`` would otherwise leak).
    The top-k contributions are summed per token in fp32 (deterministic, no atomic adds).
    """
    grouped_mm = _torch_grouped_mm()
    num_experts, (tokens, top_k) = experts.num_experts, top_k_index.shape
    expert_of_pair, order = torch.sort(top_k_index.reshape(-1), stable=True)
    null = (expert_of_pair >= num_experts).unsqueeze(-1)
    bounds = torch.arange(1, num_experts + 1, device=expert_of_pair.device, dtype=expert_of_pair.dtype)
    offsets = torch.searchsorted(expert_of_pair, bounds).to(torch.int32)  # pairs with expert < e + 1
    expert_ids = expert_of_pair.clamp(max=num_experts - 1)  # in range for the bias gather; null rows are masked

    def linear(x, weight, bias):
        weight = weight if experts.is_transposed else weight.transpose(-2, -1)  # (E, in, out)
        out = grouped_mm(x.to(weight.dtype), weight, offs=offsets)
        return out + bias[expert_ids] if bias is not None else out

    x = hidden_states.index_select(0, order // top_k).masked_fill(null, 0)
    up_bias = (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias) if experts.has_bias else None
    h = linear(x, experts.gate_up_proj if experts.has_gate else experts.up_proj, up_bias)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = linear(h, experts.down_proj, experts.down_proj_bias if experts.has_bias else None)
    if experts.has_post_expert_norm:
        y = experts.post_expert_norm(y)
    y = y.masked_fill(null, 0) * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    per_pair = torch.empty_like(y).index_copy(0, order, y)  # back to (token, k) order
    return per_pair.view(tokens, top_k, -1).float().sum(1).to(hidden_states.dtype)


def modular_experts_forward(experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """``ExpertsInterface`` entry ``"modular"``: null picks skipped; torch matmuls per expert (CPU),
    torch's grouped matmul without host syncs (CUDA, bf16)."""
    if _runs_on_device(hidden_states, experts.down_proj):
        return _experts_forward_on_device(experts, hidden_states, top_k_index, top_k_weights)
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
        out = gmm(x.to(torch.bfloat16).contiguous(), weight.to(torch.bfloat16), batch_sizes, trans_b=not transposed)
        return out.to(x.dtype)  # its kernels are bf16-only: cast in, cast back (no-ops for a bf16 model)

    return _experts_forward(experts, hidden_states, top_k_index, top_k_weights, grouped_linear)


ExpertsInterface.register("modular", modular_experts_forward)
ExpertsInterface.register("megablocks", megablocks_experts_forward)

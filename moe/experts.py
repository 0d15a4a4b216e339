"""Experts implementations for transformers' ``ExpertsInterface`` that skip null experts.

HF routes a token to ``num_experts`` (one past the last expert) to mean "no expert": only
``eager`` skips that sentinel outside expert parallelism. AdaMoE maps every null-expert pick
to it, so these implementations drop sentinel pairs **before** any matmul: a null pick costs
nothing.

Both share one dispatch (:func:`_experts_forward`): drop the null pairs, sort the (token, expert)
pairs by expert, gather the tokens once, run the experts' MLPs, weight, and scatter-add back. It
reads the per-expert counts on the host (one sync), which costs nothing on the CPU. They differ
only in how the MLPs run:

* ``modular``: :class:`_ExpertMLPs`, each expert's whole MLP (dense ``torch.mm``, activation,
  ``torch.mm``) before the next expert's, with a hand-written backward that recomputes the
  activation per expert and writes each expert's weight gradient straight into one gradient
  tensor.
* ``megablocks``: two of megablocks' grouped GEMMs (CUDA only; optional dependency, imported
  lazily). It wants bf16 and per-expert counts on the host: inputs and weights are cast to bf16
  and the output back to the input's dtype (a no-op for a bf16 model).

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

def _expert_rows(counts: list[int]):
    """(expert, row slice) of each expert with rows, in the sorted layout ``counts`` describes."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
            start += n


def _linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 transposed: bool) -> torch.Tensor:
    """``out = x @ weight.T + bias`` (``x @ weight`` when ``transposed``), written into ``out``; the
    bias is added after the product (not ``addmm``): the rounding of ``h + bias[expert_of_pair]``."""
    torch.mm(x, weight if transposed else weight.t(), out=out)
    return out if bias is None else out.add_(bias)


def _gathered_bias_grad(grad: torch.Tensor, expert_of_pair: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The gradient of ``bias[expert_of_pair]`` for ``grad`` (E, out), computed as autograd computes
    it (``index_put_`` with accumulation), so it equals a plain ``h + bias[expert_of_pair]``'s bit
    for bit on one thread (a per-expert sum adds the rows in another order; on more threads the
    accumulation order, and so the last bits, can vary from run to run, as autograd's does)."""
    return grad.new_zeros(num_experts, grad.shape[1]).index_put_((expert_of_pair,), grad, accumulate=True)


class _ExpertMLPs(torch.autograd.Function):
    """Each expert's whole MLP on its rows, one expert after the other:
    ``y[rows of e] = act(x W_up[e]ᵀ + b_up[e]) W_down[e]ᵀ + b_down[e]``.

    x (S, in) sorted by expert; weights (E, out, in), or (E, in, out) when ``transposed``; biases
    (E, out) or None; counts: E Python ints summing to S; expert_of_pair (S,): each row's expert;
    ``activation`` maps the up projection's output to the down projection's input (gated or not).

    Why one expert at a time rather than two grouped matmuls over all rows: the expert's
    (n_e, 2·ffn) intermediate stays in cache between its matmuls and the activation, and backward
    keeps only the up projection's output, recomputing the activation per expert (10-13 % faster
    forward + backward on a 2-core CPU, ``benchmarks/moe_layer.py``). Each weight gradient is
    written straight into one gradient tensor (autograd through ``weight[e]`` would add a full-size
    zero gradient per expert, where HF ``eager`` loses time in backward); frozen weights get none.
    """

    @staticmethod
    def forward(ctx, x, up_w, up_b, down_w, down_b, counts: list[int], expert_of_pair: torch.Tensor, transposed: bool,
                activation):
        up_out = x.new_empty(x.shape[0], up_w.shape[2] if transposed else up_w.shape[1])
        out = x.new_empty(x.shape[0], down_w.shape[2] if transposed else down_w.shape[1])
        for e, rows in _expert_rows(counts):
            _linear_into(up_out[rows], x[rows], up_w[e], None if up_b is None else up_b[e], transposed)
            _linear_into(out[rows], activation(up_out[rows]), down_w[e], None if down_b is None else down_b[e], transposed)
        ctx.save_for_backward(x, up_w, down_w, up_out, expert_of_pair)
        ctx.counts, ctx.transposed, ctx.activation = counts, transposed, activation
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, up_w, down_w, up_out, expert_of_pair = ctx.saved_tensors
        grad_out, transposed, need = grad_out.contiguous(), ctx.transposed, ctx.needs_input_grad
        grad_x = torch.empty_like(x) if need[0] else None
        grad_up_w = torch.empty_like(up_w) if need[1] else None
        grad_pre_rows = torch.empty_like(up_out) if need[2] else None  # for the up bias's gradient
        grad_down_w = torch.empty_like(down_w) if need[3] else None
        weight_grads = [g for g in (grad_up_w, grad_down_w) if g is not None]
        for e, n in enumerate(ctx.counts):
            if not n:  # only unused experts need zeros: saves a full-size fill
                for g in weight_grads:
                    g[e].zero_()
        for e, rows in _expert_rows(ctx.counts):
            dy = grad_out[rows]
            with torch.enable_grad():
                pre = up_out[rows].detach().requires_grad_()
                act = ctx.activation(pre)
            if grad_down_w is not None:  # dW = dyᵀ a  (aᵀ dy when transposed)
                torch.mm(*((act.detach().t(), dy) if transposed else (dy.t(), act.detach())), out=grad_down_w[e])
            if grad_x is None and grad_up_w is None and grad_pre_rows is None:
                continue
            (grad_pre,) = torch.autograd.grad(act, pre, dy @ (down_w[e].t() if transposed else down_w[e]))
            if grad_up_w is not None:
                torch.mm(*((x[rows].t(), grad_pre) if transposed else (grad_pre.t(), x[rows])), out=grad_up_w[e])
            if grad_pre_rows is not None:
                grad_pre_rows[rows] = grad_pre
            if grad_x is not None:
                torch.mm(grad_pre, up_w[e].t() if transposed else up_w[e], out=grad_x[rows])
        num_experts = up_w.shape[0]
        grad_up_b = _gathered_bias_grad(grad_pre_rows, expert_of_pair, num_experts) if need[2] else None
        grad_down_b = _gathered_bias_grad(grad_out, expert_of_pair, num_experts) if need[4] else None
        return grad_x, grad_up_w, grad_up_b, grad_down_w, grad_down_b, None, None, None, None


ExpertMLPs = Callable[[torch.nn.Module, torch.Tensor, list[int], torch.Tensor], torch.Tensor]


def _experts_forward(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, expert_mlps: ExpertMLPs) -> torch.Tensor:
    """The shared dispatch. hidden_states (T, H), top_k_index / top_k_weights (T, K); an index
    ``>= experts.num_experts`` is a null pick and is dropped. ``expert_mlps(experts, x, counts,
    expert_of_pair)`` runs every expert's MLP (biases included) on the rows sorted by expert.
    Returns (T, H)."""
    num_experts, top_k = experts.num_experts, top_k_index.shape[-1]
    flat_index = top_k_index.reshape(-1)
    with torch.no_grad():
        pairs = torch.nonzero(flat_index < num_experts).squeeze(-1)
        expert_of_pair, order = torch.sort(flat_index[pairs], stable=True)
        pairs = pairs[order]
        counts = torch.bincount(expert_of_pair, minlength=num_experts).tolist()
        tokens = pairs // top_k
    y = expert_mlps(experts, hidden_states.index_select(0, tokens), counts, expert_of_pair)
    if experts.has_post_expert_norm:
        y = experts.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[pairs].unsqueeze(-1).to(y.dtype)
    out = torch.zeros_like(hidden_states)
    return out.index_add(0, tokens, y.to(out.dtype))


def _projections(experts) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(up weight, up bias, down weight, down bias) of an experts block, gated or not, biases or None."""
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    up_bias = (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias) if experts.has_bias else None
    return up, up_bias, experts.down_proj, experts.down_proj_bias if experts.has_bias else None


def _activation(experts):
    return experts._apply_gate if experts.has_gate else experts.act_fn


def _expert_mlps_per_expert(experts, x: torch.Tensor, counts: list[int], expert_of_pair: torch.Tensor) -> torch.Tensor:
    up, up_bias, down, down_bias = _projections(experts)
    return _ExpertMLPs.apply(x, up, up_bias, down, down_bias, counts, expert_of_pair, experts.is_transposed,
                             _activation(experts))


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
    up, up_bias, down, down_bias = _projections(experts)
    y = linear(_activation(experts)(linear(x, up, up_bias)), down, down_bias)
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
    return _experts_forward(experts, hidden_states, top_k_index, top_k_weights, _expert_mlps_per_expert)


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

    def expert_mlps(experts, x, counts, expert_of_pair):
        batch_sizes = torch.tensor(counts, dtype=torch.int64)  # megablocks wants them on the CPU

        def linear(x, weight, bias):
            # its kernels are bf16-only: cast in, cast back (no-ops for a bf16 model)
            out = gmm(x.to(torch.bfloat16).contiguous(), weight.to(torch.bfloat16), batch_sizes,
                      trans_b=not experts.is_transposed).to(x.dtype)
            return out + bias[expert_of_pair] if bias is not None else out

        up, up_bias, down, down_bias = _projections(experts)
        return linear(_activation(experts)(linear(x, up, up_bias)), down, down_bias)

    return _experts_forward(experts, hidden_states, top_k_index, top_k_weights, expert_mlps)


ExpertsInterface.register("modular", modular_experts_forward)
ExpertsInterface.register("megablocks", megablocks_experts_forward)

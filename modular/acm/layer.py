"""The ACM module: N learners whose prefix sums refine a dense FFN's output, and a per-token gate.

Learner i (0-based) owns hidden units ``[i*w, (i+1)*w)`` of fused weights, so "the first j
learners" is always one contiguous row slice ``[:j*w]`` (training computes every prefix at once
that way) and any run of consecutive learners is one slice too (inference runs them so).

Shapes (T tokens, d model width, N learners of width w, k = j*w):

- plain FFN (BERT):   y_j = act(x @ w_in[:k].T + b_in[:k]) @ w_out[:k] + b_out[:j].sum(0)
- gated FFN (llama):  y_j = (act(x @ w_in[:k].T) * (x @ w_up[:k].T)) @ w_out[:k] (+ biases)

``w_in``/``w_up``: (N*w, d); ``w_out``: (N*w, d), stored transposed against ``nn.Linear`` so that
its first j learners are contiguous rows too; ``b_out``: (N, d), one output bias per learner.
y_0 = 0: the module sits on a residual connection.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACMGate", "ACMLayer", "choose_learners", "gate_labels", "inplace_activation"]


# In-place activations as plain module functions, so that modules holding one still pickle.
def _gelu_(h: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(h)


def _gelu_tanh_(h: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(h, approximate="tanh")


def _silu_(h: torch.Tensor) -> torch.Tensor:
    return F.silu(h, inplace=True)


def _relu_(h: torch.Tensor) -> torch.Tensor:
    return h.relu_()


_INPLACE_ACTIVATIONS = (_gelu_, _gelu_tanh_, _silu_, _relu_)


def inplace_activation(act_fn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The in-place twin of ``act_fn`` when it computes one of torch's GELU, tanh-GELU, SiLU or ReLU
    exactly (told by its values on a probe, so the wrappers of every transformers version need no
    table), else None.

    Why: at inference on CPU a new activation buffer per learner block costs fresh pages from
    the OS (page faults) more often than not; in place, the matmul's output is reused.
    """
    if any(True for _ in act_fn.parameters()):
        return None
    probe = torch.linspace(-6.0, 6.0, 97)
    with torch.no_grad():
        expected = act_fn(probe.clone())
        return next((fn for fn in _INPLACE_ACTIVATIONS if torch.equal(fn(probe.clone()), expected)), None)


def _in_place_allowed() -> bool:
    return not torch.is_grad_enabled()  # autograd would need the overwritten values


def _activate(act_fn: nn.Module, in_place: Callable[[torch.Tensor], torch.Tensor] | None, h: torch.Tensor) -> torch.Tensor:
    """``act_fn(h)``, through its in-place twin (:func:`inplace_activation`) when there is one and autograd is off."""
    return in_place(h) if in_place is not None and _in_place_allowed() else act_fn(h)


def gate_labels(errors: torch.Tensor, factor: float) -> torch.Tensor:
    """The paper's gate labels from per-token prefix errors.

    Args:
        errors: (T, N + 1) error of the output with j = 0..N learners (e.g. per-token MSE).
        factor: a token's label is the smallest j for which one more learner stops reducing the
            error by ``factor``: ``errors[j] < factor * errors[j + 1]`` (or ``errors[j] == 0``);
            N when every learner helps.
    Returns:
        (T,) long labels in 0..N.
    """
    num_learners = errors.shape[-1] - 1
    stops = (errors[:, :-1] < factor * errors[:, 1:]) | (errors[:, :-1] == 0)
    first = torch.where(stops.any(-1), stops.float().argmax(-1), torch.full_like(stops[:, 0], num_learners, dtype=torch.long))
    return first.long()


def choose_learners(logits: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Per-token learner count from gate logits (T, N + 1).

    ``threshold=None``: argmax. Otherwise the smallest j whose cumulative probability
    P(choice <= j) reaches ``threshold``; a larger threshold never gives fewer learners
    (cumulative probabilities grow with j), and ``threshold >= 1`` runs all N.
    """
    num_learners = logits.shape[-1] - 1
    if threshold is None:
        return logits.argmax(-1)
    if threshold >= 1.0:
        return torch.full(logits.shape[:-1], num_learners, dtype=torch.long, device=logits.device)
    weights = (logits - logits.amax(-1, keepdim=True)).exp_()  # softmax numerators: compare before dividing
    cumulative = weights.cumsum(-1)
    return (cumulative[..., :num_learners] < threshold * cumulative[..., -1:]).sum(-1)


class ACMGate(nn.Module):
    """Small MLP (d -> g -> N + 1) giving per-token logits over the learner count."""

    def __init__(self, hidden_size: int, gate_hidden_size: int, num_learners: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.net = nn.Sequential(nn.Linear(hidden_size, gate_hidden_size, **kw), nn.GELU(), nn.Linear(gate_hidden_size, num_learners + 1, **kw))
        self._act_inplace = inplace_activation(self.net[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, act, last = self.net
        return last(_activate(act, self._act_inplace, first(x)))

    def flops_per_token(self) -> int:
        return sum(2 * m.in_features * m.out_features for m in self.net if isinstance(m, nn.Linear))


class ACMLayer(nn.Module):
    """Adaptive Computation Module replacing one dense FFN (input and output width ``hidden_size``).

    ``eval()``: the gate picks j per token (see :func:`choose_learners` and ``threshold``),
    and each token runs only its first j learners (:meth:`run_chosen`); the counts of
    choices accumulate in ``choice_counts`` (see :mod:`modular.acm.stats`).
    ``train()``: every prefix is computed and mixed by a straight-through Gumbel-softmax
    one-hot, so the task gradient reaches the gate; ``expected_compute`` (fraction of learners,
    a differentiable scalar) is kept for the budget penalty of phase 3.
    """

    def __init__(
        self,
        hidden_size: int,
        num_learners: int,
        learner_width: int,
        act_fn: nn.Module,
        *,
        gated: bool,
        bias_in: bool,
        bias_out: bool,
        gate_hidden_size: int,
        dense_intermediate_size: int,
        threshold: float | None = None,
        gumbel_tau: float = 1.0,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.hidden_size, self.num_learners, self.learner_width = hidden_size, num_learners, learner_width
        self.gated = gated
        self.dense_intermediate_size = dense_intermediate_size
        self.threshold = threshold
        self.gumbel_tau = gumbel_tau
        self.act_fn = act_fn
        self._act_inplace = inplace_activation(act_fn)
        kw = dict(dtype=dtype, device=device)
        units = num_learners * learner_width
        self.w_in = nn.Parameter(torch.empty(units, hidden_size, **kw))
        self.b_in = nn.Parameter(torch.zeros(units, **kw)) if bias_in else None
        self.w_up = nn.Parameter(torch.empty(units, hidden_size, **kw)) if gated else None
        self.b_up = nn.Parameter(torch.zeros(units, **kw)) if gated and bias_in else None
        self.w_out = nn.Parameter(torch.empty(units, hidden_size, **kw))
        self.b_out = nn.Parameter(torch.zeros(num_learners, hidden_size, **kw)) if bias_out else None
        self.gate = ACMGate(hidden_size, gate_hidden_size, num_learners, **kw)
        self.register_buffer("choice_counts", torch.zeros(num_learners + 1, dtype=torch.long, device=device), persistent=False)
        self.expected_compute: torch.Tensor | None = None
        self.reset_learners()

    def reset_learners(self) -> None:
        """Fresh learners: input projections get ``nn.Linear``'s default initialisation, the
        output projection starts at zero, so every prefix starts at the zero output (relative
        error 1) instead of at a random function far larger than a pretrained FFN's output."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for w in (self.w_in, self.w_up):
            if w is not None:
                nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.w_out)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_learners={self.num_learners}, learner_width={self.learner_width}, "
                f"gated={self.gated}, threshold={self.threshold}")

    # ------------------------------------------------------------------ compute accounting

    def learner_flops_per_token(self) -> int:
        """Multiply-adds x 2 of one learner on one token."""
        return 2 * self.hidden_size * self.learner_width * (3 if self.gated else 2)

    def dense_flops_per_token(self) -> int:
        """FLOPs of the dense FFN this module replaced, per token."""
        return 2 * self.hidden_size * self.dense_intermediate_size * (3 if self.gated else 2)

    # ------------------------------------------------------------------ learners

    def _hidden(self, x: torch.Tensor, units: slice) -> torch.Tensor:
        """Hidden activations of the learner units ``units`` (a slice of the fused rows) for tokens x."""
        b_in = None if self.b_in is None else self.b_in[units]
        h = _activate(self.act_fn, self._act_inplace, F.linear(x, self.w_in[units], b_in))
        if self.gated:
            up = F.linear(x, self.w_up[units], None if self.b_up is None else self.b_up[units])
            h = h.mul_(up) if _in_place_allowed() else h * up
        return h

    def prefix_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """All prefix sums at once: (T, d) -> (T, N + 1, d); entry j is the output with j learners."""
        n, w = self.num_learners, self.learner_width
        h = self._hidden(x, slice(0, n * w)).view(-1, n, w)
        parts = torch.einsum("tnw,nwd->tnd", h, self.w_out.view(n, w, self.hidden_size))
        if self.b_out is not None:
            parts = parts + self.b_out
        return torch.cat([parts.new_zeros(parts.shape[0], 1, parts.shape[2]), parts.cumsum(1)], dim=1)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.hidden_size)
        logits = self.gate(flat)
        out = self._mixed(flat, logits) if self.training else self.run_chosen(flat, choose_learners(logits, self.threshold))
        return out.view(shape)

    def _mixed(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        soft = F.gumbel_softmax(logits, tau=self.gumbel_tau, hard=False)
        hard = F.one_hot(soft.argmax(-1), self.num_learners + 1).to(soft.dtype)
        straight_through = hard + soft - soft.detach()
        steps = torch.arange(self.num_learners + 1, device=x.device, dtype=soft.dtype)
        self.expected_compute = (soft * steps).sum(-1).mean() / self.num_learners
        return torch.einsum("tj,tjd->td", straight_through, self.prefix_outputs(x))

    def run_chosen(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Run ``choice[t]`` learners for token t (T, d); j = 0 tokens cost nothing.

        Learner-major: the tokens are sorted by j, descending, so those that need learner i (the
        ones with j > i) are a prefix of the sorted rows. Each learner runs as one matmul per
        projection over its prefix and adds into the sorted output in place, which starts at each
        token's summed output biases; consecutive learners with equal prefixes run as one wider
        matmul. One gather of the tokens that run >= 1 learner, one scatter back into token order.
        Against one matmul per group of equal j, the matmuls are taller (a whole prefix, not one
        group of a few hundred tokens in a batch-sized call), which keeps them efficient.
        """
        counts = torch.bincount(choice, minlength=self.num_learners + 1)
        self.choice_counts += counts
        rows = counts.flip(0).cumsum(0).flip(0)[1:].tolist()  # rows[i]: tokens with j > i, i.e. that run learner i
        ordered, order = torch.sort(choice, descending=True, stable=True)
        ys = self._summed_output_biases(ordered, x)
        if rows[0] == 0:
            return ys
        xs = x.index_select(0, order[:rows[0]])
        for units, prefix in self._learner_blocks(rows):
            ys[:prefix].addmm_(self._hidden(xs[:prefix], units), self.w_out[units])
        return torch.empty_like(ys).index_copy_(0, order, ys)

    def _summed_output_biases(self, choice: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(T, d): for each token, the output biases of its first ``choice[t]`` learners, summed (zeros without biases)."""
        if self.b_out is None:
            return x.new_zeros(choice.shape[0], self.hidden_size)
        return torch.cat([self.b_out.new_zeros(1, self.hidden_size), self.b_out.cumsum(0)]).index_select(0, choice)

    def _learner_blocks(self, rows: list[int]):
        """(fused units, prefix rows) for each run of consecutive learners with the same non-empty prefix."""
        w, first = self.learner_width, 0
        for i in range(1, self.num_learners + 1):
            if i == self.num_learners or rows[i] != rows[first]:
                if rows[first] == 0:
                    return
                yield slice(first * w, i * w), rows[first]
                first = i

"""The ACM module: N learners whose prefix sums refine a dense FFN's output, and a per-token gate.

Learner i (0-based) owns hidden units ``[i*w, (i+1)*w)`` of fused weights, so "the first j
learners" is always one contiguous row slice ``[:j*w]``: a group of tokens that needs j learners
runs as one matmul per projection, whatever j is.

Shapes (T tokens, d model width, N learners of width w, k = j*w):

- plain FFN (BERT):   y_j = act(x @ w_in[:k].T + b_in[:k]) @ w_out[:k] + b_out[:j].sum(0)
- gated FFN (llama):  y_j = (act(x @ w_in[:k].T) * (x @ w_up[:k].T)) @ w_out[:k] (+ biases)

``w_in``/``w_up``: (N*w, d); ``w_out``: (N*w, d), stored transposed against ``nn.Linear`` so that
its first j learners are contiguous rows too; ``b_out``: (N, d), one output bias per learner.
y_0 = 0: the module sits on a residual connection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACMGate", "ACMLayer", "choose_learners", "gate_labels"]


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
    below = logits.softmax(-1).cumsum(-1)[..., :num_learners] < threshold
    return below.sum(-1)


class ACMGate(nn.Module):
    """Small MLP (d -> g -> N + 1) giving per-token logits over the learner count."""

    def __init__(self, hidden_size: int, gate_hidden_size: int, num_learners: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.net = nn.Sequential(nn.Linear(hidden_size, gate_hidden_size, **kw), nn.GELU(), nn.Linear(gate_hidden_size, num_learners + 1, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def flops_per_token(self) -> int:
        return sum(2 * m.in_features * m.out_features for m in self.net if isinstance(m, nn.Linear))


class ACMLayer(nn.Module):
    """Adaptive Computation Module replacing one dense FFN (input and output width ``hidden_size``).

    ``eval()``: the gate picks j per token (see :func:`choose_learners` and ``threshold``),
    tokens are grouped by j and each group runs only its first j learners; the counts of
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

    def _hidden(self, x: torch.Tensor, units: int) -> torch.Tensor:
        b_in = None if self.b_in is None else self.b_in[:units]
        h = self.act_fn(F.linear(x, self.w_in[:units], b_in))
        if self.gated:
            h = h * F.linear(x, self.w_up[:units], None if self.b_up is None else self.b_up[:units])
        return h

    def run_learners(self, x: torch.Tensor, j: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Output of the first ``j`` learners (j >= 1) for tokens x (T, d): one slice per projection.

        ``out``: optional (T, d) contiguous buffer the result is written into (no extra copy).
        """
        units = j * self.learner_width
        h = self._hidden(x, units)
        if self.b_out is None:
            return torch.mm(h, self.w_out[:units], out=out)
        return torch.addmm(self.b_out[:j].sum(0), h, self.w_out[:units], out=out)

    def prefix_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """All prefix sums at once: (T, d) -> (T, N + 1, d); entry j is the output with j learners."""
        n, w = self.num_learners, self.learner_width
        h = self._hidden(x, n * w).view(-1, n, w)
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
        """Run ``choice[t]`` learners for token t (T, d), grouped by choice; j = 0 tokens cost nothing.

        One sort, one gather of the tokens that run >= 1 learner, then per group j one matmul per
        projection whose result is written straight into its rows of a sorted output buffer (no
        concatenation, no zero fill beyond the j = 0 rows), and one scatter back into token order.
        """
        counts = torch.bincount(choice, minlength=self.num_learners + 1)
        self.choice_counts += counts
        sizes = counts.tolist()
        if sizes[0] == len(choice):
            return x.new_zeros(x.shape[0], self.hidden_size)
        order = torch.argsort(choice, stable=True)  # tokens by j; the first sizes[0] run nothing
        xs = x.index_select(0, order[sizes[0]:])
        ys = x.new_empty(x.shape[0], self.hidden_size)
        ys[:sizes[0]].zero_()
        start = sizes[0]
        for j, size in enumerate(sizes[1:], start=1):
            if size:
                rows = ys[start:start + size]
                group = xs[start - sizes[0]:start - sizes[0] + size]
                if torch.is_grad_enabled():  # out= does not support autograd: copy into the rows instead
                    rows.copy_(self.run_learners(group, j))
                else:
                    self.run_learners(group, j, out=rows)
                start += size
        return torch.empty_like(ys).index_copy_(0, order, ys)

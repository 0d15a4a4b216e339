"""An experts block in place of the dense FFN of any registered family (``docs/methods.md``,
"Experts blocks in dense FFNs").

transformers has MoE classes only for its MoE families; this block turns the dense FFN of any
family the registry describes (llama-style gated MLPs, GPT-2's MLP, BERT's split
``intermediate`` + ``output.dense``) into a router and fused experts. The experts are a
transformers experts module (``use_experts_implementation``): the same dispatch as the HF MoE
families, so ``"modular"`` / ``"megablocks"`` (``moe/experts.py``) and HF's ``"eager"`` run it, and
AdaMoE's null experts (``inject_adamoe``) work on it as on Mixtral: the registry sees the block
as an MoE block (it declares ``moe_paths``).

Two ways to make the experts (``FFNExpertsConfig.mode``):

* ``"split"`` (MoEfication, Zhang et al., 2022): the FFN's intermediate neurons are clustered
  into n equal groups by co-activation on calibration tokens (balanced k-means on their
  activation profiles); expert e is the FFN restricted to group e, so the n experts sum to the
  dense FFN. A picked expert's output counts with weight 1 (its value; the router probability
  only supplies the gradient, straight-through), so with all n picked the block *is* the dense
  FFN, and k of n picks cost k/n of its FLOPs. The router is fitted by ridge regression to each
  expert's output norm on the calibration tokens, so a token picks the experts whose output it
  would miss most. The dense output bias is added once, outside the experts.
* ``"upcycle"`` (sparse upcycling): every expert a copy of the FFN (plus optional noise), a fresh
  random router, the picked experts weighted by the renormalised router probabilities: with
  identical experts the block equals the dense FFN for any routing.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import use_experts_implementation

from modular.acm.calibration import cache_ffn_io, calibration_batches
from modular.acm.sites import FFNSite, find_ffn_sites, replace_ffn
from modular.injections import InjectionError, InjectionKind, register_injection
from modular.registry import architecture_of
from modular.surgery import record_injection

from . import experts as _experts  # noqa: F401  (registers the "modular"/"megablocks" experts implementations)
from .config import EXPERTS_IMPLEMENTATIONS

__all__ = ["FFNExpertsBlock", "FFNExpertsConfig", "FFNExpertsRouter", "ffn_experts_blocks", "inject_ffn_experts",
           "set_experts_implementation"]

KIND = "ffn_experts"
MODES = ("split", "upcycle")


@dataclass
class FFNExpertsConfig:
    """How dense FFNs become experts blocks (:func:`inject_ffn_experts`).

    Attributes:
        num_experts: n, experts per block.
        top_k: experts per token; ``None`` = all n (``"split"``: the dense FFN exactly).
        mode: ``"split"`` (slices of the FFN's neurons, needs calibration data) or ``"upcycle"``
            (copies).
        layers: indices of the layers whose dense FFN is converted; ``None`` = every layer.
        calibration_tokens: ``"split"``: at most this many calibration tokens (a seeded sample)
            profile the neurons for clustering; the router is fitted on all of them.
        cluster_iterations: balanced k-means iterations of ``"split"``.
        router_ridge: ``"split"``: ridge penalty of the router fit, relative to the mean
            squared input (scale-free).
        noise_std, router_init_std: ``"upcycle"``: Gaussian noise added to every expert copy, and
            the std of the random router (``None``: the config's ``initializer_range``, else 0.02).
        experts_implementation: the ``ExpertsInterface`` entry the blocks run (``"modular"``,
            ``"megablocks"`` or HF's ``"eager"``; all skip AdaMoE's null picks).
        seed: seeds clustering, token sampling, noise and the random router.
    """

    num_experts: int = 8
    top_k: int | None = 4
    mode: str = "split"
    layers: list[int] | None = None
    calibration_tokens: int = 4096
    cluster_iterations: int = 10
    router_ridge: float = 1e-2
    noise_std: float = 0.0
    router_init_std: float | None = None
    experts_implementation: str = "modular"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_experts", "calibration_tokens", "cluster_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FFNExpertsConfig.{name} must be an integer >= 1, got {value!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts):
            raise ValueError(f"FFNExpertsConfig.top_k must be None or an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if self.mode not in MODES:
            raise ValueError(f"FFNExpertsConfig.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"FFNExpertsConfig.experts_implementation must be one of {', '.join(EXPERTS_IMPLEMENTATIONS)}, "
                             f"got {self.experts_implementation!r}")
        for name in ("router_ridge", "noise_std"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"FFNExpertsConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.router_init_std is not None and not self.router_init_std > 0:
            raise ValueError(f"FFNExpertsConfig.router_init_std must be > 0 or None, got {self.router_init_std!r}")
        if self.layers is not None:
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                raise ValueError(f"FFNExpertsConfig.layers must hold layer indices >= 0, got {self.layers!r}")
            self.layers = list(self.layers)

    @property
    def experts_per_token(self) -> int:
        return self.num_experts if self.top_k is None else self.top_k


# --------------------------------------------------------------------------- modules


class FFNExperts(nn.Module):
    """n experts with fused weights in the HF layout: ``gate_up_proj`` (n, 2w, d) for gated FFNs or
    ``up_proj`` (n, w, d), ``down_proj`` (n, d, w), optional biases. The forward dispatches on
    ``config._experts_implementation`` (decorated subclasses below); this one is ``"eager"``."""

    def __init__(self, config, *, num_experts: int, hidden_size: int, width: int, act_fn: nn.Module, gated: bool,
                 bias: bool, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, width
        self.act_fn = act_fn
        up_rows = 2 * width if gated else width
        up = nn.Parameter(torch.zeros(num_experts, up_rows, hidden_size, **kw))
        setattr(self, "gate_up_proj" if gated else "up_proj", up)
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, width, **kw))
        if bias:
            setattr(self, "gate_up_proj_bias" if gated else "up_proj_bias", nn.Parameter(torch.zeros(num_experts, up_rows, **kw)))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size, **kw))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Eager reference: one loop step per expert; an index >= n (AdaMoE's null pick) is skipped."""
        up = self.gate_up_proj if self.has_gate else self.up_proj
        up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            if not len(token):
                continue
            h = F.linear(hidden_states[token], up[e], None if up_bias is None else up_bias[e])
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            y = F.linear(h, self.down_proj[e], self.down_proj_bias[e] if self.has_bias else None)
            out.index_add_(0, token, y * top_k_weights[token, slot, None].to(y.dtype))
        return out


@use_experts_implementation(has_gate=True, has_bias=False)
class GatedFFNExperts(FFNExperts):
    """Experts of llama-style gated FFNs."""


@use_experts_implementation(has_gate=True, has_bias=True)
class GatedBiasFFNExperts(FFNExperts):
    """Experts of gated FFNs with biases."""


@use_experts_implementation(has_gate=False, has_bias=False)
class PlainFFNExperts(FFNExperts):
    """Experts of act(x W_in) W_out FFNs."""


@use_experts_implementation(has_gate=False, has_bias=True)
class PlainBiasFFNExperts(FFNExperts):
    """Experts of BERT / GPT-2 FFNs."""


_EXPERTS_CLASSES = {(True, False): GatedFFNExperts, (True, True): GatedBiasFFNExperts,
                    (False, False): PlainFFNExperts, (False, True): PlainBiasFFNExperts}


class FFNExpertsRouter(nn.Module):
    """Linear router, softmax, top-k, renormalised over the picks: the contract of transformers'
    MoE routers (``forward`` -> logits (T, n), weights (T, k), indices (T, k)), so that
    ``inject_adamoe`` can put its null-expert router in its place."""

    norm_topk_prob = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=dtype, device=device))
        self.num_experts, self.hidden_dim, self.top_k = num_experts, hidden_size, top_k

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(x, self.weight)
        top, index = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(x.dtype), index


class FFNExpertsBlock(nn.Module):
    """Router + experts producing the whole FFN output; see the module docstring for the two modes."""

    moe_paths = ("router", "experts")  # where the registry finds them (modular.registry.ModelArchitecture.moe_paths)

    def __init__(self, router: nn.Module, experts: FFNExperts, *, mode: str, output_bias: torch.Tensor | None, gated: bool,
                 dense_intermediate_size: int):
        super().__init__()
        self.router, self.experts, self.mode, self.gated = router, experts, mode, gated
        self.output_bias = None if output_bias is None else nn.Parameter(output_bias)
        self.dense_intermediate_size = dense_intermediate_size

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.router(x)
        if self.mode == "split":  # value 1 per true pick (slices sum to the FFN), gradient of the router weight
            weights = (index < self.experts.num_experts).to(weights.dtype) + (weights - weights.detach())
        y = self.experts(x, index, weights)
        if self.output_bias is not None:
            y = y + self.output_bias
        return y.view(shape)

    # ------------------------------------------------------------------ compute accounting

    def dense_flops_per_token(self) -> int:
        """FLOPs of the dense FFN this block replaced, per token."""
        return 2 * self.experts.hidden_dim * self.dense_intermediate_size * (3 if self.gated else 2)

    def expert_flops_per_token(self) -> int:
        """FLOPs of one expert on one token."""
        return 2 * self.experts.hidden_dim * self.experts.intermediate_dim * (3 if self.gated else 2)

    def router_flops_per_token(self) -> int:
        """FLOPs of the router's logits (AdaMoE's null logits included)."""
        null = getattr(self.router, "null_weight", None)
        return 2 * self.experts.hidden_dim * (self.experts.num_experts + (0 if null is None else null.shape[0]))


def ffn_experts_blocks(model: nn.Module) -> list[tuple[str, FFNExpertsBlock]]:
    """(name, block) of every experts block in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FFNExpertsBlock)]


def set_experts_implementation(model: nn.Module, name: str) -> None:
    """Switch the experts implementation of ``model``: transformers' own switch for its MoE
    families, and the experts of injected blocks (they carry their own setting, since a dense
    family's config takes none)."""
    model.set_experts_implementation(name)
    for _, block in ffn_experts_blocks(model):
        block.experts.config._experts_implementation = name


# --------------------------------------------------------------------------- building


def _new_block(site: FFNSite, config: FFNExpertsConfig) -> FFNExpertsBlock:
    """An experts block shaped for ``site`` (weights zero; :func:`_fill_split` / :func:`_fill_upcycle` set them)."""
    n, size = config.num_experts, site.intermediate_size
    if config.mode == "split" and size % n:
        raise ValueError(f"FFNExpertsConfig.num_experts={n} does not divide the intermediate size {size} of {site.name} "
                         "(mode 'split' slices its neurons into equal experts); choose a divisor")
    width = size // n if config.mode == "split" else size
    gated, bias = site.w_up is not None, site.b_in is not None or site.b_out is not None
    kw = dict(dtype=site.w_in.dtype, device=site.w_in.device)
    settings = types.SimpleNamespace(_experts_implementation=config.experts_implementation)
    experts = _EXPERTS_CLASSES[gated, bias](settings, num_experts=n, hidden_size=site.w_in.shape[1], width=width,
                                            act_fn=site.act_fn, gated=gated, bias=bias, **kw)
    router = FFNExpertsRouter(site.w_in.shape[1], n, config.experts_per_token, **kw)
    output_bias = torch.zeros_like(site.b_out) if config.mode == "split" and site.b_out is not None else None
    return FFNExpertsBlock(router, experts, mode=config.mode, output_bias=output_bias, gated=gated, dense_intermediate_size=size)


def _zero_if_none(t: torch.Tensor | None, size: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(size, dtype=like.dtype, device=like.device) if t is None else t


@torch.no_grad()
def _set_experts(block: FFNExpertsBlock, site: FFNSite, groups: list[torch.Tensor]) -> None:
    """Expert e = the FFN restricted to the neurons ``groups[e]`` (all of them: a copy)."""
    experts = block.experts
    size = site.intermediate_size
    b_in = _zero_if_none(site.b_in, size, site.w_in)
    for e, rows in enumerate(groups):
        if experts.has_gate:
            experts.gate_up_proj[e].copy_(torch.cat([site.w_in[rows], site.w_up[rows]]))
        else:
            experts.up_proj[e].copy_(site.w_in[rows])
        experts.down_proj[e].copy_(site.w_out[rows].T)
        if experts.has_bias:
            up_bias = torch.cat([b_in[rows], _zero_if_none(site.b_up, size, site.w_in)[rows]]) if experts.has_gate else b_in[rows]
            (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias)[e].copy_(up_bias)


def balanced_clusters(profiles: torch.Tensor, n: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Balanced k-means: (N, F) rows -> (N,) cluster ids, each cluster holding N / n rows.

    Each iteration assigns rows greedily, closest (row, centroid) pair first, while the row is
    free and the cluster has room, then moves each centroid to its rows' mean.
    """
    count = profiles.shape[0]
    room = count // n
    centroids = profiles[torch.randperm(count, generator=generator)[:n]]
    assign = torch.empty(count, dtype=torch.long)
    for _ in range(iterations):
        order = torch.cdist(profiles, centroids).flatten().argsort().tolist()
        taken, size, left = [-1] * count, [0] * n, count
        for pair in order:
            row, cluster = divmod(pair, n)
            if taken[row] < 0 and size[cluster] < room:
                taken[row], size[cluster], left = cluster, size[cluster] + 1, left - 1
                if not left:
                    break
        assign = torch.tensor(taken)
        centroids = torch.stack([profiles[assign == c].mean(0) for c in range(n)])
    return assign


@torch.no_grad()
def _fill_split(block: FFNExpertsBlock, site: FFNSite, x: torch.Tensor, config: FFNExpertsConfig,
                generator: torch.Generator) -> dict:
    """Cluster the neurons on their calibration activations, then fit the router."""
    sample = x[torch.randperm(len(x), generator=generator)[: config.calibration_tokens]]
    profiles = F.normalize(site.hidden(sample.to(site.w_in.dtype)).abs().float().T, dim=1)  # (h, T): one row per neuron
    assign = balanced_clusters(profiles, config.num_experts, config.cluster_iterations, generator)
    groups = [torch.nonzero(assign == e).squeeze(-1) for e in range(config.num_experts)]
    _set_experts(block, site, groups)
    if block.output_bias is not None:
        block.output_bias.copy_(site.b_out)
    # target: the norm of each expert's output on every calibration token
    hidden = site.hidden(x.to(site.w_in.dtype)).float()
    w_out = site.w_out.float()
    target = torch.stack([(hidden[:, rows] @ w_out[rows]).norm(dim=-1) for rows in groups], dim=1)  # (T, n)
    xf = x.float()
    gram = xf.T @ xf
    ridge = config.router_ridge * gram.diagonal().mean() * torch.eye(gram.shape[0])
    block.router.weight.copy_(torch.linalg.solve(gram + ridge, xf.T @ target).T)
    picked = (xf @ block.router.weight.float().T).topk(block.router.top_k, dim=-1).indices
    kept = target.pow(2).gather(1, picked).sum(1) / target.pow(2).sum(1).clamp_min(1e-12)
    return {"module": site.name, "tokens": len(x), "expert_sizes": [len(g) for g in groups],
            "kept_output_norm_share": kept.mean().item()}


@torch.no_grad()
def _fill_upcycle(block: FFNExpertsBlock, site: FFNSite, model: nn.Module, config: FFNExpertsConfig,
                  generator: torch.Generator) -> dict:
    everything = torch.arange(site.intermediate_size, device=site.w_in.device)
    _set_experts(block, site, [everything] * config.num_experts)
    experts = block.experts
    if experts.has_bias:
        experts.down_proj_bias.copy_(_zero_if_none(site.b_out, site.w_in.shape[1], site.w_in).expand_as(experts.down_proj_bias))
    if config.noise_std:
        for p in experts.parameters():
            p.add_(config.noise_std * torch.randn(p.shape, generator=generator).to(p))
    std = config.router_init_std or getattr(model.config, "initializer_range", 0.02)
    block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=generator).to(block.router.weight) * std)
    return {"module": site.name}


def _sites(model: nn.Module, config: FFNExpertsConfig) -> list[FFNSite]:
    arch = architecture_of(model)  # unknown families: UnknownArchitectureError naming the registry
    if config.layers is None:
        return find_ffn_sites(model, what="inject_ffn_experts")
    bad = [i for i in config.layers if i >= arch.num_layers]
    if bad:
        raise InjectionError(f"FFNExpertsConfig.layers: {bad} are not layers of this {arch.num_layers}-layer model")
    pattern = "^(" + "|".join(re.escape(arch.layer_names[i]) for i in config.layers) + r")\."
    return find_ffn_sites(model, pattern, what="inject_ffn_experts")


def inject_ffn_experts(model: nn.Module, config: FFNExpertsConfig | dict | None = None,
                       calibration_data: Iterable | None = None) -> list[dict]:
    """Replace the dense FFNs of ``model`` (``config.layers``) by experts blocks, in place.

    ``calibration_data`` (mode ``"split"``, required): batches of model inputs (dicts with
    ``input_ids`` and optionally ``attention_mask``, whose zeros are left out), as for
    :func:`modular.acm.acmize`. Every FFN is profiled on the original model, then all blocks are
    swapped in. The injection is recorded in ``model.config`` so ``modular.load_model`` rebuilds
    it. Returns a log per block (``"split"``: expert sizes and the share of the FFN output's
    squared norm the router's top-k picks keep on the calibration tokens).
    """
    config = FFNExpertsConfig(**config) if isinstance(config, dict) else (config or FFNExpertsConfig())
    sites = _sites(model, config)
    batches = None
    if config.mode == "split":
        if calibration_data is None:
            raise ValueError("inject_ffn_experts: mode 'split' clusters the FFN's neurons on calibration data; "
                             "give calibration_data (batches of model inputs)")
        batches = calibration_batches(calibration_data)
    generator = torch.Generator().manual_seed(config.seed)
    was_training = model.training
    model.eval()
    blocks, logs = [], []
    for site in sites:
        block = _new_block(site, config)
        if config.mode == "split":
            x, _ = cache_ffn_io(model, site, batches)
            logs.append(_fill_split(block, site, x, config, generator))
        else:
            logs.append(_fill_upcycle(block, site, model, config, generator))
        blocks.append(block)
    targets = [t for site, block in zip(sites, blocks) for t in replace_ffn(model, site, block)]
    record_injection(model, KIND, asdict(config), targets)
    model.train(was_training)
    return logs


def rebuild(model: nn.Module, config: dict) -> None:
    """``modular.load_model`` hook: the same blocks, shaped from the freshly loaded FFNs (the loader
    then reads every block tensor from the checkpoint)."""
    config = FFNExpertsConfig(**config)
    sites = _sites(model, config)
    targets = [t for site in sites for t in replace_ffn(model, site, _new_block(site, config))]
    record_injection(model, KIND, asdict(config), targets)


def _apply(model: nn.Module, config: FFNExpertsConfig, calibration_data: list | None) -> nn.Module:
    inject_ffn_experts(model, config, calibration_data)
    return model


INJECTION = register_injection(InjectionKind(KIND, FFNExpertsConfig, _apply, rebuild, needs_calibration=True))

"""Merged parameters formed just in time, module by module, with gradients for the coefficients.

``JitMerge(model, deltas, row_of)`` makes ``model`` compute, inside ``with merger(lam):``,

    θ^n = θ_0^n + Σ_k lam[row_of[n], k] · τ_k^n

for every parameter n that has deltas, without ever holding a merged copy of the model:

* each module that owns merged parameters forms them right before its own forward (K fused
  multiply-adds over θ_0 and the K deltas), runs its unchanged forward with them swapped in,
  and drops them when it returns;
* autograd would keep a merged weight alive until backward (``F.linear`` saves it to compute the
  input gradient). A saved-tensor hook replaces every saved view of a merged parameter by a
  recipe and re-forms that parameter when backward asks for it, so only one module's merged
  weights exist at a time, in forward as in backward. Nothing else is recomputed (no second
  forward of the module, unlike activation checkpointing);
* the coefficient gradient of a merged tensor is ``dL/dlam_k = <dL/dθ^n, τ_k^n>``: K dot
  products with the weight gradient that backward computes anyway;
* ``nn.Embedding`` merges only the rows a batch looks up (the vocabulary is a large share of a
  small encoder), with the same coefficient gradient as the dense path;
* a parameter shared by several modules (tied embeddings and LM head) is merged in each.

Precision: a merged tensor is computed in float32 (float64 for float64 weights) and rounded once
to the parameter's dtype, as :func:`merging.merge` writes the final model; bf16 weights and bf16
deltas give the merge that the engine would write for the same coefficients.

Memory: θ_0 (the model's own parameters) + the K deltas, i.e. (1 + K)× one model with deltas in
the model's dtype, plus one module's merged parameters and the activations. The deltas are looked
up by name whenever they are needed and never kept by autograd, so a mapping that reads them
from their files on each lookup brings this down to about one model (AdaMerging's
``stream_task_vectors``). A step costs one
forward and one backward of the merged model plus, per merged tensor, 2K multiply-adds and K dot
products. The model is not modified outside the context (forwards are patched on entry and
restored on exit). ``torch.func.functional_call`` over θ_0 + Σ λ τ gives the same values and
gradients (tests/merging/test_jit_merge.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["JitMerge", "merged_tensor"]

_WIDE = (torch.float32, torch.float64)


class _Merge(torch.autograd.Function):
    """θ_0 + Σ_k lam[k] τ_k for one tensor; keeps only how to read the deltas (``fetch``), not them."""

    @staticmethod
    def forward(ctx, lam: torch.Tensor, base: torch.Tensor, fetch: Callable[[], Sequence[torch.Tensor]]) -> torch.Tensor:
        ctx.fetch = fetch
        return merged_tensor(lam.detach(), base, fetch())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _coefficient_grad(grad, ctx.fetch()), None, None


class _MergeRows(torch.autograd.Function):
    """Rows ``index`` of θ_0 + Σ_k lam[k] τ_k (an embedding table), without forming the rest."""

    @staticmethod
    def forward(ctx, lam: torch.Tensor, base: torch.Tensor, index: torch.Tensor,
                fetch: Callable[[], Sequence[torch.Tensor]]) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.fetch = fetch
        return merged_tensor(lam.detach(), base[index], [t[index] for t in fetch()])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return _coefficient_grad(grad, [t[index] for t in ctx.fetch()]), None, None, None


def merged_tensor(lam: torch.Tensor, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """θ_0 + Σ_k lam[k] τ_k, accumulated in float32 (or float64) and rounded once to ``base``'s dtype."""
    wide = base.dtype if base.dtype in _WIDE else torch.float32
    out = base.to(wide, copy=True)
    lam = lam.to(device=base.device, dtype=wide)
    for k, tau in enumerate(taus):
        out.addcmul_(tau, lam[k])  # in place, no temporary; lam[k] stays on the device (no host sync)
    return out if out.dtype == base.dtype else out.to(base.dtype)


def _coefficient_grad(grad: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
    flat = grad.reshape(-1)
    if flat.dtype not in _WIDE:
        flat = flat.float()
    return torch.stack([torch.dot(flat, t.reshape(-1).to(flat.dtype)) for t in taus])


class JitMerge:
    """Just-in-time merged forward of ``model`` (θ_0) with coefficients given per call.

    Args:
        model: the base model; its parameters are θ_0 (left untouched).
        deltas: parameter name (as ``named_parameters`` gives it) -> the K task-vector tensors
            of that parameter (its shape, on its device; a task that leaves it alone may give a
            zero tensor). Held by reference and looked up each time a merged tensor is formed or
            differentiated, so a mapping that reads its values from files on each lookup streams
            the deltas instead of holding them.
        row_of: parameter name -> row of the coefficient matrix that scales its deltas
            (all 0 for one coefficient per task; one row per tensor for layer-wise).

    Use: ``with merger(lam): out = model(**batch)`` with ``lam`` of shape (rows, K), usually
    requiring grad; ``out`` is what the merged model returns and backward fills ``lam.grad``.
    """

    def __init__(self, model: nn.Module, deltas: Mapping[str, Sequence[torch.Tensor]], row_of: Mapping[str, int]):
        self.model = model
        params = dict(model.named_parameters())
        missing = [n for n in deltas if n not in params]
        if missing:
            raise KeyError(f"JitMerge: deltas for names that are not parameters of the model: {missing[:5]}")
        unrowed = [n for n in deltas if n not in row_of]
        if unrowed:
            raise KeyError(f"JitMerge: no coefficient row for {unrowed[:5]}")
        self.deltas = deltas
        self.row_of = dict(row_of)
        first = next(iter(deltas), None)
        self.num_tasks = len(deltas[first]) if first is not None else 0  # the others are checked as they are read
        name_of = {id(p): n for n, p in params.items()}  # a tied parameter has one name
        # module -> [(its parameter attribute, the parameter's name)] for the merged parameters it owns
        self.owners: dict[nn.Module, list[tuple[str, str]]] = {}
        for module in model.modules():
            own = [(attr, name_of.get(id(p))) for attr, p in module._parameters.items() if p is not None]
            own = [(attr, name) for attr, name in own if name in self.deltas]
            if own:
                self.owners[module] = own
        self._lam: torch.Tensor | None = None
        self._live: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}  # storage ptr -> (name, tensor, lam row)

    @contextmanager
    def __call__(self, lam: torch.Tensor):
        if lam.dim() != 2 or lam.shape[1] != self.num_tasks:
            raise ValueError(f"JitMerge: coefficients of shape (rows, {self.num_tasks}) expected, got {tuple(lam.shape)}")
        patched = {module: module.__dict__.get("forward") for module in self.owners}
        self._lam = lam
        try:
            for module in self.owners:
                module.forward = self._forward_of(module, module.forward)  # an instance's own forward, if any, is kept
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            self._lam = None
            self._live.clear()
            for module, previous in patched.items():
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    # -- forward ------------------------------------------------------------------------------
    def _forward_of(self, module: nn.Module, original):
        own = self.owners[module]

        def forward(*args, **kwargs):
            lam = self._lam
            if isinstance(module, nn.Embedding) and _rows_suffice(module) and len(args) == 1 and not kwargs:
                return self._embedding(module, own[0][1], lam, args[0])
            merged = {}
            for attr, name in own:
                row = lam[self.row_of[name]]
                tensor = _Merge.apply(row, module._parameters[attr].detach(), functools.partial(self._fetch, name))
                merged[attr] = tensor
                self._live[tensor.untyped_storage().data_ptr()] = (name, tensor, row.detach())
            saved = {attr: module._parameters[attr] for attr in merged}
            try:
                module._parameters.update(merged)
                return original(*args, **kwargs)
            finally:
                module._parameters.update(saved)
                for tensor in merged.values():
                    self._live.pop(tensor.untyped_storage().data_ptr(), None)

        return forward

    def _embedding(self, module: nn.Embedding, name: str, lam: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = _MergeRows.apply(lam[self.row_of[name]], module.weight.detach(), unique, functools.partial(self._fetch, name))
        padding = None
        if module.padding_idx is not None:
            where = (unique == module.padding_idx).nonzero()
            padding = int(where[0, 0]) if len(where) else None
        return nn.functional.embedding(inverse, rows, padding, None, module.norm_type, module.scale_grad_by_freq, False)

    # -- saved tensors ------------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor):
        live = self._live.get(tensor.untyped_storage().data_ptr()) if self._live else None
        if live is None:
            return tensor
        name, merged, row = live
        if tensor.dtype != merged.dtype or tensor.device != merged.device:
            return tensor
        return ("jit-merged", name, row, tensor.size(), tensor.stride(), tensor.storage_offset())

    def _unpack(self, packed):
        if not (isinstance(packed, tuple) and packed and packed[0] == "jit-merged"):
            return packed
        _, name, row, size, stride, offset = packed
        with torch.no_grad():
            merged = merged_tensor(row, self._parameter(name).detach(), self._fetch(name))
        return merged.as_strided(size, stride, offset)

    def _fetch(self, name: str) -> Sequence[torch.Tensor]:
        taus = self.deltas[name]
        if len(taus) != self.num_tasks:
            raise ValueError(f"JitMerge: every parameter needs the same number of deltas; {name!r} has {len(taus)}, "
                             f"expected {self.num_tasks}")
        return taus

    def _parameter(self, name: str) -> torch.Tensor:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name) if module_name else self.model
        return module._parameters[attr]


def _rows_suffice(module: nn.Embedding) -> bool:
    """Whether the embedding's forward reads only the looked-up rows (no renormalisation, dense grads)."""
    return module.max_norm is None and not module.sparse and list(module._parameters) == ["weight"]

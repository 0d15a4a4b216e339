"""The architecture registry: where each HF model family keeps its layers, FFNs, MoE blocks,
embeddings and head.

Every part of modular-llm asks this module, never a hard-coded ``model.model.layers``.
Paths are dotted attribute paths. ``layers`` starts at ``model.base_model`` (HF's own notion
of the backbone, so the same spec serves ``LlamaModel`` and ``LlamaForCausalLM``); the other
paths start at one layer (block). Embeddings and the output head come from HF's
``get_input_embeddings`` / ``get_output_embeddings``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = [
    "ArchitectureSpec",
    "ModelArchitecture",
    "UnknownArchitectureError",
    "architecture_of",
    "get_architecture_spec",
    "register_architecture",
    "registered_architectures",
]


class UnknownArchitectureError(KeyError):
    """Raised for a ``model_type`` that the registry does not describe."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the parts of one model family live.

    Attributes:
        layers: path from ``model.base_model`` to the ``nn.ModuleList`` of decoder/encoder blocks.
        mlp: path inside a block to its feed-forward module: a dense MLP, or an MoE block for
            MoE families (some families mix both; a block counts as MoE when it has ``router``,
            or when it is an injected experts block declaring ``moe_paths``).
        mlp_output: for FFNs split over two modules (BERT: ``intermediate`` then
            ``output.dense``), the path inside a block to the second one; ``None`` otherwise.
        router: path inside an MoE block to its router (``None`` for dense families).
        experts: path inside an MoE block to its fused experts module.
        shared_expert: path inside an MoE block to an always-on shared expert, if any.
        moe_model_type: for dense families, the HF MoE family whose blocks their MLPs
            upcycle into (same attention and MLP layout).
        is_encoder: bidirectional encoder (no causal LM head by default).
    """

    layers: str
    mlp: str = "mlp"
    mlp_output: str | None = None
    router: str | None = None
    experts: str | None = None
    shared_expert: str | None = None
    moe_model_type: str | None = None
    is_encoder: bool = False

    def __post_init__(self) -> None:
        if (self.router is None) != (self.experts is None):
            raise ValueError("ArchitectureSpec: give both `router` and `experts` for MoE families, or neither")

    @property
    def has_moe(self) -> bool:
        return self.router is not None


_LLAMA_LIKE = dict(layers="layers", mlp="mlp")
_MOE = dict(layers="layers", mlp="mlp", router="gate", experts="experts")

_REGISTRY: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec(**_LLAMA_LIKE, moe_model_type="mixtral"),
    "mistral": ArchitectureSpec(**_LLAMA_LIKE, moe_model_type="mixtral"),
    "qwen2": ArchitectureSpec(**_LLAMA_LIKE, moe_model_type="qwen2_moe"),
    "qwen3": ArchitectureSpec(**_LLAMA_LIKE, moe_model_type="qwen3_moe"),
    "gemma2": ArchitectureSpec(**_LLAMA_LIKE),
    "gemma3_text": ArchitectureSpec(**_LLAMA_LIKE),
    "gpt2": ArchitectureSpec(layers="h", mlp="mlp"),
    "bert": ArchitectureSpec(layers="encoder.layer", mlp="intermediate", mlp_output="output.dense", is_encoder=True),
    "mixtral": ArchitectureSpec(**_MOE),
    "qwen2_moe": ArchitectureSpec(**_MOE, shared_expert="shared_expert"),
    "qwen3_moe": ArchitectureSpec(**_MOE),
    "olmoe": ArchitectureSpec(**_MOE),
}


def register_architecture(model_type: str, spec: ArchitectureSpec, *, overwrite: bool = False) -> None:
    """Describe a model family so that every part of modular-llm can work on it.

    Example::

        register_architecture("my_llama", ArchitectureSpec(layers="blocks", mlp="ffn"))
    """
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"register_architecture: spec must be an ArchitectureSpec, got {type(spec).__name__}")
    if model_type in _REGISTRY and not overwrite and _REGISTRY[model_type] != spec:
        raise ValueError(
            f"register_architecture: model_type {model_type!r} is already registered; pass overwrite=True to replace it"
        )
    _REGISTRY[model_type] = spec


def registered_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_architecture_spec(model_type: str) -> ArchitectureSpec:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnknownArchitectureError(
            f"model_type {model_type!r} is not in the modular-llm architecture registry "
            f"(known: {', '.join(registered_architectures())}). Describe it with "
            f"modular.register_architecture({model_type!r}, ArchitectureSpec(layers=..., mlp=...))."
        ) from None


def _resolve(root: nn.Module, path: str, what: str) -> nn.Module:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise AttributeError(
                f"architecture spec path {path!r} ({what}) not found in {type(root).__name__}: "
                f"{type(module).__name__} has no attribute {part!r}"
            )
        module = getattr(module, part)
    return module


class ModelArchitecture:
    """A model seen through its registry entry: layers, FFNs, MoE blocks, embeddings, head.

    Module names returned are qualified names in ``model.named_modules()``.
    """

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        if config is None or not getattr(config, "model_type", None):
            raise TypeError(f"expected a Hugging Face PreTrainedModel with a config, got {type(model).__name__}")
        self.model = model
        self.model_type: str = config.model_type
        self.spec = get_architecture_spec(self.model_type)
        self.layers: nn.ModuleList = _resolve(model.base_model, self.spec.layers, "layers")
        if not isinstance(self.layers, nn.ModuleList):
            raise TypeError(f"{self.model_type}: `layers` path {self.spec.layers!r} is not an nn.ModuleList")
        base_prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
        self.layers_prefix = f"{base_prefix}{self.spec.layers}"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [f"{self.layers_prefix}.{i}" for i in range(self.num_layers)]

    def _in_layers(self, path: str, what: str) -> list[tuple[str, nn.Module]]:
        return [(f"{name}.{path}", _resolve(layer, path, what)) for name, layer in zip(self.layer_names, self.layers)]

    def moe_paths(self, block: nn.Module) -> tuple[str, str] | None:
        """(router, experts) paths inside an MoE block: those an injected experts block declares
        (its ``moe_paths`` attribute, e.g. ``moe.ffn_experts`` in a dense family), else the
        family's; ``None`` when ``block`` is a dense FFN."""
        declared = getattr(block, "moe_paths", None)
        if declared is not None:
            return declared
        paths = (self.spec.router, self.spec.experts)
        return paths if self.spec.has_moe and all(hasattr(block, p.split(".")[0]) for p in paths) else None

    def is_moe_block(self, module: nn.Module) -> bool:
        return self.moe_paths(module) is not None

    def feed_forwards(self) -> list[tuple[str, nn.Module]]:
        """Each block's feed-forward module (dense MLP or MoE block), in layer order."""
        return self._in_layers(self.spec.mlp, "mlp")

    def mlps(self) -> list[tuple[str, nn.Module]]:
        """Dense feed-forward modules (MoE blocks excluded)."""
        return [(n, m) for n, m in self.feed_forwards() if not self.is_moe_block(m)]

    def mlp_outputs(self) -> list[tuple[str, nn.Module]]:
        """For split FFNs (``spec.mlp_output``), the second module of each dense FFN, aligned with ``mlps()``."""
        if self.spec.mlp_output is None:
            return []
        outputs = self._in_layers(self.spec.mlp_output, "mlp_output")
        return [out for out, (_, ffn) in zip(outputs, self.feed_forwards()) if not self.is_moe_block(ffn)]

    def moe_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.feed_forwards() if self.is_moe_block(m)]

    def routers(self) -> list[tuple[str, nn.Module]]:
        return [self._in_block(n, m, 0, "router") for n, m in self.moe_blocks()]

    def experts(self) -> list[tuple[str, nn.Module]]:
        return [self._in_block(n, m, 1, "experts") for n, m in self.moe_blocks()]

    def _in_block(self, name: str, block: nn.Module, which: int, what: str) -> tuple[str, nn.Module]:
        path = self.moe_paths(block)[which]
        return f"{name}.{path}", _resolve(block, path, what)

    @property
    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def output_head(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    @property
    def embeddings_tied(self) -> bool:
        head = self.output_head
        return head is not None and head.weight is self.input_embeddings.weight

    def parameter_roles(self) -> dict[str, str]:
        """Role of every parameter: ``"embeddings"``, ``"head"``, ``"layers.<i>"`` or ``"other"``.

        ``"embeddings"`` covers every embedding table of the backbone (token, position, type);
        ``"other"`` is what sits outside the blocks (final norms, poolers). Tied head weights
        appear once, under ``"embeddings"``. Raises if a parameter cannot be placed, so that
        callers never silently skip weights.
        """
        roles: dict[str, str] = {}
        head = self.output_head
        owners = [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]
        owners += [("embeddings", m) for m in self.model.base_model.modules() if isinstance(m, nn.Embedding)]
        owners.append(("embeddings", self.input_embeddings))
        if head is not None:
            owners.append(("head", head))
        param_role = {}
        for role, module in owners:
            for p in module.parameters():
                param_role.setdefault(id(p), role)
        for name, p in self.model.named_parameters():
            roles[name] = param_role.get(id(p), "other")
        return roles


def architecture_of(model: nn.Module) -> ModelArchitecture:
    """The registry's view of ``model``; raises :class:`UnknownArchitectureError` for unknown families."""
    return ModelArchitecture(model)

"""A minimal injection kind for testing surgery, loading and merging (test-only: importing this
module registers the ``test_gain`` kind, so user processes never see it)."""

from dataclasses import dataclass

import torch

from modular.injections import InjectionKind, register_injection
from modular.surgery import find_modules, record_injection, replace_module

GAIN_KIND = "test_gain"


class Gain(torch.nn.Module):
    """Test injection: scales a module's input by a learned per-channel ``gain`` (identity at init).

    The input, not the output, so that it wraps any role: routers return tuples.
    """

    def __init__(self, base_layer: torch.nn.Module, width: int):
        super().__init__()
        self.base_layer = base_layer
        self.gain = torch.nn.Parameter(torch.ones(width))

    def forward(self, x, *args, **kwargs):
        return self.base_layer(x * self.gain, *args, **kwargs)


def inject_gain(model: torch.nn.Module, config: dict) -> list[str]:
    """Wrap the modules selected by ``config["role"]`` (and ``config.get("pattern")``) in :class:`Gain`."""
    targets = [name for name, _ in find_modules(model, role=config["role"], pattern=config.get("pattern"))]
    for name in targets:
        replace_module(model, name, Gain(model.get_submodule(name), model.config.hidden_size))
    record_injection(model, GAIN_KIND, config, targets)
    return targets


@dataclass
class GainConfig:
    role: str = "mlp"
    pattern: str | None = None


def _apply(model: torch.nn.Module, config: GainConfig, calibration_data) -> torch.nn.Module:
    inject_gain(model, {"role": config.role, "pattern": config.pattern})
    return model


# Registered on import, so load_model rebuilds it in any process that imports this module.
INJECTION = register_injection(InjectionKind(GAIN_KIND, GainConfig, _apply, inject_gain))

"""Suite-wide setup: offline hubs, a network guard (here and in child processes), tiny models."""

import os
import sys
from pathlib import Path

NETGUARD = Path(__file__).parent / "netguard"
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(NETGUARD), os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, str(NETGUARD))
import pytest  # noqa: E402
import sitecustomize  # noqa: E402,F401  (installs the guard in this process)
import torch  # noqa: E402

from modular.registry import registered_architectures  # noqa: E402
from modular.testing import tiny_model  # noqa: E402

BUILTIN_ARCHITECTURES = registered_architectures()
MOE_ARCHITECTURES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny():
    """Factory: ``tiny("llama")`` -> a fresh tiny model in eval mode."""
    return tiny_model


@pytest.fixture
def input_ids():
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

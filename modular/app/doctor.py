"""``modular doctor``: what this machine offers modular-llm (versions, devices, backends)."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import PackageNotFoundError, entry_points, version

__all__ = ["environment_report"]

PACKAGES = ("modular-llm", "torch", "transformers", "peft", "deepspeed", "megablocks", "datasets", "safetensors", "accelerate")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _experts_implementations() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    # Parts declare theirs in the modular.experts_implementations entry-point group; loading an
    # entry imports its module, which registers it with transformers' ExpertsInterface.
    for ep in entry_points(group="modular.experts_implementations"):
        try:
            ep.load()
        except ImportError:
            pass
    return ["eager", *ALL_EXPERTS_FUNCTIONS.valid_keys()]


def environment_report() -> dict:
    import torch
    import torch.distributed as dist

    return {
        "versions": {p: _version(p) for p in PACKAGES},
        "python_torch_threads": torch.get_num_threads(),
        "cuda": {
            "available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "distributed_backends": {
            "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": dist.is_available() and dist.is_nccl_available(),
            "mpi": dist.is_available() and dist.is_mpi_available(),
        },
        "experts_implementations": _experts_implementations(),
    }


def _print_report(report: dict) -> None:
    print("modular-llm environment")
    print("  versions:")
    for name, ver in report["versions"].items():
        print(f"    {name:<13} {ver or 'not installed'}")
    cuda = report["cuda"]
    print(f"  CUDA: {'yes: ' + ', '.join(cuda['devices']) if cuda['available'] else 'not available (CPU only)'}")
    backends = [b for b, ok in report["distributed_backends"].items() if ok]
    print(f"  torch.distributed backends: {', '.join(backends) or 'none'}")
    print(f"  experts implementations: {', '.join(report['experts_implementations'])}")
    if report["versions"]["megablocks"] is None:
        print("  note: megablocks is a GPU-only extra (pip install 'modular-llm[megablocks]' on a CUDA machine)")


def run(args: argparse.Namespace) -> int:
    report = environment_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0

"""``modular demo``: the end-to-end pipeline on an embedded default (inject → LISA fine-tune → merge).

The pipeline lands with its own issue; until then the command says so and exits 0.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def _run(args: argparse.Namespace) -> int:
    print("modular demo: the end-to-end pipeline (AdaMoE → LISA + 1-bit Adam → AdaMerging) is coming with the pipeline.")
    print("Meanwhile: `modular doctor` shows what this machine offers, and `make test` runs the test suite.")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the end-to-end demo on an embedded default")
    parser.set_defaults(func=_run)

"""The ``modular`` command. Each part registers its own subcommands through the
``modular.commands`` entry-point group (``name = package.module:add_parser``), where
``add_parser(subparsers)`` adds one subparser and sets ``func(args) -> int``."""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modular",
        description="modular-llm: inject adaptive computation into HF models, fine-tune with LISA + 1-bit Adam, merge with AdaMerging.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="modular.commands"), key=lambda e: e.name):
        ep.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        # Bad input: one clear line, no traceback. Set MODULAR_DEBUG=1 for the traceback.
        if os.environ.get("MODULAR_DEBUG"):
            raise
        print(f"modular {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``anydoor`` command line: ``generate``, ``weights convert|download``, ``serve``.

Each subcommand lives next to the code it drives; this module only assembles the parser. A module that adds a
subcommand exposes ``register(subparsers)`` and sets ``func`` on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules contributing subcommands, in the order they appear in --help.
_COMMAND_MODULES = ("model.generate_cli", "model.weights_cli", "service.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anydoor",
        description="AnyDoor Serve: zero-shot object insertion (generate, convert/download weights, serve HTTP).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

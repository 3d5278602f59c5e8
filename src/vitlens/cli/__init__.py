"""The ``vitlens`` command: a thin layer over library functions.

Each sub-command lives in its own module exposing ``register(subparsers)``; the module adds
its parser and sets ``func`` to a function taking the parsed ``args``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# One module per command group, in the order ``vitlens --help`` lists them.
COMMAND_MODULES = ["models", "train", "study", "report", "analyze", "text", "tokenizer"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="vitlens", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vitlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        # Bad input: one clear line, not a traceback (set VITLENS_DEBUG=1 for the traceback).
        import os

        if os.environ.get("VITLENS_DEBUG"):
            raise
        print(f"vitlens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``vitlens`` command: a thin layer over library functions.

Each sub-command lives in its own module exposing ``register(subparsers)``; the module adds
its parser and sets ``func`` to a function taking the parsed ``args``.

Errors: a :class:`~vitlens.errors.VitlensError` (bad input) or the OS error of a bad path
becomes one line, ``vitlens CMD: error: ...``, and exit code 2, as do argparse's own usage
errors. Anything else is a bug in vitlens and keeps its traceback (``VITLENS_DEBUG=1`` shows
the traceback of user errors too).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from ..errors import ConfigError, VitlensError

# One module per command group, in the order ``vitlens --help`` lists them.
COMMAND_MODULES = ["models", "train", "study", "report", "analyze", "text", "tokenizer"]

# The OS errors that mean "this path is wrong", not "vitlens is broken".
PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (the problem and where to read the flags)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = ArgumentParser(prog="vitlens", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vitlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..train.precision import keep_freed_memory

    keep_freed_memory()  # every command reallocates tensors of the same sizes (see its docstring)
    try:
        return int(args.func(args) or 0)
    except (VitlensError, *PATH_ERRORS) as e:
        if os.environ.get("VITLENS_DEBUG"):
            raise
        verb = getattr(args, "verb", None) or " ".join(
            filter(None, [args.command, getattr(args, "lm_command", None)])
        )
        print(f"vitlens {verb}: error: {one_line(e)}", file=sys.stderr)
        return 2


def add_run_arguments(
    p: argparse.ArgumentParser, cls, helps=None, *, choices=None, resume: bool = True
) -> None:
    """``--config``, ``--resume``, ``--override`` and one flag per field of the config class ``cls``."""
    from ..config import add_arguments

    p.add_argument("--config", metavar="FILE", help=f"YAML/JSON {cls.__name__} file; flags override it")
    if resume:
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --out from its last checkpoint; the run's config.json is the truth "
            "(flags that would change the run are refused)",
        )
        p.add_argument(
            "--override",
            action="append",
            metavar="KEY=VALUE",
            help="with --resume: change the run's length or evaluation on purpose (e.g. epochs=20); "
            "recorded in config.json",
        )
    add_arguments(p, cls, helps, choices=choices)


def run_config(cls, args) -> tuple[object, dict]:
    """``(config, overrides)`` of this invocation.

    A new run: the ``--config`` file, then the flags. ``--resume``: the run folder's config.json,
    with the given flags and file checked against it (vitlens.train.resume_config), and the
    ``--override KEY=VALUE`` changes the harness applies and records.
    """
    from ..config import config_from_args, given_values
    from ..train import parse_overrides, resume_config

    overrides = parse_overrides(getattr(args, "override", None))
    if not getattr(args, "resume", False):
        if overrides:
            raise ConfigError(
                "--override changes a run being resumed (--resume); for a new run use the flags"
            )
        return config_from_args(cls, args), {}
    given = given_values(cls, args)
    out = given.get("out", cls().out)
    return resume_config(cls, out, given), overrides


def run_training(cls, train_fn, args, show=lambda summary: summary) -> int:
    """The body of every training verb: config (new or resumed), train, print the summary."""
    cfg, overrides = run_config(cls, args)
    summary = train_fn(cfg, resume=args.resume, overrides=overrides)
    print(json.dumps(show(summary), indent=2))
    return 0


def one_line(error: BaseException) -> str:
    """The message on one line; an OS error without one says what failed on which path."""
    if isinstance(error, OSError) and not isinstance(error, VitlensError) and error.filename is not None:
        what = error.strerror or type(error).__name__
        text = f"{error.filename}: {what}"
        if error.filename2 is not None:
            text += f" ({error.filename2})"
    else:
        text = str(error) or type(error).__name__
    if isinstance(error, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]  # str(KeyError('x')) quotes its message
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())

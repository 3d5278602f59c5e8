"""``vitlens models [PATTERN]``: list registered architectures with their parameter counts."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'vit_*'")
    p.add_argument("--params", action="store_true", help="also build each model and count its parameters")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import create_model, list_models

    names = list_models(args.pattern)
    if not names:
        from ..errors import ModelError

        raise ModelError(
            f"no registered model matches {args.pattern!r}; `vitlens models` lists them all "
            "(patterns are shell-style: 'vit_*', '*resnet*')"
        )
    for name in names:
        if args.params:
            n = sum(p.numel() for p in create_model(name).parameters())
            print(f"{name:28s} {n / 1e6:8.2f}M")
        else:
            print(name)
    return 0

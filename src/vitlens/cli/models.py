"""``vitlens models [PATTERN]``: list registered architectures with their parameter counts."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'vit_*'")
    p.add_argument("--params", action="store_true", help="also build each model and count its parameters")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import create_model, list_models

    for name in list_models(args.pattern):
        if args.params:
            n = sum(p.numel() for p in create_model(name).parameters())
            print(f"{name:28s} {n / 1e6:8.2f}M")
        else:
            print(name)
    return 0

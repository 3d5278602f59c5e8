"""``vitlens study``: the whole ViT-vs-CNN study in one command."""

from __future__ import annotations


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def register(sub) -> None:
    p = sub.add_parser(
        "study",
        help="train ViTs and a ResNet on nested data fractions, analyse them, write report.html",
        description="Runs (or resumes) the sweep of a preset or config file, then the analyses "
        "and the report. "
        "A killed study restarts where it stopped.",
    )
    p.add_argument(
        "--preset", default=None, help="default (embedded data, ~10 min on 2 CPU cores) | cpu | full"
    )
    p.add_argument("--config", default=None, help="YAML study config (see vitlens/configs/study_*.yaml)")
    p.add_argument("--data", default=None, help="dataset name (default: the preset's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="study directory (default: the preset's)")
    p.add_argument("--fractions", type=_floats, default=None, help="comma-separated, e.g. 0.02,0.05,0.1,0.25")
    p.add_argument("--seeds", type=_ints, default=None, help="comma-separated, e.g. 0,1")
    p.add_argument("--epochs", type=int, default=None, help="override the shared recipe's epochs")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu | cuda | auto")
    p.add_argument("--tokenizers", default=None, help="also compare ViT tokenizers, e.g. patch,pixel,hybrid")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..study.config import StudyConfig
    from ..study.run import run_study

    train = {
        k: v
        for k, v in {"epochs": args.epochs, "batch_size": args.batch_size, "device": args.device}.items()
        if v is not None
    }
    cfg = StudyConfig.load(
        args.config,
        args.preset,
        data=args.data,
        data_dir=args.data_dir,
        out=args.out,
        fractions=args.fractions,
        seeds=args.seeds,
        train=train or None,
        tokenizers=args.tokenizers.split(",") if args.tokenizers else None,
    )
    report = run_study(cfg)
    print(f"report written to {report}")
    return 0

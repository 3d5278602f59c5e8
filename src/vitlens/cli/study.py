"""``vitlens study``: the whole ViT-vs-CNN study in one command."""

from __future__ import annotations


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


# Flags that override a study config field, and those that override its shared training recipe.
STUDY_FLAGS = ("data", "data_dir", "out", "fractions", "seeds", "tokenizers")
RECIPE_FLAGS = ("epochs", "batch_size", "device")


def register(sub) -> None:
    p = sub.add_parser(
        "study",
        help="train ViTs and a ResNet on nested data fractions, analyse them, write report.html",
        description="Runs (or resumes) the sweep of a preset or config file, then the analyses "
        "and the report. A killed study restarts where it stopped. Under "
        "`torchrun --nproc_per_node=N -m vitlens study ...` training is data-parallel and each "
        "analysis splits its batches across the processes.",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="default (embedded data: ~80 s on the idle 2-core CPU machine) | cpu (real CIFAR-10: "
        "~60 min of training) | full (GPU) | pretrained (no training: the hubs' ViT-B/16 21k and 1k, "
        "a GAP ViT and ResNet-50 on --data-dir IMAGES, e.g. ImageNet's val set)",
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
    p.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="pretrained preset: images drawn from --data-dir (default 1000); top-1 and CKA use all",
    )
    p.add_argument(
        "--tokenizers", type=_names, default=None, help="also compare ViT tokenizers, e.g. patch,pixel,hybrid"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..study.config import StudyConfig
    from ..study.run import run_study

    given = lambda names: {k: getattr(args, k) for k in names if getattr(args, k) is not None}  # noqa: E731
    cfg = StudyConfig.load(args.config, args.preset, **given(STUDY_FLAGS), train=given(RECIPE_FLAGS) or None)
    if args.max_images is not None:
        if not cfg.pretrained:
            raise ConfigError("--max-images sizes the pretrained study's image pool (--preset pretrained); "
                              "a training study takes its analysis sizes from the config's analysis:")
        cfg.analysis = {**cfg.analysis, "max_images": args.max_images}
    report = run_study(cfg)
    print(f"report written to {report}")
    return 0

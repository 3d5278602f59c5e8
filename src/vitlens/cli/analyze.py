"""``vitlens cka``, ``vitlens attention`` and ``vitlens probe``: look inside trained models.

Each takes run directories (or checkpoints, model names, ``timm:NAME``; see
:mod:`vitlens.models.loading`), evaluates on a deterministic subset of the data with eval
transforms, and writes figures with their numbers (PNG + JSON/CSV) to ``--out``.

Under ``torchrun --nproc_per_node=N -m vitlens cka ...`` the processes split the batches of the
image subset and add their statistics once at the end (:mod:`vitlens.analysis.distributed`):
the numbers are those of one process; rank 0 alone writes. A model built from a name has
random weights seeded by ``--seed`` (the i-th model on the command line gets ``seed + i``), so
the same command gives the same numbers; every JSON records the seed, the image indices'
fingerprint, the world size and the images per rank.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

_SPEC_HELP = "run directory, vitlens checkpoint, registered model name, or timm:NAME / torchvision:NAME"


# ----------------------------------------------------------------------------- argument parsing
# The flags every analysis command takes: (flag, add_argument keywords).
COMMON_FLAGS = [
    ("--out", {"required": True, "help": "output folder for figures and numbers"}),
    ("--data", {"default": None, "help": "cifar10-mini | cifar10 | cifar100 | imagefolder "
                "(default: the dataset the run trained on, else cifar10-mini)"}),
    ("--data-dir", {"default": None, "help": "where the dataset lives"}),
    ("--batch-size", {"type": int, "default": 64}),
    ("--device", {"default": "auto", "help": "auto | cpu | cuda | cuda:1 | mps"}),
    ("--which", {"default": "last", "choices": ["last", "best"], "help": "checkpoint of a run directory"}),
    ("--model", {"default": None, "help": "architecture of a foreign (timm/torchvision) checkpoint RUN"}),
    ("--num-classes", {"type": int, "default": None, "help": "head size of a model built from a name"}),
    ("--pretrained", {"action": "store_true",
                      "help": "models given by name load the hub's weights (timm:NAME[.TAG], "
                      "torchvision:NAME, hf:REPO, or a registered timm/torchvision name), from the local "
                      "cache first"}),
    ("--checkpoint", {"default": None,
                      "help": "weights for a model given by name (registered name, timm:NAME, "
                      "torchvision:NAME); timm, torchvision, Hugging Face or vitlens layout, .safetensors "
                      "or .pt/.pth"}),
    ("--seed", {"type": int, "default": 0,
                "help": "seed of the random weights of models built from a name (model i gets seed + i); "
                "the image subset is the same for every seed"}),
    ("--dist-timeout", {"type": float, "default": 600.0,
                        "help": "under torchrun: seconds a process waits for the others before it stops "
                        "with an error"}),
]  # fmt: skip


def _common(p) -> None:
    for flag, options in COMMON_FLAGS:
        p.add_argument(flag, **options)


def register(sub) -> None:
    c = sub.add_parser("cka", help="layer-by-layer CKA similarity of one model or two (heatmap + numbers)")
    c.add_argument("run_a", metavar="RUN_A", help=_SPEC_HELP)
    c.add_argument(
        "run_b", metavar="RUN_B", nargs="?", default=None, help="second model (default: RUN_A itself)"
    )
    _common(c)
    c.add_argument("--model-b", default=None, help="architecture of a foreign checkpoint RUN_B")
    c.add_argument("--checkpoint-b", default=None, help="weights for RUN_B given by name (see --checkpoint)")
    c.add_argument("--max-images", type=int, default=1024, help="test images used (a fixed random subset)")
    c.add_argument("--layers-a", nargs="+", default=None, help="module names (default: default_layers)")
    c.add_argument("--layers-b", nargs="+", default=None)
    c.add_argument(
        "--token-policy",
        default="flatten",
        help="flatten | cls | mean, or a pair for A,B such as 'cls,mean' (ViT vs ResNet)",
    )
    c.add_argument("--kernel", default="linear", choices=["linear", "rbf"])
    c.set_defaults(func=run_cka)

    a = sub.add_parser("attention", help="mean attention distance per head, attention maps and rollout")
    a.add_argument("runs", metavar="RUN", nargs="+", help=_SPEC_HELP + "; several overlay in one plot")
    _common(a)
    a.add_argument("--max-images", type=int, default=512, help="test images for the distance statistics")
    a.add_argument("--num-maps", type=int, default=4, help="test images drawn with their attention maps")
    a.add_argument("--map-layer", type=int, default=-1, help="attention layer index for the maps (-1: last)")
    a.add_argument(
        "--discard-ratio", type=float, default=0.0, help="rollout: share of weakest attention dropped"
    )
    a.set_defaults(func=run_attention)

    p = sub.add_parser("probe", help="linear probes on single tokens: class and position per layer")
    p.add_argument("runs", metavar="RUN", nargs="+", help=_SPEC_HELP + "; several overlay in one plot")
    _common(p)
    p.add_argument("--max-images", type=int, default=1024, help="images per split (train and test)")
    p.add_argument("--layers", nargs="+", default=None, help="module names (default: default_layers)")
    p.add_argument("--grid", type=int, default=None, help="average-pool CNN maps to GRID x GRID tokens")
    p.add_argument(
        "--class-probe",
        default="shared",
        choices=["shared", "per_position"],
        help="one class probe for all positions (default) or one per position",
    )
    p.add_argument(
        "--ridge", type=float, default=1e-3, help="ridge strength, relative to the mean feature variance"
    )
    p.set_defaults(func=run_probe)


# ----------------------------------------------------------------------------- shared helpers
@contextlib.contextmanager
def _processes(args):
    """This process's device; under torchrun, joined to the others' process group for the command."""
    from ..analysis.distributed import init_from_torchrun, rank_device
    from ..utils import check_out_folder

    check_out_folder(args.out)  # before any work
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = rank_device(name)
    joined = init_from_torchrun(device, args.dist_timeout)
    try:
        yield device
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _load(spec: str, args, model_name: str | None = None, checkpoint: str | None = None, position: int = 0):
    """(model, label, meta); random weights (a model built from a name) are seeded by ``seed + position``."""
    from ..models.loading import load_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + position)
        model, meta = load_model(
            spec,
            model_name=model_name,
            num_classes=args.num_classes,
            checkpoint=checkpoint,
            which=args.which,
            pretrained=args.pretrained and not Path(spec).exists(),  # a run or file brings its own weights
        )
    if meta.get("task"):  # image classifiers record none; the text tasks (causal_lm, translation...) do
        from ..errors import ModelError

        text_view = (
            "`vitlens translate RUN SENTENCE --attention OUT.png`"
            if meta["task"] == "translation"
            else "`vitlens lm attention RUN TEXT`"
        )
        raise ModelError(
            f"{spec} is a {meta['task']} run, not an image model: `vitlens {args.command}` analyses image "
            f"models (ViT, ResNet) on images; pass image runs or model names, or use {text_view} for the "
            "attention of a text model"
        )
    return model, meta["label"], {**meta, "seed": args.seed + position}


def _img_size(model, meta: dict) -> int | None:
    if meta.get("img_size"):
        return int(meta["img_size"])
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return None if size is None else int(size[0] if isinstance(size, (tuple, list)) else size)


def _data(args, model, meta: dict):
    """(train split with eval transforms, test split, DataInfo) for this model's input size."""
    from ..data import TransformedDataset, build_data
    from ..data.build import run_stats

    name = args.data or meta.get("data") or "cifar10-mini"
    # a hub model (timm:/torchvision:/hf:) sees images through its own resize, crop, interpolation and
    # mean/std (meta["preprocess"]); a vitlens run at its recorded size (and a fine-tune from pretrained
    # weights with their mean/std, as it trained: run_stats)
    train_ds, test_ds, info = build_data(
        name, args.data_dir, img_size=_img_size(model, meta), preprocess=meta.get("preprocess"),
        **run_stats(meta),
    )
    train_eval = TransformedDataset(train_ds.base, test_ds.transform)  # no augmentation for analysis
    return train_eval, test_ds, info


def _loader(ds, args, drop_last: bool = False):
    """The seeded ``--max-images`` subset of ``ds`` in fixed batches (never shuffled)."""
    from torch.utils.data import DataLoader

    from ..analysis.common import image_subset

    subset = image_subset(ds, args.max_images, seed=0)  # the same images for every command
    return DataLoader(
        subset,
        batch_size=args.batch_size,
        shuffle=False,
        drop_last=drop_last and len(subset) > args.batch_size,
    )


def _images_record(loader, seed: int) -> dict:
    """What a result records about its images: seed, index fingerprint, world size, images per rank."""
    from ..analysis.distributed import RankBatches

    return {"seed": seed, **RankBatches(loader).describe()}


def _load_runs(args) -> list[tuple]:
    """(model, label, meta) for every model named on the command line, labels made unique."""
    loaded = [_load(spec, args, args.model, args.checkpoint, i) for i, spec in enumerate(args.runs)]
    labels = _unique_labels([label for _, label, _ in loaded])
    return [(model, label, meta) for (model, _, meta), label in zip(loaded, labels)]


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def out_path(args, name: str) -> Path:
    return Path(args.out) / name


def _write_json(path: Path, obj) -> Path:
    from ..analysis.plots import to_jsonable

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(obj), indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------- commands
def run_cka(args) -> int:
    from ..analysis import cka_matrix
    from ..analysis.distributed import is_main_process
    from ..analysis.plots import plot_cka_heatmap

    with _processes(args) as device:
        model_a, label_a, meta_a = _load(args.run_a, args, args.model, args.checkpoint)
        model_b, label_b, meta_b = None, label_a, meta_a
        if args.run_b is not None:
            model_b, label_b, meta_b = _load(args.run_b, args, args.model_b, args.checkpoint_b, position=1)
            label_a, label_b = _unique_labels([label_a, label_b])
        _, test_ds, _ = _data(args, model_a, meta_a)
        policy = tuple(args.token_policy.split(",")) if "," in args.token_policy else args.token_policy
        loader = _loader(test_ds, args, drop_last=True)
        options = {"layers_a": args.layers_a, "layers_b": args.layers_b, "token_policy": policy}
        matrix, names_a, names_b = cka_matrix(
            model_a, model_b, loader, **options, kernel=args.kernel, device=device
        )
        if not is_main_process():
            return 0
        title = f"CKA: {label_a}" + (f" vs {label_b}" if model_b is not None else "")
        run = {**_images_record(loader, args.seed), "seed_b": meta_b["seed"], "kernel": args.kernel}
        png = plot_cka_heatmap(
            matrix, names_a, names_b, out_path(args, "cka"), title, label_a=label_a, label_b=label_b, run=run
        )
    print(f"wrote {png}, {png.with_suffix('.json')}, {png.with_suffix('.csv')}")
    return 0


def _attention_maps(args, model, label: str, test_ds, info, device) -> None:
    """Attention maps and rollout of the first ``--num-maps`` test images, one figure each."""
    from ..analysis.attention import attention_maps
    from ..analysis.plots import plot_attention_maps

    for i in range(min(args.num_maps, len(test_ds))):
        image, target = test_ds[i]
        maps = attention_maps(model, image.to(device), args.map_layer, discard_ratio=args.discard_ratio)
        cls = info.classes[target] if target < len(info.classes) else str(target)
        title = f"{label}: {maps['layer']}, test image {i} ({cls})"
        plot_attention_maps(
            image, maps, out_path(args, "maps") / f"{label}_img{i}", title, mean=info.mean, std=info.std
        )


def run_attention(args) -> int:
    from ..analysis.attention import attention_statistics
    from ..analysis.distributed import is_main_process
    from ..analysis.plots import plot_attention_distance

    distances, stats = {}, {}
    with _processes(args) as device:
        main = is_main_process()  # asked inside: the process group ends with the block
        for model, label, meta in _load_runs(args):
            _, test_ds, info = _data(args, model, meta)
            loader = _loader(test_ds, args)
            st = attention_statistics(model, loader, device=device, progress=True)
            distances[label] = st["distance"]
            stats[label] = {
                **st,
                "mean_distance_per_layer": st["distance"].mean(1),
                "images": len(loader.dataset),
                "run": _images_record(loader, meta["seed"]),
            }
            if main:
                _attention_maps(args, model, label, test_ds, info, device)
    if not main:
        return 0
    png = plot_attention_distance(distances, out_path(args, "attention_distance"))
    _write_json(out_path(args, "attention_stats.json"), stats)
    print(f"wrote {png}, {out_path(args, 'attention_stats.json')} and maps in {out_path(args, 'maps')}")
    for label, st in stats.items():
        per_layer = ", ".join(f"{d:.1f}" for d in st["mean_distance_per_layer"])
        print(f"{label}: mean attention distance per layer (px): {per_layer}")
    return 0


def _print_probes(label: str, res: dict) -> None:
    for layer, r in res.items():
        print(
            f"{label} {layer}: class {100 * r['class_acc']:.1f}% (chance {100 * r['chance_class']:.1f}%), "
            f"position {100 * r['position_acc']:.1f}% (chance {100 * r['chance_position']:.1f}%)"
        )


def run_probe(args) -> int:
    from ..analysis.distributed import is_main_process
    from ..analysis.plots import plot_probe_accuracy
    from ..analysis.probes import localization_probes

    if args.grid is not None and args.grid < 1:
        from ..errors import ConfigError

        raise ConfigError(
            f"--grid must be a positive number of tokens per side, got {args.grid}; e.g. --grid 8"
        )
    results, class_acc, pos_acc = {}, {}, {}
    options = {"grid": args.grid, "ridge": args.ridge, "max_images": args.max_images}
    with _processes(args) as device:
        main = is_main_process()  # asked inside: the process group ends with the block
        for model, label, meta in _load_runs(args):
            train_ds, test_ds, _ = _data(args, model, meta)
            loaders = {"train": _loader(train_ds, args), "test": _loader(test_ds, args)}
            res = localization_probes(
                model,
                *loaders.values(),
                args.layers,
                **options,
                class_probe=args.class_probe,
                device=device,
                progress=True,
            )
            run = {split: _images_record(loader, meta["seed"]) for split, loader in loaders.items()}
            results[label] = {"run": run, "layers": res}
            class_acc[label] = {layer: r["class_acc"] for layer, r in res.items()}
            pos_acc[label] = {layer: r["position_acc"] for layer, r in res.items()}
            if main:
                _print_probes(label, res)
    if not main:
        return 0
    chance = next(iter(next(iter(results.values()))["layers"].values()))["chance_class"]
    p1 = plot_probe_accuracy(
        class_acc, out_path(args, "probe_class"), "Class from a single token", chance=chance
    )
    p2 = plot_probe_accuracy(pos_acc, out_path(args, "probe_position"), "Position from a single token")
    _write_json(out_path(args, "probes.json"), results)
    print(f"wrote {p1}, {p2}, {out_path(args, 'probes.json')}")
    return 0

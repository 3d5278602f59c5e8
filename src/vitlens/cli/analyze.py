"""``vitlens cka``, ``vitlens attention`` and ``vitlens probe``: look inside trained models.

Each takes run directories (or checkpoints, model names, ``timm:NAME``; see
:mod:`vitlens.analysis.loading`), evaluates on a deterministic subset of the data with eval
transforms, and writes figures with their numbers (PNG + JSON/CSV) to ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_SPEC_HELP = "run directory, vitlens checkpoint, registered model name, or timm:NAME / torchvision:NAME"


# ----------------------------------------------------------------------------- argument parsing
def _common(p) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="cifar10-mini | cifar10 | cifar100 | imagefolder "
        "(default: the dataset the run trained on, else cifar10-mini)",
    )
    p.add_argument("--data-dir", default=None, help="where the dataset lives")
    p.add_argument("--out", required=True, help="output folder for figures and numbers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    p.add_argument("--which", default="last", choices=["last", "best"], help="checkpoint of a run directory")
    p.add_argument(
        "--model", default=None, help="architecture of a foreign (timm/torchvision) checkpoint RUN"
    )
    p.add_argument("--num-classes", type=int, default=None, help="head size of a model built from a name")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="weights for a model given by name (registered name, timm:NAME, torchvision:NAME); "
        "timm, torchvision, Hugging Face or vitlens layout, .safetensors or .pt/.pth",
    )


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
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load(spec: str, args, model_name: str | None = None, checkpoint: str | None = None):
    from ..analysis.loading import load_model_and_meta

    return load_model_and_meta(
        spec, model_name=model_name, num_classes=args.num_classes, checkpoint=checkpoint, which=args.which
    )


def _img_size(model, meta: dict) -> int | None:
    if meta.get("img_size"):
        return int(meta["img_size"])
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return None if size is None else int(size[0] if isinstance(size, (tuple, list)) else size)


def _subset(ds, max_images: int | None, seed: int = 0):
    """A fixed random subset (same images for every run and command), so all classes appear."""
    from torch.utils.data import Subset

    if max_images is None or max_images >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:max_images]
    return Subset(ds, sorted(idx.tolist()))


def _data(args, model, meta: dict):
    """(train split with eval transforms, test split, DataInfo) for this model's input size."""
    from ..data import TransformedDataset, build_data

    name = args.data or meta.get("data") or "cifar10-mini"
    train_ds, test_ds, info = build_data(name, args.data_dir, img_size=_img_size(model, meta))
    train_eval = TransformedDataset(train_ds.base, test_ds.transform)  # no augmentation for analysis
    return train_eval, test_ds, info


def _loader(ds, batch_size: int, drop_last: bool = False):
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=drop_last and len(ds) > batch_size)


def _load_runs(args) -> list[tuple]:
    """(model, label, meta) for every model named on the command line, labels made unique."""
    loaded = [_load(spec, args, args.model, args.checkpoint) for spec in args.runs]
    labels = _unique_labels([label for _, label, _ in loaded])
    return [(model, label, meta) for (model, _, meta), label in zip(loaded, labels)]


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def _write_json(path: Path, obj) -> Path:
    from ..analysis.plots import to_jsonable

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(obj), indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------- commands
def run_cka(args) -> int:
    from ..analysis import cka_matrix
    from ..analysis.plots import plot_cka_heatmap

    out, device = Path(args.out), _device(args.device)
    model_a, label_a, meta_a = _load(args.run_a, args, args.model, args.checkpoint)
    model_b, label_b = None, label_a
    if args.run_b is not None:
        model_b, label_b, _ = _load(args.run_b, args, args.model_b, args.checkpoint_b)
        label_a, label_b = _unique_labels([label_a, label_b])
    _, test_ds, _ = _data(args, model_a, meta_a)
    policy = tuple(args.token_policy.split(",")) if "," in args.token_policy else args.token_policy
    loader = _loader(_subset(test_ds, args.max_images), args.batch_size, drop_last=True)
    matrix, names_a, names_b = cka_matrix(
        model_a,
        model_b,
        loader,
        layers_a=args.layers_a,
        layers_b=args.layers_b,
        token_policy=policy,
        kernel=args.kernel,
        device=device,
    )
    title = f"CKA: {label_a}" + (f" vs {label_b}" if model_b is not None else "")
    png = plot_cka_heatmap(matrix, names_a, names_b, out / "cka", title, label_a=label_a, label_b=label_b)
    print(f"wrote {png}, {png.with_suffix('.json')}, {png.with_suffix('.csv')}")
    return 0


def run_attention(args) -> int:
    from ..analysis.attention import attention_maps, attention_statistics
    from ..analysis.plots import plot_attention_distance, plot_attention_maps

    out, device = Path(args.out), _device(args.device)
    distances, stats = {}, {}
    for model, label, meta in _load_runs(args):
        _, test_ds, info = _data(args, model, meta)
        st = attention_statistics(
            model, _loader(_subset(test_ds, args.max_images), args.batch_size), device=device, progress=True
        )
        distances[label] = st["distance"]
        stats[label] = {
            **st,
            "mean_distance_per_layer": st["distance"].mean(1),
            "images": min(args.max_images, len(test_ds)),
        }
        for i in range(min(args.num_maps, len(test_ds))):
            image, target = test_ds[i]
            maps = attention_maps(model, image.to(device), args.map_layer, discard_ratio=args.discard_ratio)
            cls = info.classes[target] if target < len(info.classes) else str(target)
            plot_attention_maps(
                image,
                maps,
                out / "maps" / f"{label}_img{i}",
                title=f"{label}: {maps['layer']}, test image {i} ({cls})",
                mean=info.mean,
                std=info.std,
            )
    png = plot_attention_distance(distances, out / "attention_distance")
    _write_json(out / "attention_stats.json", stats)
    print(f"wrote {png}, {out / 'attention_stats.json'} and maps in {out / 'maps'}")
    for label, st in stats.items():
        per_layer = ", ".join(f"{d:.1f}" for d in st["mean_distance_per_layer"])
        print(f"{label}: mean attention distance per layer (px): {per_layer}")
    return 0


def run_probe(args) -> int:
    from ..analysis.plots import plot_probe_accuracy
    from ..analysis.probes import localization_probes

    out, device = Path(args.out), _device(args.device)
    results, class_acc, pos_acc = {}, {}, {}
    for model, label, meta in _load_runs(args):
        train_ds, test_ds, _ = _data(args, model, meta)
        res = localization_probes(
            model,
            _loader(_subset(train_ds, args.max_images), args.batch_size),
            _loader(_subset(test_ds, args.max_images), args.batch_size),
            args.layers,
            grid=args.grid,
            ridge=args.ridge,
            max_images=args.max_images,
            class_probe=args.class_probe,
            device=device,
            progress=True,
        )
        results[label] = res
        class_acc[label] = {layer: r["class_acc"] for layer, r in res.items()}
        pos_acc[label] = {layer: r["position_acc"] for layer, r in res.items()}
        for layer, r in res.items():
            print(
                f"{label} {layer}: class {100 * r['class_acc']:.1f}% "
                f"(chance {100 * r['chance_class']:.1f}%), "
                f"position {100 * r['position_acc']:.1f}% (chance {100 * r['chance_position']:.1f}%)"
            )
    chance = next(iter(next(iter(results.values())).values()))["chance_class"]
    p1 = plot_probe_accuracy(class_acc, out / "probe_class", "Class from a single token", chance=chance)
    p2 = plot_probe_accuracy(pos_acc, out / "probe_position", "Position from a single token")
    _write_json(out / "probes.json", results)
    print(f"wrote {p1}, {p2}, {out / 'probes.json'}")
    return 0

"""``vitlens study --preset pretrained``: Raghu et al. 2021 on the hubs' pretrained models, no training.

Each model of the config is loaded with its pretrained weights (``load_model(spec, pretrained=True)``)
and sees the same images through its OWN preprocessing (``meta["preprocess"]``: resize, crop,
interpolation, mean/std), never CIFAR statistics. Per model, in this order, each step cached
under ``STUDY_DIR/analysis/`` (a killed study resumes at the first missing file):

* one pass over the image pool: the per-batch Gram matrix of every CKA layer (a few MB) and the
  top-1 counts when the folder is ImageNet-labelled -> ``grams_<label>_<images>.safetensors``;
* the mean attention distance of every head (ViTs) -> ``attention_<label>_<images>.json``;
* the CLS/GAP localization probes -> ``probes_<label>_<images>.json``.

CKA within a model and across ViT x CNN pairs is then :class:`~vitlens.analysis.MinibatchCKA`
fed with the saved Grams: every model saw the same images in the same batches, so this is
exactly what ``cka_matrix`` computes in one joint pass, without running two models at once.
``<images>`` is a fingerprint of the image subset, so another ``--max-images`` recomputes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ..errors import ConfigError, MissingFileError
from ..io import load_checkpoint, save_checkpoint
from .config import StudyConfig

PRETRAINED_DEFAULTS = {
    "max_images": 1000,  # the image pool: top-1 and CKA use all of it
    "attention_images": 256,  # attention distance: the first ones of the pool
    "probe_train_images": 500,  # probes: the first ones of the pool for fitting ...
    "probe_test_images": 250,  # ... and the ones after them for scoring (disjoint)
    "batch_size": 32,
    "autocast": "bf16",  # bf16 matmuls on CPUs with AMX/AVX512-BF16; "fp32" for reference-grade numbers
}
EMBEDDED = "cifar10-mini"


# ----------------------------------------------------------------------------- images
class _Preprocessed(Dataset):
    """``(image, label)`` items of ``base`` (PIL images or uint8 tensors) through ``transform``."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.transforms.functional import to_pil_image

        image, label = self.base[i]
        if not isinstance(image, Image.Image):
            image = to_pil_image(image)  # the embedded uint8 32 px images: upsampled by the transform
        return self.transform(image.convert("RGB")), label


def image_pool(data: str, data_dir: str | None) -> tuple[Dataset, list[str], str]:
    """``(dataset of (PIL or uint8 image, label), class names, description)``.

    An ImageFolder (``DIR/<class>/<image>``, or ``DIR/val/...``, ``DIR/test/...``) is read with
    torchvision's ImageFolder, decoded lazily (ImageNet's 50,000 validation images are never held
    in memory); without ``data_dir``, the embedded cifar10-mini (test then train images).
    """
    if data_dir is None:
        if data != EMBEDDED and data != "imagefolder":
            raise ConfigError(f"the pretrained study reads an image folder (--data-dir DIR), not {data!r}")
        from ..data.catalog import build_dataset

        test, train = build_dataset(EMBEDDED, "test"), build_dataset(EMBEDDED, "train")
        return ConcatDataset([test, train]), list(test.classes), f"{EMBEDDED} (embedded, 32 px upsampled)"
    from torchvision.datasets import ImageFolder

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"--data-dir {root} is not a folder; give an ImageFolder "
                               "(DIR/<class>/<image>), "
                               "e.g. ImageNet's validation set laid out as val/<wnid>/*.JPEG")
    for split in ("val", "test"):
        if (root / split).is_dir():
            root = root / split
            break
    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise MissingFileError(f"{root} holds no images in class folders ({e}); "
                               "lay it out as DIR/<class>/<image>") from None
    return folder, list(folder.classes), str(root)


def imagenet_indices(classes: list[str]) -> list[int] | None:
    """The ImageNet-1k index of each class folder when every folder is a 1k wnid (``n01440764``);
    else None. The wnid order comes with timm (``timm.data.ImageNetInfo``), so this works offline."""
    from timm.data import ImageNetInfo

    wnids = {w: i for i, w in enumerate(ImageNetInfo("imagenet-1k").label_names())}
    if not classes or any(c not in wnids for c in classes):
        return None
    return [wnids[c] for c in classes]


# ----------------------------------------------------------------------------- one model
def _autocast(kind: str):
    if kind == "fp32":
        return torch.autocast("cpu", enabled=False)
    if kind != "bf16":
        raise ConfigError(f"analysis.autocast must be 'bf16' or 'fp32', got {kind!r}")
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _gram_pass(model, loader, to_imagenet: list[int] | None, precision: str) -> dict:
    """One pass: per-batch Grams of every CKA layer, and top-1 when labels map to ImageNet-1k."""
    from ..analysis.cka import _LayerPlan

    plan = _LayerPlan.build(model, None, None, None, "flatten")
    logits = []
    hook = model.register_forward_hook(lambda m, i, out: logits.append(getattr(out, "logits", out)))
    grams, correct, seen, t0 = [], 0, 0, time.perf_counter()
    lookup = torch.tensor(to_imagenet) if to_imagenet is not None else None
    try:
        with plan.grams(torch.float32) as grams_of, _autocast(precision):
            for images, labels in loader:
                logits.clear()
                grams.append(grams_of(images)[0].float())
                out = logits[-1].float()
                if lookup is not None and out.shape[-1] == 1000:
                    correct += int((out.argmax(-1) == lookup[labels]).sum())
                seen += len(images)
    finally:
        hook.remove()
    elapsed = time.perf_counter() - t0
    measured = lookup is not None and out.shape[-1] == 1000
    return {"grams": grams, "names": plan.names_a, "images": seen, "seconds": elapsed,
            "top1": 100.0 * correct / seen if measured else None}


def _analyse_model(spec, pool, to_imagenet, a: dict, analysis_dir: Path, tag: str, log) -> dict:
    """Load one pretrained model and compute (or reuse) its Grams, attention distances and probes."""
    from ..analysis import localization_probes, mean_attention_distance
    from ..analysis.common import is_vit
    from ..models.hub import eval_transform
    from ..models.loading import load_model
    from .run import _cached

    stem = _stem(spec, tag)
    files = {k: analysis_dir / f"{k}_{stem}.{ext}"
             for k, ext in (("grams", "safetensors"), ("info", "json"), ("attention", "json"),
                            ("probes", "json"))}
    if all(f.exists() for k, f in files.items() if k != "attention") and (
            files["attention"].exists() or not json.loads(files["info"].read_text())["is_vit"]):
        log(f"{spec.label}: statistics reused")
        return json.loads(files["info"].read_text())
    model, meta = load_model(spec.model, pretrained=True, **spec.model_args)
    pre = meta.get("preprocess")
    if not pre:
        raise ConfigError(f"{spec.model} has no preprocessing recorded (is it a pretrained hub model?); "
                          "the pretrained study needs timm:/torchvision:/hf: names loaded with weights")
    data = _Preprocessed(pool, eval_transform(pre))
    bs = int(a["batch_size"])
    n = len(pool)
    loader = lambda lo, hi: DataLoader(torch.utils.data.Subset(data, range(lo, min(hi, n))),  # noqa: E731
                                       batch_size=bs, shuffle=False)
    vit = is_vit(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{spec.label}: {spec.model} ({n_params / 1e6:.1f} M parameters, "
        f"{pre['crop']} px, {pre['source']})")
    if files["grams"].exists() and files["info"].exists():
        info = json.loads(files["info"].read_text())
        log("  grams: reused")
    else:
        res = _gram_pass(model, loader(0, n), to_imagenet, a["autocast"])
        save_checkpoint(files["grams"], {}, meta={"names": res["names"]}, state={"grams": res["grams"]})
        info = {"label": spec.label, "model": spec.model, "pretrained": meta.get("pretrained", spec.model),
                "preprocess": pre, "params": n_params,
                "is_vit": vit, "pool": str(getattr(getattr(model, "cfg", None), "pool", "") or ""),
                "patch_size": int(model.patch_embed.patch_size[0]) if vit else None,
                "images": res["images"], "img_per_s": res["images"] / res["seconds"], "top1": res["top1"]}
        files["info"].write_text(json.dumps(info))
        log(f"  grams and top-1: {res['seconds']:.1f} s")
    with _autocast(a["autocast"]):
        if vit:
            _cached(files["attention"],
                    lambda: mean_attention_distance(model, loader(0, int(a["attention_images"])),
                                                    progress=False).tolist(), log)
        n_train = min(int(a["probe_train_images"]), (2 * n) // 3)
        n_test = min(int(a["probe_test_images"]), n - n_train)

        def probes():
            res = localization_probes(model, loader(0, n_train), loader(n_train, n_train + n_test),
                                      max_images=None)
            return {layer: {"class_acc": float(v["class_acc"]), "position_acc": float(v["position_acc"])}
                    for layer, v in res.items()}

        _cached(files["probes"], probes, log)
    return info


def _short_hash(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8]


def _stem(spec, tag: str) -> str:
    """A model's cache-file stem: its label, and a hash of the images (``tag``) and the model itself."""
    return f"{spec.label}_{_short_hash(tag, spec.model, json.dumps(spec.model_args, sort_keys=True))}"


# ----------------------------------------------------------------------------- CKA from saved Grams
def _load_grams(path: Path) -> dict:
    """The per-batch Gram matrices of one model (a safetensors cache: nothing is unpickled)."""
    _, meta, state = load_checkpoint(path)
    return {"grams": state["grams"], "names": meta["names"]}


def _cka(grams_a: dict, grams_b: dict | None = None) -> tuple[list, list, list]:
    from ..analysis import MinibatchCKA

    names_b = None if grams_b is None else grams_b["names"]
    acc = MinibatchCKA(len(grams_a["names"]), None if grams_b is None else len(names_b))
    for i, ga in enumerate(grams_a["grams"]):
        acc.update_grams(ga, None if grams_b is None else grams_b["grams"][i])
    return acc.compute().tolist(), grams_a["names"], names_b or grams_a["names"]


def pretrained_analysis(cfg: StudyConfig, study_dir: Path, log=print) -> dict:
    """Every model's statistics, then CKA within and across; the results.json entries."""
    from ..analysis.common import image_subset, indices_fingerprint, subset_indices

    a = {**PRETRAINED_DEFAULTS, **{k: v for k, v in cfg.analysis.items() if k in PRETRAINED_DEFAULTS}}
    unknown = set(cfg.analysis) - set(PRETRAINED_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown analysis settings for the pretrained study: {sorted(unknown)}; "
                          f"choose from {sorted(PRETRAINED_DEFAULTS)}")
    full, classes, where = image_pool(cfg.data, cfg.data_dir)
    indices = subset_indices(len(full), int(a["max_images"]), seed=0)
    pool = image_subset(full, int(a["max_images"]), seed=0)
    # Cached statistics are reused only for the same images, batches and precision (cross-model CKA
    # pairs the models' Grams batch by batch).
    tag = _short_hash(where, len(full), indices_fingerprint(indices), a["batch_size"], a["autocast"])
    to_imagenet = imagenet_indices(classes)
    analysis_dir = study_dir / "analysis"
    analysis_dir.mkdir(parents=True, exist_ok=True)
    log(f"pretrained study: {len(pool):,} of {len(full):,} images from {where}"
        + ("" if to_imagenet else " (not ImageNet wnid folders: top-1 not measured)"))
    infos = {spec.label: _analyse_model(spec, pool, to_imagenet, a, analysis_dir, tag, log)
             for spec in cfg.models}
    stems = {spec.label: _stem(spec, tag) for spec in cfg.models}
    grams = {label: _load_grams(analysis_dir / f"grams_{stems[label]}.safetensors") for label in infos}
    vits = [label for label, info in infos.items() if info["is_vit"]]
    within = {}
    for label, g in grams.items():
        matrix, names, _ = _cka(g)
        within[label] = {"matrix": matrix, "names": names}
    cross = []
    for va in vits:
        for cb in (label for label in infos if label not in vits):
            matrix, na, nb = _cka(grams[va], grams[cb])
            cross.append({"a": va, "b": cb, "matrix": matrix, "names_a": na, "names_b": nb})
    read = lambda kind, label: json.loads((analysis_dir / f"{kind}_{stems[label]}.json").read_text())  # noqa: E731
    runs = [{"label": label, "model": info["model"],
             "model_args": {"pool": info["pool"]} if info["pool"] else {},
             "pretrained": info["pretrained"], "preprocess": info["preprocess"], "fraction": 1.0, "seed": 0,
             "train_images": 0, "params": info["params"], "img_per_s": info["img_per_s"],
             "test_top1": info["top1"], "eval_images": info["images"]} for label, info in infos.items()]
    vit0 = infos[vits[0]] if vits else {}
    return {
        "mode": "pretrained",
        "dataset": {"name": where, "images": len(pool), "images_available": len(full),
                    "num_classes": len(classes), "imagenet_labelled": to_imagenet is not None,
                    "img_size": vit0.get("preprocess", {}).get("crop")},
        "runs": runs,
        "vit_labels": vits,
        "cka": {"within": within, "cross": cross, "fraction": None, "images": len(pool)},
        "attention_distance": {**{label: {"pretrained": read("attention", label)} for label in vits},
                               "patch_size": vit0.get("patch_size"),
                               "images": min(len(pool), int(a["attention_images"]))},
        "probes": {label: read("probes", label) for label in infos},
        "analysis": a,
    }


def run_pretrained_study(cfg: StudyConfig, log=print) -> Path:
    """The pretrained comparison into ``cfg.out``; returns the report path."""
    from .report import build_report

    study_dir = Path(cfg.out)
    study_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(study_dir / "study_config.yaml")
    t0 = time.perf_counter()
    results = {"title": cfg.title, "created": _dt.datetime.now().isoformat(timespec="seconds"),
               "config": cfg.to_dict(), **pretrained_analysis(cfg, study_dir, log), "tokenizers": []}
    results["elapsed_s"] = time.perf_counter() - t0
    (study_dir / "results.json").write_text(json.dumps(results, indent=1))
    report = build_report(study_dir)
    log(f"report: {report}")
    return report

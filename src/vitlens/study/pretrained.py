"""``vitlens study --preset pretrained``: Raghu et al. 2021 on the hubs' pretrained models, no training.

Each model of the config is loaded with its pretrained weights (``load_model(spec, pretrained=True)``)
and sees the same images through its OWN preprocessing (``meta["preprocess"]``: resize, crop,
interpolation, mean/std), never CIFAR statistics; consecutive models with the same resize and crop
share the resized images (:class:`_Pixels`). Per model, ONE forward pass per batch over the image
pool (:func:`_model_pass`) feeds everything, from forward hooks while each layer's output is fresh:

* the per-batch Gram matrix of every CKA layer (a few MB) -> ``grams_<label>_<images>.safetensors``;
* top-1 from the logits when the folder is ImageNet-labelled -> ``info_<label>_<images>.json``;
* on the first ``attention_images``: the mean attention distance of every head (ViTs)
  -> ``attention_<label>_<images>.json``;
* on the next ``probe_train_images`` / ``probe_test_images``: the CLS/GAP localization probes'
  statistics, then their scores (:class:`~vitlens.analysis.probes.ProbeStream`)
  -> ``probes_<label>_<images>.json``.

``analysis.autocast`` ``auto`` (default) runs the models in bf16 where the CPU has native bf16
matrix units, as training does (:func:`vitlens.train.precision.resolve_amp`), and CNNs channels_last;
the statistics themselves are float32 products summed in float64. A killed study resumes at the
first model whose files are missing (``info`` is written last).

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
from torch import nn
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
    "autocast": "auto",  # bf16 where the CPU has AMX/AVX512-BF16, else fp32; "fp32" for reference numbers
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
    """The autocast context for ``analysis.autocast``: ``auto`` is bf16 where the CPU computes it natively
    (AMX or AVX-512-BF16; see :func:`vitlens.train.precision.resolve_amp`), else fp32."""
    if kind not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"analysis.autocast must be 'auto', 'bf16' or 'fp32', got {kind!r}")
    from ..train.precision import resolve_amp

    dtype = resolve_amp(kind, "cpu")
    return torch.autocast("cpu", enabled=False) if dtype is None else torch.autocast("cpu", dtype=dtype)


def _resolved_precision(kind: str) -> str:
    """``auto`` as what it means on this machine, for the cache tag (bf16 and fp32 numbers differ)."""
    if kind != "auto":
        return kind
    from ..train.precision import resolve_amp

    return "fp32" if resolve_amp("auto", "cpu", log=lambda _m: None) is None else "bf16"


class _Pixels:
    """The pool's images resized and centre-cropped by one model's preprocessing, kept as uint8.

    Models with the same resize, crop and interpolation (the two ViT-B/16s) share them: the PIL
    work is done once. The resize and crop are :func:`vitlens.data.preprocess.resize_crop`, the one
    builder ``vitlens eval`` and the analyses use too; ``batch(lo, hi, mean, std)`` is then exactly
    the ``ToTensor`` + ``Normalize`` of its :func:`~vitlens.data.preprocess.eval_transform`, on a
    whole batch at once.
    """

    def __init__(self, pool: Dataset, pre: dict):
        from torchvision import transforms as T

        from ..data.preprocess import resize_crop

        identity = _Preprocessed(pool, T.Compose([*resize_crop(pre).transforms, T.PILToTensor()]))
        loader = DataLoader(identity, batch_size=64, shuffle=False)  # PIL, one image at a time (no way round)
        images, labels = zip(*loader)
        self.images, self.labels = torch.cat(images), torch.cat(labels)
        self.key = self.key_of(pre)

    @staticmethod
    def key_of(pre: dict) -> tuple:
        return pre["resize"], pre.get("resize_mode", "shorter"), pre["crop"], pre["interpolation"]

    def batch(self, lo: int, hi: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[lo:hi].float().div(255)
        mean, std = torch.as_tensor(mean, dtype=x.dtype), torch.as_tensor(std, dtype=x.dtype)
        return x.sub_(mean[:, None, None]).div_(std[:, None, None]), self.labels[lo:hi]


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A layer output as (B, features) for its Gram matrix, with no copy: a channels_last map is read in
    its memory order (a Gram matrix does not depend on the order of the features)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return t.permute(0, 2, 3, 1).flatten(1)
    return t.flatten(1)


class _AttentionDistance:
    """record_attention's sink: per layer and head, the sum over images and patch queries of the
    mean attention distance, exactly :func:`vitlens.analysis.mean_attention_distance`'s (prefix
    tokens dropped, rows renormalised), in float32 with float64 sums."""

    def __init__(self, model: nn.Module):
        from ..analysis.attention import num_heads, patch_distances, resolve_attention_layers, token_geometry

        self.layers = resolve_attention_layers(model)
        self.geo = token_geometry(model)
        self.d = patch_distances(self.geo.grid_size, self.geo.patch_size).float()  # (N, N)
        self.sums = {n: torch.zeros(num_heads(model, n), dtype=torch.float64) for n in self.layers}
        self.images, self.take = 0, 0  # images summed; images of the current batch to take

    def __call__(self, name: str, probs: torch.Tensor) -> None:
        P = self.geo.num_prefix_tokens
        a = probs[: self.take, :, P:, P:].float()  # (b, H, N, N)
        per_query = (a * self.d).sum(-1) / a.sum(-1).clamp_min(1e-12)  # (b, H, N)
        self.sums[name] += per_query.sum((0, 2), dtype=torch.float64)

    def result(self) -> list:
        patches = self.d.shape[0]
        return torch.stack([self.sums[n] for n in self.layers]).div(self.images * patches).tolist()


def _rows(lo: int, hi: int, start: int, stop: int) -> slice:
    """The rows of batch [lo, hi) that hold images [start, stop) of the pool (maybe none)."""
    return slice(min(max(start - lo, 0), hi - lo), min(max(stop - lo, 0), hi - lo))


def _model_pass(model, pixels: _Pixels, pre: dict, to_imagenet: list[int] | None, a: dict) -> dict:
    """ONE forward pass per batch over the pool feeding every statistic of the study.

    Forward hooks on the CKA/probe layers turn each output into its Gram matrix (float32 products,
    float64 sums) and, for the images of the probe splits, into probe statistics or probe scores,
    while the output is fresh; the batches of the first ``attention_images`` also record attention
    (:class:`_AttentionDistance`); the logits give top-1. The batches are the old per-analysis
    passes' (``batch_size`` from image 0), so the Grams pair up across models for CKA.
    """
    from contextlib import nullcontext

    from ..analysis import record_attention
    from ..analysis.capture import _first_tensor, default_layers
    from ..analysis.cka import feature_gram
    from ..analysis.common import is_vit
    from ..analysis.probes import ProbeStream
    from ..train.precision import want_channels_last

    n, bs = len(pixels.images), int(a["batch_size"])
    n_train = min(int(a["probe_train_images"]), (2 * n) // 3)
    n_test = min(int(a["probe_test_images"]), n - n_train)
    n_att = min(n, int(a["attention_images"]))
    layers = default_layers(model)
    probes = ProbeStream(model, layers)
    attention = _AttentionDistance(model) if is_vit(model) else None
    channels_last = want_channels_last(None, model)  # oneDNN's fast bf16 convolutions
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch_grams: dict[str, torch.Tensor] = {}
    rows = {}  # this batch's (train slice, test slice) of image rows

    def hook(name):
        def on_output(_module, _args, output) -> None:
            out = _first_tensor(output).detach()
            batch_grams[name] = feature_gram(_flat(out), dtype=torch.float32)
            train, test, labels = rows["train"], rows["test"], rows["labels"]
            if train.stop > train.start:
                probes.fit(name, out[train], labels[train])
            if test.stop > test.start:
                probes.score(name, out[test], labels[test])
        return on_output

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    lookup = torch.tensor(to_imagenet) if to_imagenet is not None else None
    grams, correct, top1_measured, t0 = [], 0, lookup is not None, time.perf_counter()
    try:
        with torch.no_grad(), _autocast(a["autocast"]):
            for lo in range(0, n, bs):
                hi = min(lo + bs, n)
                images, labels = pixels.batch(lo, hi, pre["mean"], pre["std"])
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                rows.update(train=_rows(lo, hi, 0, n_train), test=_rows(lo, hi, n_train, n_train + n_test),
                            labels=labels)
                recording = attention is not None and lo < n_att
                with (
                    record_attention(model, attention.layers, sink=attention) if recording else nullcontext()
                ):
                    if recording:
                        attention.take = min(hi, n_att) - lo
                    out = model(images)
                if recording:
                    attention.images += attention.take
                grams.append(torch.stack([batch_grams.pop(name) for name in layers]).float())
                logits = getattr(out, "logits", out).float()
                top1_measured = top1_measured and logits.shape[-1] == 1000
                if top1_measured:
                    correct += int((logits.argmax(-1) == lookup[labels]).sum())
    finally:
        for h in handles:
            h.remove()
    elapsed = time.perf_counter() - t0
    probe_res = {layer: {"class_acc": float(v["class_acc"]), "position_acc": float(v["position_acc"])}
                 for layer, v in probes.results().items()}
    return {"grams": grams, "names": layers, "images": n, "seconds": elapsed,
            "top1": 100.0 * correct / n if top1_measured else None,
            "attention": None if attention is None else attention.result(), "probes": probe_res}


def _analyse_model(spec, pool, to_imagenet, a: dict, analysis_dir: Path, tag: str, log,
                   pixels: list) -> dict:
    """Load one pretrained model and compute (or reuse) its Grams, top-1, attention distances and probes.

    ``pixels`` holds the last :class:`_Pixels` (one entry), reused by the next model with the same
    resize and crop.
    """
    from ..analysis.common import is_vit
    from ..models.loading import load_model

    stem = _stem(spec, tag)
    files = {k: analysis_dir / f"{k}_{stem}.{ext}"
             for k, ext in (("grams", "safetensors"), ("info", "json"), ("attention", "json"),
                            ("probes", "json"))}
    if all(f.exists() for k, f in files.items() if k != "attention") and (
            files["attention"].exists() or not json.loads(files["info"].read_text())["is_vit"]):
        log(f"{spec.label}: statistics reused")
        return json.loads(files["info"].read_text())
    t0 = time.perf_counter()
    model, meta = load_model(spec.model, pretrained=True, **spec.model_args)
    model.eval()
    pre = meta.get("preprocess")
    if not pre:
        raise ConfigError(f"{spec.model} has no preprocessing recorded (is it a pretrained hub model?); "
                          "the pretrained study needs timm:/torchvision:/hf: names loaded with weights")
    vit = is_vit(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{spec.label}: {spec.model} ({n_params / 1e6:.1f} M parameters, "
        f"{pre['crop']} px, {pre['source']})")
    if not pixels or pixels[0].key != _Pixels.key_of(pre):
        pixels[:] = []  # free the previous model's images first
        pixels.append(_Pixels(pool, pre))
        log(f"  images resized and cropped: {time.perf_counter() - t0:.1f} s (with loading)")
    res = _model_pass(model, pixels[0], pre, to_imagenet, a)
    save_checkpoint(files["grams"], {}, meta={"names": res["names"]}, state={"grams": res["grams"]})
    if vit:
        files["attention"].write_text(json.dumps(res["attention"]))
    files["probes"].write_text(json.dumps(res["probes"]))
    info = {"label": spec.label, "model": spec.model, "pretrained": meta.get("pretrained", spec.model),
            "preprocess": pre, "params": n_params,
            "is_vit": vit, "pool": str(getattr(getattr(model, "cfg", None), "pool", "") or ""),
            "patch_size": int(model.patch_embed.patch_size[0]) if vit else None,
            "images": res["images"], "img_per_s": res["images"] / res["seconds"], "top1": res["top1"]}
    files["info"].write_text(json.dumps(info))  # last: its presence says the model is complete
    log(f"  one pass (Grams, top-1, attention, probes): {res['seconds']:.1f} s")
    return info


# Part of every cache file's name: raise it when what a model's statistics are changes (its preprocessing,
# the Grams, probes or attention code), so caches written by an older vitlens are recomputed, not reused.
# 2: each hub model's own preprocessing (HF processors squash, timm "squash" crop mode ignores crop_pct).
STATISTICS_VERSION = 2


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
    # pairs the models' Grams batch by batch), and the same version of the statistics' code.
    tag = _short_hash(STATISTICS_VERSION, where, len(full), indices_fingerprint(indices), a["batch_size"],
                      _resolved_precision(a["autocast"]),
                      a["attention_images"], a["probe_train_images"], a["probe_test_images"])
    to_imagenet = imagenet_indices(classes)
    analysis_dir = study_dir / "analysis"
    analysis_dir.mkdir(parents=True, exist_ok=True)
    log(f"pretrained study: {len(pool):,} of {len(full):,} images from {where}"
        + ("" if to_imagenet else " (not ImageNet wnid folders: top-1 not measured)"))
    pixels: list = []  # one _Pixels at a time, shared by consecutive models with the same crop
    infos = {spec.label: _analyse_model(spec, pool, to_imagenet, a, analysis_dir, tag, log, pixels)
             for spec in cfg.models}
    pixels.clear()
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

"""``vitlens study``: train the sweep, analyse every model, write results.json and the report.

Resumable by construction: a run whose ``summary.json`` exists is reused, an unfinished one
resumes from its last checkpoint (``train(..., resume=True)``), and each analysis result is
saved under ``analysis/`` and reused when present.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from pathlib import Path

import torch

from ..train import TrainConfig, is_finished, train
from ..models.loading import load_run_model
from .config import ModelSpec, StudyConfig


def run_name(label: str, fraction: float, seed: int) -> str:
    return f"{label}_f{fraction:g}_s{seed}"


def _recipe(
    cfg: StudyConfig, spec: ModelSpec, fraction: float, seed: int, run_dir: Path, train_images_full: int
) -> TrainConfig:
    recipe = {**cfg.train, **spec.train}
    epochs = int(recipe.get("epochs", 10))
    if cfg.min_steps:
        # Small fractions get more epochs so that every run takes at least min_steps optimiser steps.
        n = max(1, round(fraction * train_images_full))
        steps_per_epoch = max(1, math.ceil(n / int(recipe.get("batch_size", 128))))
        epochs = max(epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    recipe["epochs"] = epochs
    # The study reads only the final accuracy: evaluating the whole test split after every one of
    # the many short epochs of a small fraction would cost more than the training itself.
    recipe.setdefault("eval_every", epochs)
    return TrainConfig.from_dict(
        {
            **recipe,
            "model": spec.model,
            "model_args": dict(spec.model_args),
            "data": cfg.data,
            "data_dir": cfg.data_dir,
            "fraction": fraction,
            "seed": seed,
            "out": str(run_dir),
        }
    )


def train_all(cfg: StudyConfig, study_dir: Path, train_images_full: int, log=print) -> list[dict]:
    """Train (or reuse, or resume) every (model, fraction, seed); return one record per run."""
    records = []
    jobs = [(spec, f, s) for f in cfg.fractions for s in cfg.seeds for spec in cfg.models]
    for i, (spec, fraction, seed) in enumerate(jobs, 1):
        name = run_name(spec.label, fraction, seed)
        run_dir = study_dir / "runs" / name
        if is_finished(run_dir):
            log(f"[{i}/{len(jobs)}] {name}: finished earlier, reused")
        else:
            log(
                f"[{i}/{len(jobs)}] {name}: training"
                + (" (resuming)" if (run_dir / "checkpoints").exists() else "")
            )
            train(_recipe(cfg, spec, fraction, seed, run_dir, train_images_full), resume=True)
        summary = json.loads((run_dir / "summary.json").read_text())
        model_info = json.loads((run_dir / "model.json").read_text())
        records.append(
            {
                "label": spec.label,
                "model": spec.model,
                "model_args": model_info["model_args"],
                "fraction": fraction,
                "seed": seed,
                "train_images": summary["train_images"],
                "params": summary["params"],
                "flops_per_image": summary["flops_per_image"],
                "train_time_s": summary["train_time_s"],
                "img_per_s": summary["img_per_s"],
                "test_top1": summary["test_top1"],
                "test_top5": summary["test_top5"],
                "epochs": summary["epochs"],
                "run_dir": f"runs/{name}",
            }
        )
    return records


def _cached(path: Path, compute, log=print):
    """Analysis results are JSON files; a resumed study reuses them."""
    if path.exists():
        log(f"  {path.name}: reused")
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    log(f"  {path.name}: {time.perf_counter() - t0:.1f} s")
    return value


def analyse(cfg: StudyConfig, study_dir: Path, records: list[dict], log=print) -> dict:
    """CKA, attention distance and localization probes on the trained models."""
    from ..analysis import cka_matrix, localization_probes, mean_attention_distance
    from ..data import build_data

    a = {
        "cka_images": 256,
        "attention_images": 128,
        "probe_train_images": 500,
        "probe_test_images": 250,
        "batch_size": 64,
        **cfg.analysis,
    }
    _, test_ds, info = build_data(cfg.data, cfg.data_dir)
    bs = int(a["batch_size"])

    def loader(n_images, dataset=test_ds):
        # A seeded random subset: image folders are stored class by class, so the first n images
        # would all be airplanes (and a class probe would be trivially right).
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n_images]
        subset = torch.utils.data.Subset(dataset, sorted(order.tolist()))
        return torch.utils.data.DataLoader(subset, batch_size=bs, shuffle=False)

    analysis_dir = study_dir / "analysis"
    largest, seed0 = cfg.fractions[-1], cfg.seeds[0]
    models = {
        spec.label: load_run_model(study_dir / "runs" / run_name(spec.label, largest, seed0))[0]
        for spec in cfg.models
    }
    vit_labels = [label for label, m in models.items() if hasattr(m, "blocks")]
    cnn_labels = [label for label in models if label not in vit_labels]

    # ---- representation structure: CKA within each model and across ViT x CNN
    log("analysis: CKA")
    within = {}
    for label, model in models.items():

        def compute(model=model):
            matrix, names, _ = cka_matrix(model, None, loader(a["cka_images"]), progress=False)
            return {"matrix": matrix.tolist(), "names": list(names)}

        within[label] = _cached(analysis_dir / f"cka_{label}.json", compute, log)
    cross = []
    for va in vit_labels:
        for cb in cnn_labels:

            def compute(va=va, cb=cb):
                matrix, names_a, names_b = cka_matrix(
                    models[va], models[cb], loader(a["cka_images"]), progress=False
                )
                return {
                    "a": va,
                    "b": cb,
                    "matrix": matrix.tolist(),
                    "names_a": list(names_a),
                    "names_b": list(names_b),
                }

            cross.append(_cached(analysis_dir / f"cka_{va}_x_{cb}.json", compute, log))

    # ---- local vs global attention, for every ViT at every fraction (seed 0)
    log("analysis: mean attention distance")
    attention = {}
    for label in vit_labels:
        per_fraction = {}
        for fraction in cfg.fractions:

            def compute(label=label, fraction=fraction):
                model, _ = load_run_model(study_dir / "runs" / run_name(label, fraction, seed0))
                return mean_attention_distance(model, loader(a["attention_images"])).tolist()

            per_fraction[f"{fraction:g}"] = _cached(
                analysis_dir / f"attention_{label}_f{fraction:g}.json", compute, log
            )
        attention[label] = per_fraction
    vit0 = models[vit_labels[0]] if vit_labels else None
    attention_meta = {
        "img_size": info.img_size,
        "patch_size": int(vit0.patch_embed.patch_size[0]) if vit0 is not None else None,
    }

    # ---- [CLS] vs pooling: per-token localization probes
    log("analysis: localization probes")
    train_full, _, _ = build_data(cfg.data, cfg.data_dir, augment=False)
    probes = {}
    for label, model in models.items():

        def compute(model=model):
            res = localization_probes(
                model, loader(a["probe_train_images"], train_full), loader(a["probe_test_images"])
            )
            return {
                layer: {"class_acc": float(v["class_acc"]), "position_acc": float(v["position_acc"])}
                for layer, v in res.items()
            }

        probes[label] = _cached(analysis_dir / f"probes_{label}.json", compute, log)

    return {
        "cka": {"within": within, "cross": cross, "fraction": largest, "images": a["cka_images"]},
        "attention_distance": {**attention, **attention_meta},
        "probes": {**probes, "fraction": largest},
    }


def tokenizer_comparison(cfg: StudyConfig, study_dir: Path, train_images_full: int, log=print) -> list[dict]:
    """The same ViT recipe with each image tokenizer, at the largest fraction (issue: tokenizers)."""
    if not cfg.tokenizers:
        return []
    base = next((m for m in cfg.models if m.label == cfg.tokenizer_model), None) or next(
        m for m in cfg.models if m.model.startswith("vit")
    )
    rows = []
    for tok in cfg.tokenizers:
        spec = ModelSpec(
            label=f"tok-{tok}",
            model=base.model,
            model_args={**base.model_args, "tokenizer": tok},
            train=base.train,
        )
        name = run_name(spec.label, cfg.fractions[-1], cfg.seeds[0])
        run_dir = study_dir / "runs" / name
        if not is_finished(run_dir):
            log(f"tokenizer comparison: {name}")
            train(
                _recipe(cfg, spec, cfg.fractions[-1], cfg.seeds[0], run_dir, train_images_full), resume=True
            )
        summary = json.loads((run_dir / "summary.json").read_text())
        model, _ = load_run_model(run_dir)
        rows.append(
            {
                "tokenizer": tok,
                "test_top1": summary["test_top1"],
                "tokens_per_image": int(model.patch_embed.num_patches),
                "flops_per_image": summary["flops_per_image"],
                "img_per_s": summary["img_per_s"],
                "params": summary["params"],
                "run_dir": f"runs/{name}",
            }
        )
    return rows


def run_study(cfg: StudyConfig, log=print) -> Path:
    """Run the whole study into ``cfg.out``; returns the report path."""
    from ..data import build_data
    from .report import build_report

    study_dir = Path(cfg.out)
    study_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(study_dir / "study_config.yaml")
    t0 = time.perf_counter()
    train_full, test_ds, info = build_data(cfg.data, cfg.data_dir)
    records = train_all(cfg, study_dir, len(train_full), log)
    tokenizer_rows = tokenizer_comparison(cfg, study_dir, len(train_full), log)
    if int(os.environ.get("RANK", "0")) > 0:
        return study_dir / "report.html"  # under torchrun, rank 0 alone analyses and reports
    results = {
        "title": cfg.title,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "dataset": {
            "name": cfg.data,
            "train_images_full": len(train_full),
            "test_images": len(test_ds),
            "num_classes": info.num_classes,
            "img_size": info.img_size,
        },
        "runs": records,
        **analyse(cfg, study_dir, records, log),
        "tokenizers": tokenizer_rows,
    }
    results["elapsed_s"] = time.perf_counter() - t0
    (study_dir / "results.json").write_text(json.dumps(results, indent=1))
    report = build_report(study_dir)
    log(f"report: {report}")
    return report

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

from ..models.loading import load_run_model
from ..train import TrainConfig, has_checkpoint, is_finished, train
from ..train.run_folder import last_record
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
    # ... and ten checkpoints are enough to resume a killed study without writing one per tiny epoch.
    recipe.setdefault("checkpoint_every", max(1, math.ceil(epochs / 10)))
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


def _train_or_resume(recipe: TrainConfig, run_dir: Path) -> None:
    """A killed run continues from its last checkpoint; one that never saved one starts over."""
    train(recipe, resume=has_checkpoint(run_dir))


def train_all(cfg: StudyConfig, study_dir: Path, train_images_full: int, log=print) -> list[dict]:
    """Train (or reuse, or resume) every (model, fraction, seed); return one record per run."""
    records = []
    jobs = [(spec, f, s) for f in cfg.fractions for s in cfg.seeds for spec in cfg.models]
    # min_steps raises the epochs of small fractions: say so once rather than silently.
    raised = []
    for spec in cfg.models:
        asked = int({**cfg.train, **spec.train}.get("epochs", 10))
        for f in cfg.fractions:
            got = _recipe(cfg, spec, f, cfg.seeds[0], study_dir, train_images_full).epochs
            if got > asked:
                raised.append(f"{spec.label} at fraction {f:g}: {asked} -> {got}")
    if raised:
        log(f"min_steps={cfg.min_steps} raises the epochs (to take that many steps): {'; '.join(raised)}")
    for i, (spec, fraction, seed) in enumerate(jobs, 1):
        name = run_name(spec.label, fraction, seed)
        run_dir = study_dir / "runs" / name
        if is_finished(run_dir):
            log(f"[{i}/{len(jobs)}] {name}: finished earlier, reused")
        else:
            recipe = _recipe(cfg, spec, fraction, seed, run_dir, train_images_full)
            asked = int({**cfg.train, **spec.train}.get("epochs", 10))
            epochs = f"{recipe.epochs} epochs" + (
                f" (raised from {asked} to reach min_steps {cfg.min_steps})" if recipe.epochs != asked else ""
            )
            resuming = " (resuming)" if has_checkpoint(run_dir) else ""
            log(f"[{i}/{len(jobs)}] {name}: training{resuming}, {epochs}")
            _train_or_resume(recipe, run_dir)
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
                # what the run saw; a run from before summary.json had "steps" has them in its metrics
                "steps": summary.get("steps", last_record(run_dir / "metrics.jsonl").get("step")),
                "images_seen": summary.get("images_seen"),
                "run_dir": f"runs/{name}",
            }
        )
    return records


def _cached(path: Path, compute, log=print):
    """Analysis results are JSON files; a resumed study reuses them.

    Under torchrun every rank computes (each on its share of the batches) and rank 0 alone reads
    and writes the file; whether it exists is rank 0's answer, so all ranks take the same branch.
    """
    from ..analysis.distributed import is_main_process, main_process_says

    main = is_main_process()
    if main_process_says(path.exists()):
        if main:
            log(f"  {path.name}: reused")
            return json.loads(path.read_text())
        return None
    t0 = time.perf_counter()
    value = compute()
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
        log(f"  {path.name}: {time.perf_counter() - t0:.1f} s")
    return value


ANALYSIS_DEFAULTS = {
    "cka_images": 256,
    "attention_images": 128,
    "probe_train_images": 500,
    "probe_test_images": 250,
    "batch_size": 64,
}


def _cka_results(models: dict, vit_labels: list[str], loader, analysis_dir: Path, log) -> tuple[dict, list]:
    """CKA within each model, and across every ViT x CNN pair."""
    from ..analysis import cka_matrix

    within = {}
    for label, model in models.items():

        def within_model(model=model):
            matrix, names, _ = cka_matrix(model, None, loader(), progress=False)
            return {"matrix": matrix.tolist(), "names": list(names)}

        within[label] = _cached(analysis_dir / f"cka_{label}.json", within_model, log)
    cross = []
    for va in vit_labels:
        for cb in (label for label in models if label not in vit_labels):

            def vit_x_cnn(va=va, cb=cb):
                matrix, names_a, names_b = cka_matrix(models[va], models[cb], loader(), progress=False)
                return {"a": va, "b": cb, "matrix": matrix.tolist(), "names_a": names_a, "names_b": names_b}

            cross.append(_cached(analysis_dir / f"cka_{va}_x_{cb}.json", vit_x_cnn, log))
    return within, cross


def _attention_results(cfg: StudyConfig, study_dir: Path, vit_labels: list[str], loader, log) -> dict:
    """Mean attention distance of every ViT at every fraction (seed 0)."""
    from ..analysis import mean_attention_distance

    attention = {}
    for label in vit_labels:
        per_fraction = {}
        for fraction in cfg.fractions:

            def distances(label=label, fraction=fraction):
                model, _ = load_run_model(study_dir / "runs" / run_name(label, fraction, cfg.seeds[0]))
                return mean_attention_distance(model, loader()).tolist()

            path = study_dir / "analysis" / f"attention_{label}_f{fraction:g}.json"
            per_fraction[f"{fraction:g}"] = _cached(path, distances, log)
        attention[label] = per_fraction
    return attention


def _probe_results(models: dict, train_loader, test_loader, analysis_dir: Path, log) -> dict:
    """Per-token class and position probes of every model."""
    from ..analysis import localization_probes

    probes = {}
    for label, model in models.items():

        def accuracies(model=model):
            res = localization_probes(model, train_loader(), test_loader())
            return {
                layer: {"class_acc": float(v["class_acc"]), "position_acc": float(v["position_acc"])}
                for layer, v in res.items()
            }

        probes[label] = _cached(analysis_dir / f"probes_{label}.json", accuracies, log)
    return probes


def analyse(cfg: StudyConfig, study_dir: Path, records: list[dict], log=print) -> dict:
    """CKA, attention distance and localization probes on the trained models.

    Under torchrun (``torchrun --nproc_per_node=W -m vitlens study ...``) every rank joins and
    each analysis splits its batches across the ranks (:mod:`vitlens.analysis.distributed`).
    """
    from ..analysis.common import image_subset, is_vit
    from ..analysis.distributed import init_from_torchrun
    from ..data import build_data

    a = {**ANALYSIS_DEFAULTS, **cfg.analysis}
    train_full, _, _ = build_data(cfg.data, cfg.data_dir, augment=False)
    _, test_ds, info = build_data(cfg.data, cfg.data_dir)

    def loader(key: str, dataset=test_ds):
        # The same seeded random subset for every model (folders are stored class by class).
        subset = image_subset(dataset, int(a[key]), seed=0)
        return lambda: torch.utils.data.DataLoader(subset, batch_size=int(a["batch_size"]), shuffle=False)

    joined = init_from_torchrun("cpu")  # training left the process group; the analyses run on CPU
    try:
        analysis_dir = study_dir / "analysis"
        largest = cfg.fractions[-1]
        models = {
            spec.label: load_run_model(study_dir / "runs" / run_name(spec.label, largest, cfg.seeds[0]))[0]
            for spec in cfg.models
        }
        vit_labels = [label for label, m in models.items() if is_vit(m)]
        log("analysis: CKA")
        within, cross = _cka_results(models, vit_labels, loader("cka_images"), analysis_dir, log)
        log("analysis: mean attention distance")
        attention = _attention_results(cfg, study_dir, vit_labels, loader("attention_images"), log)
        log("analysis: localization probes")
        probes = _probe_results(
            models, loader("probe_train_images", train_full), loader("probe_test_images"), analysis_dir, log
        )
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    vit0 = models[vit_labels[0]] if vit_labels else None
    return {
        "vit_labels": vit_labels,
        "cka": {"within": within, "cross": cross, "fraction": largest, "images": a["cka_images"]},
        "attention_distance": {
            **attention,
            "img_size": info.img_size,
            "patch_size": int(vit0.patch_embed.patch_size[0]) if vit0 is not None else None,
        },
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
            _train_or_resume(
                _recipe(cfg, spec, cfg.fractions[-1], cfg.seeds[0], run_dir, train_images_full), run_dir
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

    if cfg.pretrained:  # Raghu et al. on the hubs' models: nothing to train
        from .pretrained import run_pretrained_study

        return run_pretrained_study(cfg, log)
    study_dir = Path(cfg.out)
    study_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(study_dir / "study_config.yaml")
    t0 = time.perf_counter()
    train_full, test_ds, info = build_data(cfg.data, cfg.data_dir)
    records = train_all(cfg, study_dir, len(train_full), log)
    tokenizer_rows = tokenizer_comparison(cfg, study_dir, len(train_full), log)
    main = int(os.environ.get("RANK", "0")) == 0
    analysis = analyse(cfg, study_dir, records, log if main else lambda *_: None)  # every rank joins
    if not main:
        return study_dir / "report.html"  # rank 0 alone writes results and the report
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
        **analysis,
        "tokenizers": tokenizer_rows,
    }
    results["elapsed_s"] = time.perf_counter() - t0
    (study_dir / "results.json").write_text(json.dumps(results, indent=1))
    report = build_report(study_dir)
    log(f"report: {report}")
    return report

"""The study report: ``STUDY_DIR/results.json`` -> one self-contained ``report.html``.

The report is rebuilt from saved numbers only (``vitlens report STUDY_DIR``), never retrains.
Layout of what it writes::

    STUDY_DIR/report.html             one file: inline CSS, figures as base64 PNG data URIs
    STUDY_DIR/figures/*.png           the same figures as files (CKA and attention ones with their
                                      numbers as .json/.csv beside them, from vitlens.analysis.plots)
    STUDY_DIR/figures/runs.csv        one row per trained run
    STUDY_DIR/figures/data_hunger.csv mean/std test top-1 per (label, fraction) over seeds
    STUDY_DIR/figures/cka_summary.json adjacent vs distant-layer CKA per model, best cross-model matches
    STUDY_DIR/figures/attention_distance.csv  one row per (label, fraction, layer, head)
    STUDY_DIR/figures/probes.csv      one row per (label, layer)

Each section states a claim from the literature, shows the figure, and gives ONE sentence
computed from this study's numbers (``*_finding`` functions: pure, testable). A part missing
from results.json yields a visible "not measured in this study" note, not a crash.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import NamedTuple

import numpy as np

from ..analysis import plots
from ..errors import DataError, MissingFileError
from . import figures
from .figures import fmt_fraction

CITE_VIT = "Dosovitskiy et al. 2020"
CITE_RAGHU = "Raghu et al. 2021"
CITE_CKA = "Kornblith et al. 2019"
REFERENCES = [
    ("Dosovitskiy et al. 2020", "An Image is Worth 16x16 Words: Transformers for Image Recognition at "
     "Scale. ICLR 2021, arXiv:2010.11929."),
    ("Raghu et al. 2021", "Do Vision Transformers See Like Convolutional Neural Networks? "
     "NeurIPS 2021, arXiv:2108.08810."),
    ("Kornblith et al. 2019", "Similarity of Neural Network Representations Revisited. ICML 2019, "
     "arXiv:1905.00414."),
]
GAP_TOL = 0.5  # points of top-1: smaller changes in the ViT-CNN gap count as "unchanged"
CKA_TOL = 0.02  # CKA differences below this count as "about as uniform"
LOCAL_TOL = 0.05  # relative change in head distance below this counts as "unchanged"
PROBE_TOL = 2.0  # points of probe accuracy
TEMPLATE = Path(__file__).with_name("report_template.html")  # page skeleton: CSS + figure self-check
OUTPUT_FILES = ["data_hunger.png", "cka_*.png", "cka_*.json", "cka_*.csv", "attention_distance*.png",
                "attention_distance*.json", "attention_distance.csv", "probes.png", "runs.csv",
                "data_hunger.csv", "probes.csv", "tokenizers.csv"]


# ----------------------------------------------------------------------------- reading
def load_results(study_dir: str | Path) -> dict:
    """Read and sanity-check ``STUDY_DIR/results.json``."""
    path = Path(study_dir) / "results.json"
    if not path.is_file():
        raise MissingFileError(f"{path} not found; `vitlens study` writes it when the study has run "
                                f"(is {study_dir} a study directory?)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); rerun `vitlens study` to rewrite it") from None
    runs = results.get("runs")
    if not runs:
        raise DataError(f"{path} has no 'runs'; the report needs at least one trained run")
    for i, run in enumerate(runs):
        missing = [k for k in ("label", "fraction", "seed", "test_top1") if k not in run]
        if missing:
            raise DataError(f"{path}: runs[{i}] lacks {missing}; "
                             "was results.json written by `vitlens study`?")
    return results


def _labels(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["label"] for r in runs))


def vit_labels(results: dict) -> list[str]:
    """Labels of Vision Transformers: those the study recorded as ViTs (``vit_labels``, decided by
    :func:`vitlens.analysis.common.is_vit` on the trained models). A results.json without that list
    (written before it existed, or by hand): model name 'vit*'/'deit*', or present in the attention results.
    """
    if "vit_labels" in results:
        return [label for label in _labels(results["runs"]) if label in results["vit_labels"]]
    att = results.get("attention_distance") or {}
    named_vit = {r["label"] for r in results["runs"]
                 if str(r.get("model", "")).lower().startswith(("vit", "deit"))}
    return [label for label in _labels(results["runs"]) if label in att or label in named_vit]


def _pool(results: dict, label: str) -> str:
    """'cls' or 'gap' for a ViT label (model_args first, then the label's name)."""
    for r in results["runs"]:
        if r["label"] == label and "pool" in (r.get("model_args") or {}):
            return str(r["model_args"]["pool"]).lower()
    return "gap" if "gap" in label.lower() else "cls"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------- 1. data hunger
def data_hunger_rows(runs: list[dict]) -> list[dict]:
    """Mean and sample std (ddof=1; None with one seed) of test top-1 per (label, fraction)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        if r.get("test_top1") is not None:  # a run trained without evaluation has no accuracy
            groups.setdefault((r["label"], float(r["fraction"])), []).append(r)
    order = _labels(runs)
    rows = []
    for (label, fraction), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        top1 = np.array([float(r["test_top1"]) for r in rs])
        rows.append({"label": label, "fraction": fraction,
                     "train_images": int(round(np.mean([r.get("train_images", 0) for r in rs]))),
                     "seeds": len(rs), "top1_mean": float(top1.mean()),
                     "top1_std": float(top1.std(ddof=1)) if len(rs) >= 2 else None})
    return rows


def data_hunger_finding(rows: list[dict], vits: list[str]) -> str:
    """One sentence: the best ViT vs the best CNN at the smallest and the largest fraction."""
    cnns = [r["label"] for r in rows if r["label"] not in vits]
    if not vits or not cnns:
        family = "CNN" if not cnns else "ViT"
        return f"No {family} was trained in this study, so the ViT-vs-CNN gap is not measured."

    def best(labels, f):
        return max((r for r in rows if r["label"] in labels and r["fraction"] == f),
                   key=lambda r: r["top1_mean"])

    fracs = sorted({r["fraction"] for r in rows if r["label"] in vits}
                   & {r["fraction"] for r in rows if r["label"] in cnns})
    if not fracs:
        return "The ViTs and CNNs were trained on different data fractions, so their gap is not measured."

    def describe(f, first):
        v, c = best(vits, f), best(cnns, f)
        d = v["top1_mean"] - c["top1_mean"]
        where = (f"At {fmt_fraction(f)} of the data ({v['train_images']:,} images)" if first
                 else f"at {fmt_fraction(f)} ({v['train_images']:,} images)")
        verb = "trails" if d < 0 else "leads"
        vit_name = f"the best ViT, {v['label']}" if len(vits) > 1 else f"the {v['label']}"
        return (f"{where} {vit_name} ({v['top1_mean']:.1f}%) {verb} the {c['label']} ({c['top1_mean']:.1f}%) "
                f"by {abs(d):.1f} points"), d, c["label"]

    first, d_small, cnn = describe(fracs[0], True)
    if len(fracs) == 1:
        return f"{first}; only one data fraction was measured, so the gap's trend with data is not measured."
    last, d_large, _ = describe(fracs[-1], False)
    change = d_large - d_small  # > 0: the ViT gained on the CNN as data grew
    if change > GAP_TOL:
        trend = ("the gap narrowed as data grew" if d_small < 0 and d_large <= 0
                 else f"the ViT overtook the {cnn} as data grew" if d_small < 0
                 else "the ViT's lead grew with data")
    elif change < -GAP_TOL:
        trend = ("the gap did not narrow: it widened as data grew" if d_small <= 0 else
                 "the ViT's lead shrank as data grew" if d_large >= 0 else "the ViT fell behind as data grew")
    else:
        trend = f"the gap did not narrow (it changed by less than {GAP_TOL} points)"
    return f"{first}; {last} — {trend}."


# ----------------------------------------------------------------------------- 2. representation structure
def cka_structure(matrix) -> dict:
    """Mean CKA between adjacent layers and between layers at least half the depth apart."""
    m = np.asarray(matrix, dtype=float)
    m = (m + m.T) / 2  # within-model CKA is symmetric; average out numerical asymmetry
    n = m.shape[0]
    if n < 2:
        return {"layers": n, "adjacent_mean": None, "distant_mean": None, "distant_min_gap": None}
    gap = math.ceil(n / 2)
    i, j = np.triu_indices(n, k=1)
    return {"layers": n, "adjacent_mean": float(np.mean(np.diagonal(m, 1))),
            "distant_mean": float(m[i, j][(j - i) >= gap].mean()), "distant_min_gap": gap}


def cka_summary(cka: dict) -> dict:
    within = {label: cka_structure(v["matrix"]) for label, v in (cka.get("within") or {}).items()}
    cross = []
    for c in cka.get("cross") or []:
        m = np.asarray(c["matrix"], dtype=float)  # (layers of a, layers of b)
        best = m.argmax(axis=1)
        cross.append({"a": c["a"], "b": c["b"], "mean_best_match": float(m.max(axis=1).mean()),
                      "best_match": {na: c["names_b"][k] for na, k in zip(c["names_a"], best)}})
    return {"fraction": cka.get("fraction"), "images": cka.get("images"), "within": within, "cross": cross}


def cka_finding(summary: dict, vits: list[str]) -> str:
    w = {k: v for k, v in summary["within"].items() if v["distant_mean"] is not None}
    v_labels = [k for k in w if k in vits]
    c_labels = [k for k in w if k not in vits]
    if not w:
        return "No model had two or more layers compared, so representation structure is not measured."
    fmt = lambda labels: _join([f"{w[k]['distant_mean']:.2f} ({k})" for k in labels])
    adj = lambda labels: _join([f"{w[k]['adjacent_mean']:.2f}" for k in labels])
    if not v_labels or not c_labels:
        return (f"Layers at least half the depth apart have mean CKA {fmt(list(w))} (adjacent layers "
                f"{adj(list(w))}); no {'CNN' if not c_labels else 'ViT'} was compared, "
                "so ViT vs CNN is not measured.")
    v_mean = np.mean([w[k]["distant_mean"] for k in v_labels])
    c_mean = np.mean([w[k]["distant_mean"] for k in c_labels])
    vit_word = "ViT's" if len(v_labels) == 1 else "ViTs'"
    cnn_name = f"the {c_labels[0]}'s" if len(c_labels) == 1 else "the CNNs'"
    reps = f"the {vit_word} representations are"
    if v_mean > c_mean + CKA_TOL:
        verdict = f"{reps} more uniform across depth than {cnn_name}, as {CITE_RAGHU} report"
    elif v_mean < c_mean - CKA_TOL:
        verdict = f"{reps} less uniform across depth than {cnn_name}, unlike {CITE_RAGHU}"
    else:
        verdict = f"{reps} about as uniform across depth as {cnn_name}"
    return (f"Layers at least half the depth apart have mean CKA {fmt(v_labels)} vs {fmt(c_labels)} "
            f"(adjacent layers: {adj(v_labels)} vs {adj(c_labels)}) — {verdict}.")


# ----------------------------------------------------------------------------- 3. attention distance
def attention_distances(results: dict) -> dict[str, dict[str, np.ndarray]]:
    """{label: {fraction: (layers, heads) array}}; the metadata keys (img_size, ...) are skipped."""
    att = results.get("attention_distance") or {}
    return {label: {f: np.asarray(layers, dtype=float) for f, layers in per.items()}
            for label, per in att.items() if isinstance(per, dict) and per}


def attention_finding(dist: dict[str, dict[str, np.ndarray]]) -> str:
    """Lower-third heads' min / median distance at the smallest vs largest fraction, per ViT."""
    parts, medians, more, less = [], [], [], []
    lo_f = hi_f = None
    for label, per in dist.items():
        fracs = sorted(per, key=float)
        if len(fracs) < 2:
            continue
        lo_f, hi_f = fracs[0], fracs[-1]
        n_low = max(1, math.ceil(per[lo_f].shape[0] / 3))  # first third of the layers
        small, large = per[lo_f][:n_low].ravel(), per[hi_f][:n_low].ravel()
        parts.append(f"from {small.min():.1f} to {large.min():.1f} px in {label}")
        medians.append(f"{np.median(small):.1f} → {np.median(large):.1f} px")
        (more if large.min() < (1 - LOCAL_TOL) * small.min() else less).append(label)
    if not parts:
        return ("Attention distance was measured at a single data fraction only, so whether lower layers "
                "become more local with data is not measured in this study.")
    if not less:
        verdict = "the lower layers became more local with more data"
    elif not more:
        verdict = "the lower layers did not become more local with more data"
    else:
        verdict = f"the lower layers became more local with more data in {_join(more)}, not in {_join(less)}"
    return (f"From {fmt_fraction(lo_f)} to {fmt_fraction(hi_f)} of the data, the most local head in the "
            f"first third of layers went {_join(parts)} (median head: {_join(medians)}) — {verdict}.")


# ----------------------------------------------------------------------------- 4. probes
def probe_rows(results: dict) -> dict[str, list[dict]]:
    """{label: rows in layer order with relative depth 0..1}; accuracies in percent.

    Accuracies stored as fractions (every value <= 1) are converted to percent.
    """
    probes = {k: v for k, v in (results.get("probes") or {}).items() if isinstance(v, dict) and v}
    values = [float(x[k]) for per in probes.values() for x in per.values()
              for k in ("class_acc", "position_acc")]
    scale = 100.0 if values and max(values) <= 1.0 else 1.0
    out = {}
    for label, per in probes.items():
        n = len(per)
        out[label] = [{"layer_index": i, "layer": name, "relative_depth": i / (n - 1) if n > 1 else 1.0,
                       "class_acc": scale * float(v["class_acc"]),
                       "position_acc": scale * float(v["position_acc"])}
                      for i, (name, v) in enumerate(per.items())]
    return out


def probe_finding(rows: dict[str, list[dict]], results: dict, vits: list[str]) -> str:
    last = {label: rs[-1]["position_acc"] for label, rs in rows.items()}
    cls = [k for k in last if k in vits and _pool(results, k) == "cls"]
    gap = [k for k in last if k in vits and _pool(results, k) == "gap"]
    cnn = [k for k in last if k not in vits]
    listed = _join([f"{last[k]:.1f}% for {k}" for k in cls + gap + cnn])
    head = f"At the last layer, the probe recovers a token's position with {listed}"
    if not cls or not gap:
        return f"{head}; no [CLS]/pooled ViT pair was probed, so [CLS] vs pooling is not measured."
    c, g = np.mean([last[k] for k in cls]), np.mean([last[k] for k in gap])
    kept = "positional information in its last-layer tokens than the pooled one"
    if c < g - PROBE_TOL:
        verdict = f"the [CLS] ViT kept less {kept}, unlike {CITE_RAGHU}"
    elif c > g + PROBE_TOL:
        verdict = f"the [CLS] ViT kept more {kept}, as {CITE_RAGHU} found"
    else:
        verdict = "the [CLS] and pooled ViTs kept about as much positional information in their last layer"
    return f"{head} — {verdict}."


# ----------------------------------------------------------------------------- files
def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
                        for k, v in r.items()})


# ----------------------------------------------------------------------------- HTML pieces
e = html.escape


def _table(header: list[str], rows: list[list[str]], text_cols: int = 1) -> str:
    """``rows`` hold already-escaped HTML cells; the first ``text_cols`` columns are left-aligned."""
    cls = lambda i: ' class="text"' if i < text_cols else ""
    th = "".join(f"<th{cls(i)}>{e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}">'
            f"<figcaption>{e(caption)} (<code>figures/{e(path.name)}</code>)</figcaption></figure>")


def _figure_row(figs: list[tuple[Path, str]], caption: str) -> str:
    """Several figures side by side (wrapping), one caption."""
    imgs = "".join(f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode("ascii")}" '
                   f'alt="{e(alt)}">' for p, alt in figs)
    files = ", ".join(f"<code>figures/{e(p.name)}</code>" for p, _ in figs)
    return f'<figure><div class="figrow">{imgs}</div><figcaption>{e(caption)} ({files})</figcaption></figure>'


def _slug(label: str) -> str:
    """A label as a file-name part: 'ViT-CLS' -> 'ViT-CLS', 'ViT/B 16' -> 'ViT_B_16'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def _missing(what: str) -> str:
    return f'<p class="missing">Not measured in this study: {e(what)}.</p>'


def _section(title: str, claim: str | None, body: str, finding: str | None, intro: str = "") -> str:
    """A heading, the literature's claim (HTML), the figure/table, and this study's finding (text)."""
    out = f"<section><h2>{e(title)}</h2>"
    out += f'<p class="claim"><b>Claim.</b> {claim}</p>' if claim else f"<p>{intro}</p>"
    out += body
    if finding:
        out += f'<p class="finding"><b>This study.</b> {e(finding)}</p>'
    return out + "</section>"


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _intro(results: dict, study_dir: Path) -> str:
    runs, cfg, ds = results["runs"], results.get("config") or {}, results.get("dataset") or {}
    labels = _labels(runs)
    fracs = sorted({float(r["fraction"]) for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    epochs = sorted({r["epochs"] for r in runs if "epochs" in r})
    total_s = sum(float(r.get("train_time_s") or 0) for r in runs)
    wall = (f" (the whole study, analyses included, took {results['elapsed_s'] / 60:.1f} min)"
            if results.get("elapsed_s") else "")
    if ds:
        data = (f"<b>{e(str(ds.get('name', '?')))}</b>: {ds.get('train_images_full', 0):,} training and "
                f"{ds.get('test_images', 0):,} test images, {ds.get('num_classes', '?')} classes, "
                f"{ds.get('img_size', '?')}×{ds.get('img_size', '?')} pixels.")
    else:
        data = "The dataset description is not recorded in results.json."
    recipe = cfg.get("train") or {}
    recipe_s = ", ".join(f"{k}={v}" for k, v in recipe.items()) or "the trainer's defaults"
    models = []
    for label in labels:
        r = next(r for r in runs if r["label"] == label)
        args = ", ".join(f"{k}={v}" for k, v in (r.get("model_args") or {}).items())
        models.append([e(label), f"<code>{e(str(r.get('model', '?')))}</code>", e(args) or "–",
                       _num(r.get("params") and r["params"] / 1e6, ".2f")])
    more_epochs = (f" (small fractions get more epochs: every run takes at least {cfg['min_steps']:,} "
                   "optimiser steps)" if cfg.get("min_steps") else "")
    fracs_s, seeds_s = ", ".join(fmt_fraction(f) for f in fracs), ", ".join(map(str, seeds))
    epochs_s = ", ".join(map(str, epochs)) or "?"
    cfg_file = study_dir / "study_config.yaml"
    cmd = (f"vitlens study --config {cfg_file}" if cfg_file.is_file()
           else f"vitlens study --out {cfg.get('out', study_dir)}")
    return (f"<h1>{e(results.get('title') or 'vitlens study')}</h1>"
            f"<p class=\"meta\">Study directory <code>{e(str(study_dir))}</code> · created "
            f"{e(str(results.get('created', 'unknown')))}</p>"
            "<p>This report compares Vision Transformers (ViTs) with a convolutional network trained with "
            "<b>one shared recipe</b> on nested subsets of the same training set, then looks inside the "
            "trained models: how similar their layers are, how far their attention heads look, and where "
            "the spatial information survives. Every number below is measured in this study; the "
            "literature's claims are stated beside them for comparison.</p>"
            f"<p><b>Data.</b> {data}</p>"
            f"<p><b>Budget.</b> {len(runs)} runs: fractions {e(fracs_s)} of the training set × seeds "
            f"{e(seeds_s)} × {len(labels)} models; epochs {e(epochs_s)}{e(more_epochs)}; recipe "
            f"<code>{e(recipe_s)}</code>; {total_s / 60:.1f} min of training in total{e(wall)}.</p>"
            + _table(["label", "model", "model arguments", "params (M)"], models, text_cols=3)
            + f"<p><b>Reproduce.</b> <code>{e(cmd)}</code> retrains what is missing and rebuilds this page; "
            f"<code>vitlens report {e(str(study_dir))}</code> only rebuilds the page from "
            "<code>results.json</code>.</p>"
            "<details><summary>Resolved study configuration</summary>"
            f"<pre>{e(json.dumps(cfg, indent=2))}</pre></details>")


# ----------------------------------------------------------------------------- the sections
@dataclass
class _Page:
    """What every section reads: the results, where figures go, which labels are ViTs, their colours."""

    results: dict
    fig_dir: Path
    vits: list[str]
    colors: dict[str, str]

    @property
    def runs(self) -> list[dict]:
        return self.results["runs"]


class _Part(NamedTuple):
    body: str  # figures and tables (HTML)
    finding: str | None = None  # this study's one sentence (text)
    note: str = ""  # appended to the claim (text): what the models and images were


def _data_hunger_part(page: _Page) -> _Part:
    dh = data_hunger_rows(page.runs)
    if not dh:
        return _Part(_missing("test accuracy (no run in results.json has a test_top1)"))
    _write_csv(page.fig_dir / "data_hunger.csv", dh)
    seeds = max(r["seeds"] for r in dh)
    spread = f"mean ± std over {seeds} seeds" if seeds >= 2 else "one seed, so no error bars"
    png = figures.plot_data_hunger(dh, page.fig_dir / "data_hunger.png", page.colors)
    return _Part(_figure(png, "Test top-1 vs training images (log scale); " + spread),
                 data_hunger_finding(dh, page.vits))


def _cka_heatmaps(page: _Page, cka: dict, summary: dict) -> str:
    fig_dir = page.fig_dir
    if cka.get("within"):
        body = _figure_row([
            (plots.plot_cka_heatmap(v["matrix"], v["names"], v["names"],
                                    fig_dir / f"cka_{_slug(label)}.png", f"CKA within {label}",
                                    label_a=label, label_b=label), label)
            for label, v in cka["within"].items()],
            "Linear CKA between every pair of layers within each model (1 = same representation)")
        body += _table(["model", "layers", "adjacent layers", "layers ≥ half the depth apart"],
                       [[e(k), str(v["layers"]), _num(v["adjacent_mean"], ".3f"),
                         _num(v["distant_mean"], ".3f")] for k, v in summary["within"].items()])
    else:
        body = _missing("CKA within each model")
    if not cka.get("cross"):
        return body + _missing("cross-model (ViT × CNN) CKA")
    return body + _figure_row([
        (plots.plot_cka_heatmap(c["matrix"], c["names_a"], c["names_b"],
                                fig_dir / f"cka_{_slug(c['a'])}_x_{_slug(c['b'])}.png",
                                f"CKA {c['a']} × {c['b']}", label_a=c["a"], label_b=c["b"]),
         f"{c['a']} × {c['b']}") for c in cka["cross"]],
        "Linear CKA between each ViT layer (rows) and each CNN layer (columns)")


def _cka_part(page: _Page) -> _Part:
    cka = page.results.get("cka") or {}
    if not (cka.get("within") or cka.get("cross")):
        return _Part(_missing("CKA (results.json has no 'cka')"))
    summary = cka_summary(cka)
    (page.fig_dir / "cka_summary.json").write_text(json.dumps(summary, indent=1))
    where = (f" Models trained on {fmt_fraction(cka['fraction'])} of the data; CKA on "
             f"{cka.get('images', '?')} test images." if cka.get("fraction") is not None else "")
    return _Part(_cka_heatmaps(page, cka, summary), cka_finding(summary, page.vits), where)


def _attention_part(page: _Page) -> _Part:
    dist = attention_distances(page.results)
    if not dist:
        return _Part(_missing("attention distance (no ViT in results.json's 'attention_distance')"))
    _write_csv(page.fig_dir / "attention_distance.csv",
               [{"label": label, "fraction": float(f), "layer": i, "head": h, "distance_px": float(d)}
                for label, per in dist.items() for f, arr in per.items()
                for i, heads in enumerate(arr) for h, d in enumerate(heads)])
    figs = []
    for label, per in dist.items():
        by_fraction = {f"{fmt_fraction(f)} of data": per[f] for f in sorted(per, key=float)}
        png = plots.plot_attention_distance(by_fraction,
                                            page.fig_dir / f"attention_distance_{_slug(label)}.png",
                                            f"Mean attention distance per head, {label}")
        figs.append((png, label))
    caption = ("Mean attention distance of each head (pixels, over patch queries) vs layer; "
               "colour = data fraction")
    return _Part(_figure_row(figs, caption), attention_finding(dist))


def _probes_part(page: _Page) -> _Part:
    prows = probe_rows(page.results)
    if not prows:
        return _Part(_missing("localization probes (results.json has no 'probes')"))
    _write_csv(page.fig_dir / "probes.csv", [{"label": k, **r} for k, rs in prows.items() for r in rs])
    pf = (page.results.get("probes") or {}).get("fraction")
    caption = "Linear-probe accuracy per layer at relative depth" + (
        f", models trained on {fmt_fraction(pf)} of the data" if pf is not None else "")
    png = figures.plot_probes(prows, page.fig_dir / "probes.png", page.colors)
    return _Part(_figure(png, caption), probe_finding(prows, page.results, page.vits))


def _run_row(r: dict) -> list[str]:
    href = r.get("run_dir")
    train_s = r.get("train_time_s")
    return [e(r["label"]), f"<code>{e(str(r.get('model', '?')))}</code>", fmt_fraction(r["fraction"]),
            str(r["seed"]), f"{r.get('train_images', 0):,}", _num(r.get("epochs"), ",d"),
            _num(r.get("steps"), ",d"), _num(r.get("images_seen"), ",d"),
            _num(r.get("params") and r["params"] / 1e6, ".2f"),
            _num(r.get("flops_per_image") and r["flops_per_image"] / 1e9, ".3f"),
            _num(train_s, ",.0f" if (train_s or 0) >= 10 else ".1f"), _num(r.get("img_per_s"), ",.0f"),
            _num(r.get("test_top1"), ".2f"), f'<a href="{e(href)}">{e(href)}</a>' if href else "–"]


def _runs_part(page: _Page) -> _Part:
    runs = page.runs
    _write_csv(page.fig_dir / "runs.csv", runs)
    order = _labels(runs)
    rows = [_run_row(r)
            for r in sorted(runs, key=lambda r: (order.index(r["label"]), r["fraction"], r["seed"]))]
    return _Part(_table(["label", "model", "fraction", "seed", "train images", "epochs", "steps",
                         "images seen", "params (M)", "GFLOPs/img", "train time (s)", "img/s",
                         "test top-1 (%)", "run directory"], rows, text_cols=2))


def _tokenizers_part(page: _Page) -> _Part | None:
    toks = page.results.get("tokenizers") or []
    if not toks:
        return None  # optional: no section at all
    _write_csv(page.fig_dir / "tokenizers.csv", toks)
    rows = [[e(t["tokenizer"]), _num(t.get("test_top1"), ".2f"), str(t.get("tokens_per_image", "–")),
             _num(t.get("flops_per_image") and t["flops_per_image"] / 1e9, ".3f"),
             _num(t.get("img_per_s"), ",.0f"), _num(t.get("params") and t["params"] / 1e6, ".2f"),
             f'<a href="{e(t["run_dir"])}">{e(t["run_dir"])}</a>' if t.get("run_dir") else "–"]
            for t in toks]
    return _Part(_table(["tokenizer", "test top-1 (%)", "tokens/img", "GFLOPs/img", "img/s", "params (M)",
                         "run directory"], rows))


# (title, the literature's claim (HTML) or None, intro when there is no claim, the part)
SECTIONS = [
    ("1. Data hunger: how much data does a ViT need?",
     f"ViTs lack the convolution's built-in locality and translation equivariance, so they "
     f"\"do not generalize well when trained on insufficient amounts of data\" and trail ResNets on "
     f"mid-sized datasets, overtaking them only with large-scale pre-training ({CITE_VIT}).", "",
     _data_hunger_part),
    ("2. Representation structure: uniform or stage-wise?",
     f"Comparing layers with linear CKA ({CITE_CKA}), ViTs have strikingly uniform representations: "
     f"lower and higher layers are more similar to each other than in a ResNet, whose representations "
     f"change in stages with depth; and ViT lower layers resemble ResNet lower layers only partly "
     f"({CITE_RAGHU}).", "", _cka_part),
    ("3. Local vs global attention",
     f"Some ViT heads attend globally already in the lowest layers while others stay local, a "
     f"convolution-like behaviour learned from data ({CITE_VIT}); with less training data the lower "
     f"layers do not learn to attend locally ({CITE_RAGHU}).", "", _attention_part),
    ("4. [CLS] token vs global average pooling",
     f"ViTs preserve spatial information: a ViT classifying from the [CLS] token keeps each last-layer "
     f"patch token tied to its own location, while one trained with global average pooling localizes "
     f"less clearly, though each of its tokens carries more class information ({CITE_RAGHU}, Section 5).",
     "", _probes_part),
    ("5. All runs", None,
     "Every run used the same recipe. Links open each run's directory (config, metrics, "
     "checkpoints); the table is also in <code>figures/runs.csv</code>.", _runs_part),
    ("6. Image tokenizers", None,
     "The same ViT recipe with different ways of turning an image into tokens (patches, pixels, "
     "vector-quantised codes, a CNN stem), at the largest data fraction.", _tokenizers_part),
]


# ----------------------------------------------------------------------------- the pretrained study
def pretraining_scale(model: str) -> str | None:
    """'large' for weights pretrained beyond ImageNet-1k (a 21k/22k/12k tag), '1k' for ImageNet-1k only."""
    name = model.lower()
    if any(t in name for t in ("21k", "22k", "12k", "jft", "laion", "clip")):
        return "large"
    return "1k" if "in1k" in name or "imagenet1k" in name else None


def top1_finding(runs: list[dict], vits: list[str]) -> str:
    """One sentence: each model's top-1, and the large-data ViT vs the ImageNet-1k-only ViT."""
    measured = [r for r in runs if r.get("test_top1") is not None]
    if not measured:
        return ("The images are not in ImageNet-1k class folders (wnid names such as n01440764), so top-1 "
                "is not measured; the analyses below need no labels beyond the folders.")
    listed = _join([f"{r['test_top1']:.1f}% for {r['label']}" for r in measured])
    head = f"On {measured[0].get('eval_images', '?'):,} images, top-1 is {listed}"
    large = [r for r in measured if r["label"] in vits and pretraining_scale(str(r.get("model"))) == "large"]
    small = [r for r in measured if r["label"] in vits and pretraining_scale(str(r.get("model"))) == "1k"]
    if not large or not small:
        return f"{head}; no ViT pair pretrained on more vs only ImageNet-1k data was evaluated."
    d = large[0]["test_top1"] - small[0]["test_top1"]
    verdict = (f"the ViT pretrained on more data leads the ImageNet-1k-only ViT by {d:.1f} points, as "
               f"{CITE_VIT} report" if d > GAP_TOL else
               f"the ViT pretrained on more data does not lead the ImageNet-1k-only ViT "
               f"({d:+.1f} points), unlike {CITE_VIT}")
    return f"{head} — {verdict}."


def pretrained_attention_finding(dist: dict[str, np.ndarray], large: str, small: str) -> str:
    """Lower-third heads of the large-data ViT vs the ImageNet-1k-only ViT (Raghu et al. Figure 5)."""
    low = {k: dist[k][: max(1, math.ceil(dist[k].shape[0] / 3))].ravel() for k in (large, small)}
    lo_min, sm_min = low[large].min(), low[small].min()
    med = f"median head {np.median(low[large]):.1f} vs {np.median(low[small]):.1f} px"
    head = (f"In the first third of the layers the most local head attends over {lo_min:.1f} px in {large} "
            f"and {sm_min:.1f} px in {small} ({med})")
    if sm_min > (1 + LOCAL_TOL) * lo_min:
        verdict = f"with less pretraining data the lower layers are less local, as {CITE_RAGHU} found"
    elif sm_min < (1 - LOCAL_TOL) * lo_min:
        verdict = f"the ImageNet-1k-only ViT's lower layers are the more local ones, unlike {CITE_RAGHU}"
    else:
        verdict = "both ViTs' lower layers are about as local"
    return f"{head} — {verdict}."


def _pretrained_models_part(page: _Page) -> _Part:
    runs = page.runs
    _write_csv(page.fig_dir / "runs.csv", runs)
    rows = []
    for r in runs:
        pre = r.get("preprocess") or {}
        prep = (f"resize {pre.get('resize')}, crop {pre.get('crop')}, {pre.get('interpolation')}, "
                f"mean {', '.join(f'{v:.3g}' for v in pre.get('mean', []))}") if pre else "–"
        rows.append([e(r["label"]), f"<code>{e(str(r.get('pretrained') or r.get('model')))}</code>", e(prep),
                     _num(r.get("params") and r["params"] / 1e6, ".1f"), _num(r.get("img_per_s"), ",.1f"),
                     _num(r.get("test_top1"), ".2f")])
    table = _table(["label", "pretrained weights", "preprocessing (the model's own)", "params (M)",
                    "analysis img/s", "top-1 (%)"], rows, text_cols=3)
    return _Part(table, top1_finding(runs, page.vits))


def _pretrained_cka_part(page: _Page) -> _Part:
    part = _cka_part(page)
    images = (page.results.get("cka") or {}).get("images")
    return part._replace(note=f" Here: the pretrained models, CKA on {images} images." if images else "")


def _pretrained_attention_part(page: _Page) -> _Part:
    dist = {label: next(iter(per.values())) for label, per in attention_distances(page.results).items()}
    if not dist:
        return _Part(_missing("attention distance (no ViT in results.json's 'attention_distance')"))
    _write_csv(page.fig_dir / "attention_distance.csv",
               [{"label": label, "layer": i, "head": h, "distance_px": float(d)}
                for label, arr in dist.items() for i, heads in enumerate(arr) for h, d in enumerate(heads)])
    model = {r["label"]: str(r.get("model")) for r in page.runs}
    large = next((k for k in dist if pretraining_scale(model.get(k, "")) == "large"), None)
    small = next((k for k in dist if pretraining_scale(model.get(k, "")) == "1k"), None)
    pair = [k for k in (large, small) if k] or list(dist)
    png = plots.plot_attention_distance({k: dist[k] for k in pair},
                                        page.fig_dir / "attention_distance_pretraining.png",
                                        "Mean attention distance per head: " + " vs ".join(pair))
    body = _figure(png, "Mean attention distance of each head (pixels, over patch queries) vs layer, "
                   "the ViTs pretrained on more and on less data side by side")
    others = [k for k in dist if k not in pair]
    if others:
        body += _figure_row([(plots.plot_attention_distance(
            {k: dist[k]}, page.fig_dir / f"attention_distance_{_slug(k)}.png",
            f"Mean attention distance per head, {k}"), k) for k in others], "The other ViTs")
    n = (page.results.get("attention_distance") or {}).get("images")
    finding = (pretrained_attention_finding(dist, large, small) if large and small else
               "No ViT pair pretrained on more vs only ImageNet-1k data was analysed, so the effect of "
               "pretraining data on local attention is not measured.")
    return _Part(body, finding, f" Here: {n} images." if n else "")


PRETRAINED_SECTIONS = [
    ("1. The pretrained models and their ImageNet top-1",
     f"Pre-trained on ImageNet-21k, ViT-B/16 matches or beats ResNets on ImageNet; trained on ImageNet-1k "
     f"alone it trails them ({CITE_VIT}).", "", _pretrained_models_part),
    SECTIONS[1][:3] + (_pretrained_cka_part,),
    ("3. Local vs global attention, and how much pretraining data",
     f"With less pretraining data (ImageNet-1k only) the lower layers of ViT-B/16 learn fewer local "
     f"heads than with ImageNet-21k/JFT pretraining ({CITE_RAGHU}, Figure 5).", "",
     _pretrained_attention_part),
    SECTIONS[3],
]


def _intro_pretrained(results: dict, study_dir: Path) -> str:
    ds, cfg = results.get("dataset") or {}, results.get("config") or {}
    wall = (f" The whole study took {results['elapsed_s'] / 60:.1f} min." if results.get("elapsed_s") else "")
    labelled = ("ImageNet-1k class folders, so top-1 is measured" if ds.get("imagenet_labelled")
                else "not ImageNet-1k class folders, so top-1 is not measured")
    cfg_file = study_dir / "study_config.yaml"
    return (f"<h1>{e(results.get('title') or 'vitlens study')}</h1>"
            f"<p class=\"meta\">Study directory <code>{e(str(study_dir))}</code> · created "
            f"{e(str(results.get('created', 'unknown')))}</p>"
            "<p>This report compares <b>pretrained</b> Vision Transformers (ViTs) with a pretrained "
            "ResNet as "
            f"{CITE_RAGHU} did: no training, each model loaded from its hub's cache and fed the same images "
            "through its own preprocessing. Every number below is measured in this study; the literature's "
            f"claims are stated beside them for comparison.{e(wall)}</p>"
            f"<p><b>Images.</b> {ds.get('images', 0):,} of the {ds.get('images_available', 0):,} images of "
            f"<code>{e(str(ds.get('name', '?')))}</code> (a seeded random subset, the same for every model), "
            f"{ds.get('num_classes', '?')} classes: {e(labelled)}.</p>"
            f"<p><b>Reproduce.</b> <code>vitlens study --config {e(str(cfg_file))}</code> reuses the cached "
            f"statistics under <code>analysis/</code>; <code>vitlens report {e(str(study_dir))}</code> only "
            "rebuilds this page.</p>"
            "<details><summary>Resolved study configuration</summary>"
            f"<pre>{e(json.dumps(cfg, indent=2))}</pre></details>")


def _references() -> str:
    refs = "".join(f"<li><b>{e(k)}</b>. {e(v)}</li>" for k, v in REFERENCES)
    return f"<section><h2>References</h2><ul>{refs}</ul></section>"


# ----------------------------------------------------------------------------- the report
def _fresh_figure_dir(study_dir: Path) -> Path:
    """``STUDY_DIR/figures`` without the files of an earlier build (its parts may be gone now)."""
    fig_dir = study_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for pattern in OUTPUT_FILES:
        for old in fig_dir.glob(pattern):
            old.unlink()
    return fig_dir


def build_report(study_dir: str | Path) -> Path:
    """Write ``STUDY_DIR/report.html`` and ``STUDY_DIR/figures/``; return the report's path."""
    study_dir = Path(study_dir)
    results = load_results(study_dir)
    page = _Page(results, _fresh_figure_dir(study_dir), vit_labels(results),
                 figures.label_colors(_labels(results["runs"])))
    pretrained = results.get("mode") == "pretrained"
    sections = []
    for title, claim, intro, make_part in PRETRAINED_SECTIONS if pretrained else SECTIONS:
        part = make_part(page)
        if part is not None:
            full_claim = None if claim is None else claim + e(part.note)
            sections.append(_section(title, full_claim, part.body, part.finding, intro=intro))
    intro = (_intro_pretrained if pretrained else _intro)(results, study_dir)
    body = intro + "".join(sections) + _references()
    template = Template(TEMPLATE.read_text(encoding="utf-8"))
    page_html = template.substitute(title=e(results.get("title") or "vitlens study"), body=body,
                                    generated=e(_dt.datetime.now().isoformat(timespec="seconds")))
    out = study_dir / "report.html"
    out.write_text(page_html, encoding="utf-8")
    return out

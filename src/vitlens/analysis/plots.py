"""Figures for the analyses, each written as ``<path>.png`` with its numbers beside it (``<path>.json``).

A figure alone cannot be diffed, averaged over seeds or re-plotted, so every function also
writes the exact numbers it drew (and the CKA heatmap a CSV too). Drawing uses matplotlib's
object-oriented API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``), never ``pyplot``, so
it works headless and does not touch the global backend of a notebook that imports vitlens.
Every function returns the path of the PNG.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _paths(path: str | Path) -> tuple[Path, Path]:
    """``out/cka`` or ``out/cka.png`` -> (``out/cka.png``, ``out/cka.json``); creates the folder."""
    path = Path(path)
    if path.suffix.lower() in (".png", ".json", ".csv"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".png"), path.with_name(path.name + ".json")


def to_jsonable(x):
    """numpy/torch arrays and scalars -> lists and floats, recursively (NaN stays NaN: JSON ``NaN``)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    return x


def _save(fig: Figure, path: str | Path, numbers: dict) -> Path:
    png, js = _paths(path)
    FigureCanvasAgg(fig)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    js.write_text(json.dumps(to_jsonable(numbers), indent=1) + "\n")
    return png


def _tick_positions(n: int, max_labels: int = 24) -> list[int]:
    step = max(1, math.ceil(n / max_labels))
    return list(range(0, n, step))


# ----------------------------------------------------------------------------- CKA
def plot_cka_heatmap(
    matrix,
    names_a: Sequence[str],
    names_b: Sequence[str],
    path: str | Path,
    title: str = "",
    *,
    label_a: str = "model A",
    label_b: str = "model B",
    run: Mapping | None = None,
) -> Path:
    """Layer-by-layer CKA heatmap: rows are ``names_a`` (y axis), columns ``names_b`` (x axis),
    input layers at the bottom-left (Kornblith et al. 2019, Raghu et al. 2021). Also writes
    ``<path>.csv`` (rows = names_a, header = names_b). ``run``: how the numbers were made (seed,
    images, processes), stored in the JSON under ``"run"``."""
    m = np.asarray(matrix, dtype=float)
    if m.shape != (len(names_a), len(names_b)):
        raise ValueError(f"matrix shape {m.shape} does not match {len(names_a)} x {len(names_b)} layer names")
    fig = Figure(figsize=(1.6 + 0.28 * max(len(names_b), 8), 1.2 + 0.28 * max(len(names_a), 8)))
    ax = fig.add_subplot()
    im = ax.imshow(
        m, origin="lower", cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest"
    )
    fig.colorbar(im, ax=ax, label="CKA")
    for axis_ticks, axis_labels, names in (
        (ax.set_yticks, ax.set_yticklabels, names_a),
        (ax.set_xticks, ax.set_xticklabels, names_b),
    ):
        pos = _tick_positions(len(names))
        axis_ticks(pos)
        axis_labels([names[i] for i in pos], fontsize=7)
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_ylabel(f"{label_a} layer")
    ax.set_xlabel(f"{label_b} layer")
    ax.set_title(title)
    png = _save(
        fig,
        path,
        {
            "title": title,
            "label_a": label_a,
            "label_b": label_b,
            "names_a": list(names_a),
            "names_b": list(names_b),
            "matrix": m,
            **({"run": dict(run)} if run is not None else {}),
        },
    )
    with open(png.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([""] + list(names_b))
        for name, row in zip(names_a, m):
            w.writerow([name] + [f"{v:.6g}" for v in row])
    return png


# ----------------------------------------------------------------------------- attention
def plot_attention_distance(
    results: Mapping[str, np.ndarray], path: str | Path, title: str = "Mean attention distance"
) -> Path:
    """One dot per head at each layer depth, one colour per run (Dosovitskiy et al. Fig. 7).

    ``results``: ``{run_label: (layers, heads) array in pixels}``; runs of different depth overlay.
    """
    if not results:
        raise ValueError("plot_attention_distance needs at least one run")
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    n_runs = len(results)
    for r, (label, mad) in enumerate(results.items()):
        mad = np.asarray(mad, dtype=float)
        if mad.ndim != 2:
            raise ValueError(f"run {label!r}: expected a (layers, heads) array, got shape {mad.shape}")
        L, H = mad.shape
        # Runs side by side within a layer so overlapping dots stay visible.
        offset = (r - (n_runs - 1) / 2) * 0.5 / max(n_runs, 1)
        x = np.repeat(np.arange(1, L + 1), H) + offset
        ax.scatter(x, mad.reshape(-1), s=14, alpha=0.75, color=f"C{r % 10}", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (network depth)")
    ax.set_ylabel("mean attention distance (pixels)")
    top = max(float(np.nanmax(np.asarray(m, dtype=float))) for m in results.values())
    ax.set_ylim(0, 1.1 * top if top > 0 else 1.0)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path, {"title": title, "unit": "pixels", "runs": dict(results)})


def _display_image(image, mean=None, std=None) -> np.ndarray:
    """(C, H, W) tensor/array -> (H, W, 3) in [0, 1]: un-normalise with mean/std if given, else min-max."""
    img = (
        image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, float)
    )
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img.transpose(1, 2, 0)
    if mean is not None and std is not None:
        img = img * np.asarray(std) + np.asarray(mean)
    else:
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo + 1e-12)
    img = np.clip(img, 0.0, 1.0)
    return np.repeat(img, 3, axis=2) if img.shape[-1] == 1 else img


def plot_attention_maps(
    image, maps: Mapping[str, np.ndarray], path: str | Path, title: str = "", *, mean=None, std=None
) -> Path:
    """The image, then each attention map drawn over it (maps are (h, w) grids, upsampled to the image).

    ``maps``: ``{panel_title: (h, w)}``, or the dict :func:`vitlens.analysis.attention_maps`
    returns (expanded to one panel per head, the head mean and the rollout).
    ``mean``/``std``: the normalisation to undo for display.
    """
    if "heads" in maps and "rollout" in maps:
        panels = {f"head {h}": m for h, m in enumerate(maps["heads"])}
        panels["mean of heads"] = maps["mean"]
        panels["rollout"] = maps["rollout"]
        if not title and "layer" in maps:
            title = f"[CLS] attention, {maps['layer']}"
    else:
        panels = dict(maps)
    img = _display_image(image, mean, std)
    H, W = img.shape[:2]
    n = len(panels) + 1
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.4 * cols, 2.5 * rows))
    for i, (name, m) in enumerate([("image", None)] + list(panels.items())):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(img, extent=(0, W, H, 0))
        if m is not None:
            m = np.asarray(m, dtype=float)
            ax.imshow(m, cmap="inferno", alpha=0.6, extent=(0, W, H, 0), interpolation="bilinear")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path, {"title": title, "maps": panels})


# ----------------------------------------------------------------------------- probes
def plot_probe_accuracy(
    results: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str = "Linear probe accuracy",
    ylabel: str = "test accuracy",
    chance: float | None = None,
) -> Path:
    """Accuracy against layer depth, one line per run: ``{run_label: {layer: accuracy}}``.

    Layer names label the x axis when all runs share them; otherwise the x axis is the layer index.
    """
    if not results:
        raise ValueError("plot_probe_accuracy needs at least one run")
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    layer_lists = [list(r) for r in results.values()]
    for r, (label, accs) in enumerate(results.items()):
        ax.plot(range(len(accs)), [float(v) for v in accs.values()], "o-", color=f"C{r % 10}", label=label)
    if all(lst == layer_lists[0] for lst in layer_lists):
        pos = _tick_positions(len(layer_lists[0]))
        ax.set_xticks(pos)
        ax.set_xticklabels([layer_lists[0][i] for i in pos], rotation=60, ha="right", fontsize=7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer index")
    if chance is not None:
        ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(
        fig, path, {"title": title, "chance": chance, "runs": {k: dict(v) for k, v in results.items()}}
    )

"""Study-level figures: several models, fractions and seeds on one set of axes.

Per-model analysis figures (CKA heatmaps, attention distance) come from
:mod:`vitlens.analysis.plots`; the two here have no per-model counterpart: accuracy against
training-set size over seeds, and probe accuracy against *relative* depth so that models of
different depth line up. Like ``analysis.plots`` they draw on an Agg canvas with matplotlib's
object-oriented API (no ``pyplot``, no global backend change).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
         "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]  # matplotlib's default cycle


def label_colors(labels: Sequence[str]) -> dict[str, str]:
    """One stable colour per model label, shared by every study figure."""
    return {label: TAB10[i % len(TAB10)] for i, label in enumerate(labels)}


def fmt_fraction(f: float | str) -> str:
    """0.05 -> '5%', 0.125 -> '12.5%', 1/3 -> '33.3%'."""
    return f"{100 * float(f):.3g}%"


def _short(n: float) -> str:
    return f"{n / 1000:g}k" if n >= 1000 else f"{n:g}"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_data_hunger(rows: list[dict], path: Path, colors: dict[str, str]) -> Path:
    """Test top-1 vs training images (log x), one line per label, mean +- std over seeds.

    ``rows``: one per (label, fraction) with train_images, fraction, top1_mean, top1_std (None
    with a single seed: no error bar is drawn rather than a misleading zero-width one).
    """
    fig = Figure(figsize=(7, 4.3))
    ax = fig.add_subplot()
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["train_images"])
        has_err = any(r["top1_std"] is not None for r in rs)
        ax.errorbar([r["train_images"] for r in rs], [r["top1_mean"] for r in rs],
                    yerr=[r["top1_std"] or 0.0 for r in rs] if has_err else None,
                    marker="o", capsize=4, lw=2, color=colors.get(label), label=label)
    ticks = sorted({(r["train_images"], r["fraction"]) for r in rows})
    ax.set_xscale("log")
    ax.set_xticks([t for t, _ in ticks])
    ax.set_xticklabels([f"{_short(t)}\n({fmt_fraction(f)})" for t, f in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training images (fraction of the training set)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Data hunger: accuracy vs training-set size")
    return _save(fig, path)


def plot_probes(probes: dict[str, list[dict]], path: Path, colors: dict[str, str]) -> Path:
    """Localization-probe accuracy vs relative depth: class (left) and position (right).

    ``probes[label]`` = rows with relative_depth, class_acc, position_acc (percent, layer order).
    """
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2, sharex=True)
    for label, rows in probes.items():
        x = [r["relative_depth"] for r in rows]
        for ax, key in zip(axes, ("class_acc", "position_acc")):
            ax.plot(x, [r[key] for r in rows], marker="o", lw=2, color=colors.get(label), label=label)
    for ax, what in zip(axes, ("image class", "patch position")):
        ax.set_title(f"Probe recovers the {what} from each token")
        ax.set_xlabel("relative depth (0 = first layer, 1 = last)")
        ax.set_ylabel("probe accuracy (%)")
        ax.set_xlim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[1].legend()
    return _save(fig, path)

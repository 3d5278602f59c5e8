"""Fast unit tests of vitlens.analysis.plots: the numbers written beside each figure, and what is drawn.

The figure of each call is caught on its way to ``_save`` and read back through matplotlib's own
accessors (tick labels, scatter positions, image orientation and colour range), so a swapped axis,
a flipped heatmap or a wrong run offset shows up as data, not as pixels.
"""

from __future__ import annotations

import csv
import importlib
import json
import math

import numpy as np
import pytest
import torch

plots = importlib.import_module("vitlens.analysis.plots")



def test_paths_strip_known_suffixes_and_create_the_folder(tmp_path):
    for name in ("cka", "cka.png", "cka.json", "cka.csv", "cka.PNG"):
        png, js = plots._paths(tmp_path / "a" / name)
        assert (png, js) == (tmp_path / "a" / "cka.png", tmp_path / "a" / "cka.json")
    png, js = plots._paths(tmp_path / "b" / "run.v2")
    assert (png.name, js.name) == ("run.v2.png", "run.v2.json")
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()


def test_to_jsonable_and_tick_positions():
    out = plots.to_jsonable(
        {
            1: torch.tensor([1.5, 2.0]),
            "a": np.array([[1, 2]]),
            "s": np.float32(0.5),
            "t": (np.int64(3), [float("nan")]),
        }
    )
    assert out["1"] == [1.5, 2.0] and out["a"] == [[1, 2]] and out["s"] == 0.5 and type(out["s"]) is float
    assert out["t"][0] == 3 and type(out["t"][0]) is int and math.isnan(out["t"][1][0])
    assert plots.to_jsonable("x") == "x"
    assert plots._tick_positions(24) == list(range(24))
    assert plots._tick_positions(25) == list(range(0, 25, 2))
    assert plots._tick_positions(49) == list(range(0, 49, 3))
    assert plots._tick_positions(10, max_labels=4) == [0, 3, 6, 9]


def test_cka_heatmap_numbers_csv_and_orientation(tmp_path, figures):
    m = np.array([[1.0, 0.25, 0.125], [0.5, 1.0 / 3, 0.0]])
    png = plots.plot_cka_heatmap(
        m,
        ["a0", "a1"],
        ["b0", "b1", "b2"],
        tmp_path / "cka",
        "T",
        label_a="ViT",
        label_b="CNN",
        run={"seed": 3},
    )
    assert png == tmp_path / "cka.png" and png.stat().st_size > 0
    js = json.loads((tmp_path / "cka.json").read_text())
    assert js == {
        "title": "T", "label_a": "ViT", "label_b": "CNN",
        "names_a": ["a0", "a1"], "names_b": ["b0", "b1", "b2"],
        "matrix": m.tolist(), "run": {"seed": 3},
    }  # fmt: skip
    rows = list(csv.reader(open(tmp_path / "cka.csv")))
    assert rows == [["", "b0", "b1", "b2"], ["a0", "1", "0.25", "0.125"], ["a1", "0.5", "0.333333", "0"]]
    ax = figures[0].axes[0]
    img = ax.images[0]
    assert img.origin == "lower" and img.get_clim() == (0.0, 1.0) and img.get_cmap().name == "magma"
    np.testing.assert_array_equal(img.get_array(), m)  # rows = names_a (y), columns = names_b (x)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a0", "a1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["b0", "b1", "b2"]
    assert (ax.get_ylabel(), ax.get_xlabel(), ax.get_title()) == ("ViT layer", "CNN layer", "T")
    assert figures[0].axes[1].get_ylabel() == "CKA"  # the colour bar
    # the figure grows with the layer count (0.28 in per layer beyond 8) so that labels stay legible
    np.testing.assert_allclose(figures[0].get_size_inches(), [1.6 + 0.28 * 8, 1.2 + 0.28 * 8])
    many = plots.plot_cka_heatmap(
        np.zeros((10, 12)), list("abcdefghij"), list("ABCDEFGHIJKL"), tmp_path / "big"
    )
    np.testing.assert_allclose(figures[1].get_size_inches(), [1.6 + 0.28 * 12, 1.2 + 0.28 * 10])
    from PIL import Image

    assert Image.open(many).info["dpi"] == pytest.approx((120, 120), abs=0.1)
    plots.plot_cka_heatmap(m, ["a0", "a1"], ["b0", "b1", "b2"], tmp_path / "plain")  # figure 2
    js = json.loads((tmp_path / "plain.json").read_text())
    assert "run" not in js and (js["label_a"], js["label_b"], js["title"]) == ("model A", "model B", "")
    with pytest.raises(ValueError, match=r"matrix shape \(2, 3\) does not match 3 x 3 layer names"):
        plots.plot_cka_heatmap(m, ["a", "b", "c"], ["x", "y", "z"], tmp_path / "bad")


def test_attention_distance_plot_places_runs_side_by_side(tmp_path, figures):
    runs = {"vit": np.array([[10.0, 20.0], [30.0, 40.0]]), "deit": np.array([[5.0, 6.0]])}
    png = plots.plot_attention_distance(runs, tmp_path / "mad")
    js = json.loads((tmp_path / "mad.json").read_text())
    assert js == {
        "title": "Mean attention distance",
        "unit": "pixels",
        "runs": {k: v.tolist() for k, v in runs.items()},
    }
    ax = figures[0].axes[0]
    a, b = ax.collections
    np.testing.assert_allclose(a.get_offsets(), [[0.875, 10], [0.875, 20], [1.875, 30], [1.875, 40]])
    np.testing.assert_allclose(b.get_offsets(), [[1.125, 5], [1.125, 6]])
    assert [a.get_label(), b.get_label()] == ["vit", "deit"]
    assert (
        ax.get_ylim() == pytest.approx((0.0, 44.0)) and ax.get_ylabel() == "mean attention distance (pixels)"
    )
    assert ax.get_xlabel() == "layer (network depth)" and png.exists()
    plots.plot_attention_distance({"one": np.zeros((1, 2))}, tmp_path / "zero", title="Z")
    ax = figures[1].axes[0]
    np.testing.assert_allclose(ax.collections[0].get_offsets()[:, 0], [1.0, 1.0])  # a single run is centred
    assert ax.get_ylim() == (0.0, 1.0) and ax.get_title() == "Z"
    with pytest.raises(ValueError, match="at least one run"):
        plots.plot_attention_distance({}, tmp_path / "none")
    with pytest.raises(ValueError, match=r"run 'v': expected a \(layers, heads\) array, got shape \(3,\)"):
        plots.plot_attention_distance({"v": np.ones(3)}, tmp_path / "flat")


def test_display_image_unnormalises_or_rescales():
    img = torch.tensor([[[0.0, 2.0]], [[1.0, 1.0]], [[-1.0, 3.0]]])  # (3, 1, 2)
    out = plots._display_image(img)
    assert out.shape == (1, 2, 3)
    np.testing.assert_allclose(out[0, :, 2], [0.0, 1.0], atol=1e-9)  # min-max over the whole image
    np.testing.assert_allclose(out[0, 0], [0.25, 0.5, 0.0], atol=1e-9)
    un = plots._display_image(img, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    np.testing.assert_allclose(un[0, 0], [0.5, 0.75, 0.25])
    np.testing.assert_allclose(un[0, 1], [1.0, 0.75, 1.0])  # 0.5 + 0.25 * 3 = 1.25, clipped
    flat = plots._display_image(np.arange(15.0).reshape(3, 5))  # 2-D: nothing to transpose
    assert flat.shape == (3, 5) and flat.max() == pytest.approx(1.0)
    hwc = plots._display_image(np.zeros((4, 2, 3)))  # already (H, W, 3)
    assert hwc.shape == (4, 2, 3)
    gray = plots._display_image(np.array([[[0.0, 4.0]]]))  # (1, 1, 2) numpy
    assert gray.shape == (1, 2, 3) and np.allclose(gray[0, 1], 1.0)


def test_attention_maps_plot_expands_an_attention_maps_result(tmp_path, figures):
    heads = np.random.default_rng(0).random((2, 2, 2))
    maps = {
        "layer": "blocks.3.attn",
        "grid_size": (2, 2),
        "heads": heads,
        "mean": heads.mean(0),
        "rollout": np.eye(2),
    }
    plots.plot_attention_maps(torch.zeros(3, 8, 8), maps, tmp_path / "maps")
    js = json.loads((tmp_path / "maps.json").read_text())
    assert js["title"] == "[CLS] attention, blocks.3.attn"
    assert list(js["maps"]) == ["head 0", "head 1", "mean of heads", "rollout"]
    np.testing.assert_allclose(js["maps"]["head 1"], heads[1])
    np.testing.assert_allclose(js["maps"]["mean of heads"], heads.mean(0))
    fig = figures[0]
    assert [ax.get_title() for ax in fig.axes] == ["image", "head 0", "head 1", "mean of heads", "rollout"]
    assert fig.axes[0].get_subplotspec().get_geometry()[:2] == (2, 4)  # 5 panels: 2 rows of at most 4
    np.testing.assert_allclose(fig.get_size_inches(), [2.4 * 4, 2.5 * 2])
    assert len(fig.axes[0].images) == 1 and len(fig.axes[1].images) == 2  # the map drawn over the image
    np.testing.assert_allclose(fig.axes[4].images[1].get_array(), np.eye(2))
    # the 2 x 2 map is stretched over the whole 8 x 8 image, top row at the top
    assert [list(im.get_extent()) for im in fig.axes[1].images] == [[0, 8, 8, 0], [0, 8, 8, 0]]
    plots.plot_attention_maps(np.zeros((3, 8, 8)), {"a": np.ones((2, 2))}, tmp_path / "plain", "mine")
    js = json.loads((tmp_path / "plain.json").read_text())
    assert js == {"title": "mine", "maps": {"a": [[1.0, 1.0], [1.0, 1.0]]}}
    assert figures[1].axes[0].get_subplotspec().get_geometry()[:2] == (1, 2)


def test_probe_accuracy_plot(tmp_path, figures):
    runs = {"vit": {"b0": 0.5, "b1": 0.75}, "cnn": {"b0": 0.25, "b1": 1.0}}
    plots.plot_probe_accuracy(runs, tmp_path / "p", chance=0.1)
    js = json.loads((tmp_path / "p.json").read_text())
    assert js == {"title": "Linear probe accuracy", "chance": 0.1, "runs": runs}
    ax = figures[0].axes[0]
    lines = ax.get_lines()
    np.testing.assert_allclose(lines[0].get_xydata(), [[0, 0.5], [1, 0.75]])
    np.testing.assert_allclose(lines[1].get_xydata(), [[0, 0.25], [1, 1.0]])
    assert lines[2].get_ydata()[0] == 0.1 and lines[2].get_label() == "chance"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["b0", "b1"]
    assert ax.get_ylim() == (0.0, 1.02) and ax.get_ylabel() == "test accuracy"
    plots.plot_probe_accuracy({"a": {"x": 0.5}, "b": {"y": 0.5, "z": 0.1}}, tmp_path / "q", "T", "acc")
    ax = figures[1].axes[0]
    assert ax.get_xlabel() == "layer index" and len(ax.get_lines()) == 2 and ax.get_ylabel() == "acc"
    assert json.loads((tmp_path / "q.json").read_text())["chance"] is None
    with pytest.raises(ValueError, match="at least one run"):
        plots.plot_probe_accuracy({}, tmp_path / "none")

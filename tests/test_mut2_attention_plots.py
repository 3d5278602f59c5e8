"""Attention analyses, figures and text attention: the gaps mutation testing found (issue 15).

* Every error message of ``vitlens.analysis.attention`` / ``plots`` / ``text_attention`` compared
  whole (a substring match misses a message wrapped in junk or re-cased): they tell users the fix.
* Figures are read back as drawn (sizes, colours, tick labels, limits, the PNG's resolution) and
  the JSON beside each figure as text, since people read and diff it.
* Rollout, layer discovery and geometry on hand-made inputs (several images, fake timm / Hugging
  Face modules, a model without ``num_prefix_tokens``).
"""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from torch import nn

import vitlens
from vitlens.analysis.attention import (
    AttentionRecord,
    attention_entropy,
    attention_layers,
    attention_maps,
    attention_rollout,
    num_heads,
    record_attention,
    resolve_attention_layers,
    token_geometry,
)
from vitlens.errors import ConfigError, DataError, ModelError

att = importlib.import_module("vitlens.analysis.attention")
plots = importlib.import_module("vitlens.analysis.plots")
ta = importlib.import_module("vitlens.analysis.text_attention")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return vitlens.create_model("vit_micro_patch4_32", depth=2).eval()  # 2 blocks, 4 heads, 8x8 + [CLS]



def _message(fn, *args, **kwargs) -> tuple[type, str]:
    with pytest.raises(Exception) as e:
        fn(*args, **kwargs)
    return type(e.value), (e.value.args[0] if isinstance(e.value, KeyError) else str(e.value))


# ------------------------------------------------------------------------------ messages
def test_attention_analysis_messages_name_the_problem_and_the_fix(vit, tmp_path):
    deep = vitlens.create_model("vit_micro_patch4_32", depth=5)
    four = vitlens.create_model("vit_micro_patch4_32", depth=4)
    cases = [
        (
            (resolve_attention_layers, nn.Sequential(nn.Linear(2, 2))),
            ModelError,
            "Sequential has no attention layers that vitlens can record (vitlens, timm or Hugging Face "
            "attention); attention analyses apply to transformers, not CNNs",
        ),
        (
            (resolve_attention_layers, vit, 2),
            ConfigError,
            "attention layer index 2 out of range: the model has 2",
        ),
        (
            (resolve_attention_layers, vit, -3),
            ConfigError,
            "attention layer index -3 out of range: the model has 2",
        ),
        (
            (resolve_attention_layers, deep, "nope"),
            ConfigError,
            "'nope' is not an attention layer of VisionTransformer; choose from ['blocks.0.attn', "
            "'blocks.1.attn', 'blocks.2.attn', 'blocks.3.attn'] ... or an index",
        ),
        (
            (resolve_attention_layers, four, ["blocks.0.mlp"]),
            ConfigError,
            "'blocks.0.mlp' is not an attention layer of VisionTransformer; choose from ['blocks.0.attn', "
            "'blocks.1.attn', 'blocks.2.attn', 'blocks.3.attn'] or an index",
        ),
        (
            (AttentionRecord(["a"]).__getitem__, "a"),
            KeyError,
            "no attention recorded for 'a'; run a forward pass inside the context",
        ),
        (
            (AttentionRecord(["a"])._store, "a", torch.rand(3, 4, 4)),
            RuntimeError,
            "layer 'a' gave no (B, heads, L, S) probabilities (got (3, 4, 4)); "
            "its attention class is not supported",
        ),
        (
            (AttentionRecord(["a"])._store, "a", None),
            RuntimeError,
            "layer 'a' gave no (B, heads, L, S) probabilities (got None); "
            "its attention class is not supported",
        ),
        (
            (num_heads, nn.Sequential(nn.Linear(2, 2)), "0"),
            ModelError,
            "cannot tell how many heads '0' (Linear) has: no num_heads attribute",
        ),
        (
            (token_geometry, nn.Linear(2, 2)),
            ModelError,
            "cannot tell where Linear's tokens sit in the image: it needs a patch_embed with grid_size and "
            "patch_size (vitlens/timm ViT) or a Hugging Face ViT config",
        ),
        (
            (att.attention_distance, torch.rand(1, 1, 6, 7), (2, 3), (4, 4), 0),
            ValueError,
            "expected self-attention probabilities (B, heads, L, L), got (1, 1, 6, 7)",
        ),
        (
            (att.attention_distance, torch.rand(1, 1, 7, 7), (2, 3), (4, 4), 0),
            ValueError,
            "7 tokens do not match 0 prefix tokens + 6 patches; check grid_size and num_prefix_tokens",
        ),
        (
            (att._HeadSums(vit, ["blocks.0.attn"], token_geometry(vit), "cpu").means,),
            DataError,
            "no batches to measure attention on; the data iterable is empty",
        ),
        ((attention_rollout, []), ValueError, "attention_rollout needs at least one layer of attention"),
        (
            (attention_rollout, [torch.rand(1, 1, 2, 2)], 1.0),
            ValueError,
            "discard_ratio must be in [0, 1), got 1.0",
        ),
        (
            (attention_rollout, [torch.rand(1, 1, 2, 2)], 0.0, "sum"),
            ValueError,
            "head_fusion must be one of ['max', 'mean', 'min'], got 'sum'",
        ),
        (
            (attention_entropy, torch.full((3,), 1 / 3)),
            ValueError,
            "expected probabilities (..., heads, L, S), got (3,)",
        ),
        (
            (attention_maps, vit, torch.zeros(2, 3, 32, 32)),
            ValueError,
            "attention_maps takes one image (C, H, W), got a batch of 2",
        ),
    ]
    for (fn, *args), kind, message in cases:
        assert _message(fn, *args) == (kind, message)


def test_plot_and_text_attention_messages(tmp_path):
    probs = torch.full((1, 1, 3, 3), 1 / 3)
    cases = [
        (
            (plots.plot_cka_heatmap, np.zeros((2, 3)), ["a", "b", "c"], ["x", "y", "z"], tmp_path / "c"),
            ValueError,
            "matrix shape (2, 3) does not match 3 x 3 layer names",
        ),
        (
            (plots.plot_attention_distance, {}, tmp_path / "d"),
            ValueError,
            "plot_attention_distance needs at least one run",
        ),
        (
            (plots.plot_attention_distance, {"v": np.ones(3)}, tmp_path / "d"),
            ValueError,
            "run 'v': expected a (layers, heads) array, got shape (3,)",
        ),
        (
            (plots.plot_probe_accuracy, {}, tmp_path / "p"),
            ValueError,
            "plot_probe_accuracy needs at least one run",
        ),
        (
            (ta.head_entropy, probs, torch.zeros(1, 2, dtype=torch.bool)),
            ValueError,
            "query_padding_mask must be (B, L) = (1, 3), got (1, 2)",
        ),
        ((ta.head_entropy, probs[0]), ValueError, "expected probabilities (B, heads, L, S), got (1, 3, 3)"),
        ((ta.head_distance, probs[0]), ValueError, "expected probabilities (B, heads, L, S), got (1, 3, 3)"),
        (
            (ta.text_attention_report, nn.Linear(2, 2), None, "ab"),
            ModelError,
            "Linear is not a GPT or BERT; for other models use text_attention "
            "with head_entropy / head_distance",
        ),
        (
            (ta.translation_attention_report, nn.Linear(2, 2), None, "a", "b"),
            ModelError,
            "Linear is not an encoder-decoder; use text_attention_report",
        ),
        (
            (ta.plot_text_attention, {"layers": ["x"], "maps": {"x": np.zeros((1, 2, 2))}}, "nope", "n.png"),
            ConfigError,
            "no layer 'nope'; layers: ['x']",
        ),
    ]
    for (fn, *args), kind, message in cases:
        assert _message(fn, *args) == (kind, message)


# ------------------------------------------------------------------------------ layer discovery
class _HFAttn(nn.Module):
    pass


class _HFOther(nn.Module):
    pass


class _Recorder:
    """The shape of transformers' OutputRecorder: the class to hook is ``target_class``."""

    def __init__(self, target_class):
        self.target_class = target_class


def _hf_like(spec) -> nn.Module:
    m = nn.Module()
    m.a, m.b, m.c = _HFAttn(), _HFOther(), nn.Linear(2, 2)
    m._can_record_outputs = spec
    return m


@pytest.mark.parametrize(
    "spec, found",
    [
        ({"attentions": _HFAttn}, ["a"]),
        ({"attentions": _Recorder(_HFAttn)}, ["a"]),
        ({"attentions": [_Recorder(_HFOther), _HFAttn]}, ["a", "b"]),
        ({"attentions": (_HFOther,)}, ["b"]),
        ({"attentions": [_Recorder(None), "not a class"]}, []),
        ({"hidden_states": _HFAttn}, []),
        ([("attentions", _HFAttn)], []),  # not a dict: nothing to record
        (None, []),
    ],
)
def test_hugging_face_attention_classes_come_from_can_record_outputs(spec, found):
    assert attention_layers(_hf_like(spec)) == found


def test_timm_attention_is_recognised_by_fused_attn_and_a_dropout_module():
    m = nn.Module()
    m.timm_like = nn.Module()
    m.timm_like.fused_attn, m.timm_like.attn_drop = True, nn.Dropout(0.0)
    m.float_drop = nn.Module()
    m.float_drop.fused_attn, m.float_drop.attn_drop = True, 0.0  # a float, not a module: cannot hook it
    m.no_flag = nn.Module()
    m.no_flag.attn_drop = nn.Dropout(0.0)
    assert attention_layers(m) == ["timm_like"]


def test_record_attention_restores_the_previous_flags(vit):
    """A layer that was already recording (or a timm layer already unfused) keeps its setting."""
    vit.blocks[1].attn.record_attn = True
    try:
        with torch.no_grad(), record_attention(vit, layers=[0, 1]) as rec:
            vit(torch.randn(1, 3, 32, 32))
        assert vit.blocks[1].attn.record_attn is True and vit.blocks[0].attn.record_attn is False
        assert list(rec.probs) == ["blocks.0.attn", "blocks.1.attn"]
    finally:
        vit.blocks[1].attn.record_attn = False
    m = nn.Module()
    m.x, m.y = nn.Module(), nn.Module()
    for sub, fused in ((m.x, True), (m.y, False)):
        sub.fused_attn, sub.attn_drop = fused, nn.Identity()
    with record_attention(m) as rec:
        assert m.x.fused_attn is False and m.y.fused_attn is False
        m.x.attn_drop(torch.full((1, 1, 2, 2), 0.5))
    assert m.x.fused_attn is True and m.y.fused_attn is False
    assert torch.equal(rec["x"], torch.full((1, 1, 2, 2), 0.5)) and not m.x.attn_drop._forward_hooks


def test_token_geometry_of_a_vit_without_num_prefix_tokens_assumes_one_cls():
    m = nn.Module()
    m.patch_embed = nn.Module()
    m.patch_embed.grid_size, m.patch_embed.patch_size = (3, 5), (4, 2)
    geo = token_geometry(m)
    assert (geo.grid_size, geo.patch_size, geo.num_prefix_tokens, geo.has_cls) == ((3, 5), (4, 2), 1, False)
    m.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
    m.num_prefix_tokens = 3
    geo = token_geometry(m)
    assert (geo.num_prefix_tokens, geo.has_cls) == (3, True)


# ------------------------------------------------------------------------------ rollout
def _step(a, fuse, eye):
    m = 0.5 * fuse(a.double()) + 0.5 * eye
    return m / m.sum(-1, keepdim=True)


def test_rollout_defaults_max_fusion_and_images_apart():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(2, 3, 4, 4, generator=g), -1)  # 2 images, 3 heads
    b = torch.softmax(torch.randn(2, 3, 4, 4, generator=g), -1)
    eye = torch.eye(4, dtype=torch.float64)
    mean = lambda t: t.mean(1)  # noqa: E731
    amax = lambda t: t.amax(1)  # noqa: E731
    out = attention_rollout([a, b])  # defaults: mean over heads, nothing discarded
    assert out.shape == (2, 4, 4) and out.dtype == torch.float64
    torch.testing.assert_close(out, _step(b, mean, eye) @ _step(a, mean, eye))
    torch.testing.assert_close(
        attention_rollout([a, b], head_fusion="max"), _step(b, amax, eye) @ _step(a, amax, eye)
    )
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 4, dtype=torch.float64))  # rows stay distributions


def test_rollout_discards_the_smallest_entries_of_each_image_on_its_own():
    g = torch.Generator().manual_seed(1)
    a = torch.softmax(3 * torch.randn(2, 2, 3, 3, generator=g), -1)
    a[1] *= 0.01  # image 1 is all small: a batch-wide cut would zero it whole
    eye = torch.eye(3, dtype=torch.float64)
    want = []
    for img in a:
        fused = img.double().mean(0).flatten()
        kept = fused.clone()
        kept[fused.argsort()[:3]] = 0  # int(9 * 0.4) = 3 smallest of this image
        m = 0.5 * kept.view(3, 3) + 0.5 * eye
        want.append(m / m.sum(-1, keepdim=True))
    torch.testing.assert_close(attention_rollout([a], discard_ratio=0.4), torch.stack(want))


def test_rollout_of_cpu_tensors_under_a_meta_default_device():
    a = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    want = attention_rollout([a, a])
    with torch.device("meta"):
        got = attention_rollout([a, a])
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------ figures
def _texts(labels):
    return [t.get_text() for t in labels]


def _grid_alpha(ax):
    lines = ax.yaxis.get_gridlines()
    assert lines and all(line.get_visible() for line in lines)
    return lines[0].get_alpha()


def test_save_writes_the_json_indented_by_one_and_a_120_dpi_png(tmp_path):
    from matplotlib.figure import Figure
    from PIL import Image

    png = plots._save(Figure(figsize=(2, 1)), tmp_path / "f", {"a": np.array([1.5, 2.0]), "b": "x"})
    assert png == tmp_path / "f.png"
    assert (tmp_path / "f.json").read_text() == '{\n "a": [\n  1.5,\n  2.0\n ],\n "b": "x"\n}\n'
    assert Image.open(png).info["dpi"] == pytest.approx((120, 120), abs=0.1)


def test_cka_heatmap_as_drawn(tmp_path, figures):
    png = plots.plot_cka_heatmap([[1, 0], [0, 1]], ["a0", "a1"], ["b0", "b1"], tmp_path / "cka")
    text = (tmp_path / "cka.json").read_text()
    assert '"matrix": [\n  [\n   1.0,\n   0.0\n  ],' in text  # stored as floats, whatever came in
    assert (tmp_path / "cka.csv").read_bytes() == b",b0,b1\r\na0,1,0\r\na1,0,1\r\n"  # csv's own line ends
    assert png.with_suffix(".csv").exists()
    fig = figures[0]
    ax, bar = fig.axes
    im = ax.images[0]
    assert im.get_interpolation() == "nearest" and ax.get_aspect() == "auto"
    assert im.get_array().dtype == np.float64
    assert bar.get_ylabel() == "CKA" and len(fig.axes) == 2
    for label in ax.get_xticklabels():
        assert label.get_rotation() == 90 and label.get_fontsize() == 7
    for label in ax.get_yticklabels():
        assert label.get_rotation() == 0 and label.get_fontsize() == 7
    assert (ax.get_ylabel(), ax.get_xlabel(), ax.get_title()) == ("model A layer", "model B layer", "")
    plots.plot_cka_heatmap(
        np.eye(30), [f"a{i}" for i in range(30)], [f"b{i}" for i in range(30)], tmp_path / "big"
    )
    ax = figures[1].axes[0]
    assert _texts(ax.get_yticklabels()) == [f"a{i}" for i in range(0, 30, 2)]  # at most 24 labels
    assert list(ax.get_xticks()) == list(range(0, 30, 2))


def test_attention_distance_plot_as_drawn(tmp_path, figures):
    runs = {
        "vit": np.array([[0.2, 0.5]]),
        "deit": np.array([[0.1, 0.3], [0.4, 0.25]]),
        "three": np.array([[0.05, 0.05]]),
    }
    plots.plot_attention_distance(runs, tmp_path / "mad")
    fig = figures[0]
    ax = fig.axes[0]
    np.testing.assert_allclose(fig.get_size_inches(), [6.4, 4.2])
    offsets = [c.get_offsets()[:, 0] for c in ax.collections]  # 3 runs: -1/6, 0, +1/6 of a layer
    np.testing.assert_allclose(offsets[0], [1 - 1 / 6] * 2)
    np.testing.assert_allclose(offsets[1], [1, 1, 2, 2])
    np.testing.assert_allclose(offsets[2], [1 + 1 / 6] * 2)
    for r, c in enumerate(ax.collections):
        assert list(c.get_sizes()) == [14] and c.get_alpha() == 0.75
        np.testing.assert_allclose(c.get_facecolor()[0], to_rgba(f"C{r}", 0.75))
    assert ax.get_ylim() == pytest.approx((0.0, 0.55))  # 10% above the highest dot, also below 1 px
    assert all(float(t).is_integer() for t in ax.get_xticks())  # layers are whole numbers
    legend = ax.get_legend()
    assert (
        _texts(legend.get_texts()) == ["vit", "deit", "three"] and legend.get_texts()[0].get_fontsize() == 8
    )
    assert _grid_alpha(ax) == 0.3
    assert ax.get_title() == "Mean attention distance"
    js = json.loads((tmp_path / "mad.json").read_text())
    assert js["runs"]["deit"] == [[0.1, 0.3], [0.4, 0.25]] and js["unit"] == "pixels"
    many = {f"r{i}": np.ones((1, 1)) for i in range(11)}
    plots.plot_attention_distance(many, tmp_path / "many")
    cols = [c.get_facecolor()[0] for c in figures[1].axes[0].collections]
    np.testing.assert_allclose(cols[10], to_rgba("C0", 0.75))  # the colour cycle wraps after 10


def test_attention_maps_plot_as_drawn(tmp_path, figures):
    image = torch.linspace(-1, 1, 3 * 4 * 6).view(3, 4, 6)
    maps = {"a": np.eye(2), "b": np.ones((2, 2)), "c": np.zeros((2, 2)), "d": np.eye(2), "e": np.eye(2)}
    plots.plot_attention_maps(image, maps, tmp_path / "m", "T", mean=[0.5] * 3, std=[0.25] * 3)
    fig = figures[0]
    np.testing.assert_allclose(fig.get_size_inches(), [2.4 * 4, 2.5 * 2])  # 6 panels: 2 rows of 4
    assert fig._suptitle.get_text() == "T" and fig._suptitle.get_fontsize() == 9
    first, second = fig.axes[0], fig.axes[1]
    assert first.get_title() == "image" and first.get_title(loc="center") == "image"
    assert first.title.get_fontsize() == 8 and not first.axison and not second.axison
    np.testing.assert_allclose(first.images[0].get_array(), (image.permute(1, 2, 0).numpy() * 0.25 + 0.5))
    assert list(first.images[0].get_extent()) == [0, 6, 4, 0]
    over = second.images[1]
    assert over.get_cmap().name == "inferno" and over.get_alpha() == 0.6
    assert over.get_interpolation() == "bilinear" and list(over.get_extent()) == [0, 6, 4, 0]
    assert (tmp_path / "m.png").exists()
    only = {"heads": np.zeros((1, 2, 2)), "mean": np.zeros((2, 2)), "rollout": np.ones((2, 2))}
    plots.plot_attention_maps(np.zeros((3, 4, 4)), only, tmp_path / "n")  # no "layer": no default title
    assert json.loads((tmp_path / "n.json").read_text())["title"] == ""
    assert [ax.get_title() for ax in figures[1].axes] == ["image", "head 0", "mean of heads", "rollout"]
    plots.plot_attention_maps(np.zeros((3, 4, 4)), {"heads": np.zeros((2, 2))}, tmp_path / "h", "x")
    assert [ax.get_title() for ax in figures[2].axes] == ["image", "heads"]  # a panel named "heads"


def test_display_image_of_integer_bfloat16_and_grad_inputs():
    u8 = np.array([[[0, 255]], [[128, 0]], [[255, 255]]], dtype=np.uint8)  # (3, 1, 2)
    np.testing.assert_allclose(plots._display_image(u8)[0, 0], [0.0, 128 / 255, 1.0], atol=1e-9)
    t = torch.tensor([[[0.0, 1.0]], [[0.5, 0.25]], [[1.0, 0.0]]], requires_grad=True)
    np.testing.assert_allclose(plots._display_image(t)[0, 1], [1.0, 0.25, 0.0], atol=1e-9)
    np.testing.assert_allclose(plots._display_image(t.detach().bfloat16())[0, 0], [0.0, 0.5, 1.0], atol=1e-9)
    only_mean = plots._display_image(np.full((3, 1, 2), 4.0) + np.arange(2), mean=[9.0] * 3)
    np.testing.assert_allclose(only_mean[0], [[0.0] * 3, [1.0] * 3], atol=1e-9)  # no std: min-max
    gray = plots._display_image(torch.tensor([[[0.0, 2.0], [1.0, 2.0]]]))  # (1, H, W): one grey channel
    assert gray.shape == (2, 2, 3)
    np.testing.assert_allclose(gray[1, 0], [0.5] * 3)
    flat = plots._display_image(np.full((3, 2, 2), 7.0))  # a constant image: black, not NaN
    assert np.isfinite(flat).all() and (flat == 0).all()
    lo = plots._display_image(np.full((3, 1, 1), -3.0), mean=[0.0] * 3, std=[1.0] * 3)
    assert (lo == 0).all()  # clipped at 0


def test_probe_accuracy_plot_as_drawn(tmp_path, figures):
    runs = {"vit": {"b0": 0.5, "b1": 0.75}, "cnn": {"b0": 0.25, "b1": 1.0}}
    plots.plot_probe_accuracy(runs, tmp_path / "p", chance=0.1)
    fig = figures[0]
    ax = fig.axes[0]
    np.testing.assert_allclose(fig.get_size_inches(), [6.4, 4.2])
    vit_line, cnn_line, chance = ax.get_lines()
    for r, line in enumerate((vit_line, cnn_line)):
        assert (line.get_marker(), line.get_linestyle()) == ("o", "-")
        assert to_rgba(line.get_color()) == to_rgba(f"C{r}")
    assert (
        chance.get_linestyle() == "--"
        and chance.get_linewidth() == 1
        and to_rgba(chance.get_color()) == to_rgba("gray")
    )
    for label in ax.get_xticklabels():
        assert label.get_rotation() == 60 and label.get_ha() == "right" and label.get_fontsize() == 7
    legend = ax.get_legend()
    assert (
        _texts(legend.get_texts()) == ["vit", "cnn", "chance"] and legend.get_texts()[0].get_fontsize() == 8
    )
    assert _grid_alpha(ax) == 0.3 and ax.get_title() == "Linear probe accuracy"
    assert ax.get_xlabel() == ""  # the layer names say it
    plots.plot_probe_accuracy({"a": {"x": 0.5, "y": 0.1, "z": 0.2}, "b": {"y": 0.5}}, tmp_path / "q")
    ax = figures[1].axes[0]
    assert ax.get_xlabel() == "layer index" and all(float(t).is_integer() for t in ax.get_xticks())
    assert [line.get_label() for line in ax.get_lines()] == ["a", "b"]  # no chance line unless asked
    text = (tmp_path / "q.json").read_text()
    assert text.startswith(
        '{\n "title": "Linear probe accuracy",\n "chance": null,\n "runs": {\n  "a": {\n   "x": 0.5,'
    )


def _saved_text_figures(monkeypatch):
    from matplotlib.figure import Figure

    saved = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self) or real(self, *a, **k))
    return saved


def test_text_attention_plot_size_resolution_and_labels(tmp_path, monkeypatch):
    from PIL import Image

    saved = _saved_text_figures(monkeypatch)
    maps = np.random.default_rng(0).random((9, 3, 3))
    report = {"tokens": ["a", "b", "c"], "layers": ["blocks.0.attn"], "maps": {"blocks.0.attn": maps}}
    ta.plot_text_attention(report, 0, str(tmp_path / "t.png"), max_heads=2)
    img = Image.open(tmp_path / "t.png")
    assert img.size == (round(3.2 * 2 * 150), round(3.4 * 150))  # 3.2 in per head, 3.4 in high, 150 dpi
    assert img.info["dpi"] == pytest.approx((150, 150), abs=0.1)
    ax = saved[0].axes[0]
    assert ax.images[0].get_cmap().name == "viridis" and ax.title.get_fontsize() == 8
    for label in ax.get_xticklabels():
        assert label.get_fontsize() == 5 and label.get_rotation() == 90
    for label in ax.get_yticklabels():
        assert label.get_fontsize() == 5 and label.get_rotation() == 0
    ta.plot_text_attention(report, "blocks.0.attn", str(tmp_path / "all.png"))
    assert len(saved[1].axes) == 8  # at most 8 heads by default
    edge = {"tokens": [str(i) for i in range(64)], "layers": ["x"], "maps": {"x": np.zeros((1, 64, 64))}}
    ta.plot_text_attention(edge, "x", str(tmp_path / "edge.png"))
    assert len(saved[2].axes[0].get_xticks()) == 64  # 64 tokens are still labelled


def test_translation_maps_label_both_sentences(tmp_path, monkeypatch):
    saved = _saved_text_figures(monkeypatch)
    report = {
        "src_tokens": ["s0", "s1", "</s>"],
        "tgt_tokens": ["<s>", "t1"],
        "layers": ["encoder.0.attn", "decoder.0.cross_attn"],
        "maps": {"encoder.0.attn": np.zeros((1, 3, 3)), "decoder.0.cross_attn": np.zeros((1, 2, 3))},
    }
    ta.plot_text_attention(report, 1, str(tmp_path / "x.png"))
    ax = saved[0].axes[0]
    assert _texts(ax.get_xticklabels()) == ["s0", "s1", "</s>"] and _texts(ax.get_yticklabels()) == [
        "<s>",
        "t1",
    ]
    assert ax.get_title() == "decoder.0.cross_attn h0"


# ------------------------------------------------------------------------------ text statistics
def test_token_distances_default_offset_and_query_weights():
    assert token_distances_equal(ta.token_distances(1, 4), [[3, 2, 1, 0]])  # the last position queries
    assert ta.token_distances(2, 2).dtype == torch.float64
    w = ta._query_weights(torch.zeros(2, 1, 3, 3), torch.tensor([[False, True, False], [True, True, False]]))
    assert w.shape == (2, 1, 3) and w.dtype == torch.float64
    assert w[:, 0].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    ones = ta._query_weights(torch.zeros(2, 1, 3, 4), None)
    assert ones.shape == (2, 1, 3) and ones.dtype == torch.float64 and (ones == 1).all()


def token_distances_equal(t, rows):
    return t.tolist() == rows


def test_head_statistics_keep_heads_apart_and_weight_real_queries():
    # head 0 looks one token back, head 1 at itself; query 0 has no token before it (looks at itself)
    back = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    self_ = torch.eye(3)
    probs = torch.stack([back, self_])[None]  # (1, 2, 3, 3)
    torch.testing.assert_close(ta.head_distance(probs), torch.tensor([2 / 3, 0.0], dtype=torch.float64))
    pad = torch.tensor([[True, False, False]])  # query 0 is padding
    torch.testing.assert_close(ta.head_distance(probs, pad), torch.tensor([1.0, 0.0], dtype=torch.float64))
    half = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0.5, 0.5]])
    ent = ta.head_entropy(torch.stack([half, self_])[None], pad)
    torch.testing.assert_close(ent, torch.tensor([math.log(2), 0.0], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["gpt_nano", "bert_nano"])
def test_text_report_uniform_entropy_in_full_precision(kind):
    """log(#visible keys) averaged over queries: 1..L keys for a causal GPT, all L for BERT."""
    from vitlens.text.data import BERT_SPECIALS, CharTokenizer

    tok = CharTokenizer(list("abc "), specials=BERT_SPECIALS if kind == "bert_nano" else ())
    torch.manual_seed(0)
    model = vitlens.create_model(kind, vocab_size=tok.vocab_size).eval()
    rep = ta.text_attention_report(model, tok, "abc abc")
    L = len(rep["tokens"])
    want = math.fsum(math.log(i) for i in range(1, L + 1)) / L if kind == "gpt_nano" else math.log(L)
    assert rep["uniform_entropy"] == pytest.approx(want, rel=1e-13, abs=0)
    assert rep["tokens"][-3:] == list("abc") and len(rep["entropy"]) == len(rep["distance"]) == 2


def test_head_statistics_of_a_single_real_query():
    """The mean is over real queries: one real query gives its own entropy and distance."""
    probs = torch.tensor([[[[0.5, 0.5, 0.0], [0.25, 0.25, 0.5], [0.0, 0.0, 1.0]]]])  # (1, 1, 3, 3)
    pad = torch.tensor([[True, False, True]])  # only query 1 is real
    ent = 0.5 * math.log(4) + 0.5 * math.log(2)  # -(2 * 0.25 log 0.25 + 0.5 log 0.5)
    torch.testing.assert_close(ta.head_entropy(probs, pad), torch.tensor([ent], dtype=torch.float64))
    torch.testing.assert_close(ta.head_distance(probs, pad), torch.tensor([0.75], dtype=torch.float64))
    one = probs[:, :, :1, :1] / probs[:, :, :1, :1]  # one token attending to itself
    assert ta.head_entropy(one).tolist() == [0.0] and ta.head_distance(one).tolist() == [0.0]


def test_probe_accuracy_plot_of_a_single_run_labels_its_layers(tmp_path, figures):
    plots.plot_probe_accuracy({"only": {"b0": 0.5, "b1": 0.75, "b2": 1.0}}, tmp_path / "one")
    ax = figures[0].axes[0]
    assert _texts(ax.get_xticklabels()) == ["b0", "b1", "b2"]
    np.testing.assert_allclose(ax.get_lines()[0].get_xydata(), [[0, 0.5], [1, 0.75], [2, 1.0]])

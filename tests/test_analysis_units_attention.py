"""Fast unit tests of vitlens.analysis attention, text attention and probes, against hand-computed values.

Attention patterns are planted by hand on tiny non-square grids with non-square patches (so rows
and columns, heights and widths cannot be confused), probes get noise-free planted tokens whose
accuracies are known exactly, and text statistics are checked on sequences short enough to sum by
hand. Probe tests use only the public ``localization_probes`` (its internals may change).
"""

from __future__ import annotations

import importlib
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlens
from vitlens.analysis import ActivationCapture
from vitlens.analysis.attention import (
    AttentionRecord,
    attention_distance,
    attention_entropy,
    attention_layers,
    attention_maps,
    attention_rollout,
    mean_attention_distance,
    num_heads,
    patch_distances,
    resolve_attention_layers,
    token_geometry,
)
from vitlens.analysis.probes import localization_probes
from vitlens.analysis.text_attention import (
    head_distance,
    head_entropy,
    self_attention_layers,
    text_attention_report,
    token_distances,
    translation_attention_report,
)
from vitlens.errors import ConfigError, DataError, ModelError
from vitlens.layers.attention import Attention

att = importlib.import_module("vitlens.analysis.attention")
ta = importlib.import_module("vitlens.analysis.text_attention")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return vitlens.create_model("vit_micro_patch4_32", depth=2).eval()  # 2 blocks, 4 heads, 8x8 + [CLS]


# ======================================== layers, records, geometry
def test_resolve_attention_layers_indices_names_and_errors(vit):
    assert attention_layers(vit) == ["blocks.0.attn", "blocks.1.attn"]
    assert resolve_attention_layers(vit) == ["blocks.0.attn", "blocks.1.attn"]
    assert resolve_attention_layers(vit, -2) == ["blocks.0.attn"]  # -len is the first
    assert resolve_attention_layers(vit, 1) == ["blocks.1.attn"]
    assert resolve_attention_layers(vit, "blocks.1.attn") == ["blocks.1.attn"]
    assert resolve_attention_layers(vit, [-1, "blocks.0.attn"]) == ["blocks.1.attn", "blocks.0.attn"]
    for bad in (2, -3):
        with pytest.raises(ConfigError, match=f"index {bad} out of range: the model has 2"):
            resolve_attention_layers(vit, bad)
    with pytest.raises(
        ConfigError,
        match=r"'blocks.0.mlp' is not an attention layer.*\['blocks.0.attn', 'blocks.1.attn'\] or",
    ):
        resolve_attention_layers(vit, ["blocks.0.mlp"])
    four = vitlens.create_model("vit_micro_patch4_32", depth=4)
    with pytest.raises(ConfigError, match=r"'blocks.3.attn'\] or an index"):  # all four listed: no "..."
        resolve_attention_layers(four, "nope")
    deep = vitlens.create_model("vit_micro_patch4_32", depth=5)
    with pytest.raises(
        ConfigError, match=r"\['blocks.0.attn', 'blocks.1.attn', 'blocks.2.attn', 'blocks.3.attn'\] \.\.\."
    ):
        resolve_attention_layers(deep, "nope")
    with pytest.raises(ModelError, match="no attention layers that vitlens can record"):
        resolve_attention_layers(nn.Sequential(nn.Linear(2, 2)))


def test_attention_record_store_sink_and_errors():
    rec = AttentionRecord(["b", "a"])
    p1, p2 = torch.rand(2, 3, 4, 4), torch.rand(1, 3, 4, 4)
    rec._store("a", p1)
    rec._store("a", p2)  # accumulate=False: the last batch replaces the first
    assert rec["a"].shape == (1, 3, 4, 4)
    with pytest.raises(KeyError, match="no attention recorded for 'b'"):
        rec["b"]
    rec._store("b", p1)
    assert [t.shape[0] for t in rec.in_order()] == [2, 1]  # layer order, not insertion order
    rec.clear()
    assert rec.probs == {}
    acc = AttentionRecord(["a"], accumulate=True)
    acc._store("a", p1)
    acc._store("a", p2)
    assert torch.equal(acc["a"], torch.cat([p1, p2]))
    got = []
    sunk = AttentionRecord(["a"], sink=lambda name, p: got.append((name, p)))
    sunk._store("a", p1.requires_grad_())
    assert sunk.probs == {} and got[0][0] == "a" and not got[0][1].requires_grad
    with pytest.raises(
        RuntimeError, match=r"'a' gave no \(B, heads, L, S\) probabilities \(got \(3, 4, 4\)\)"
    ):
        rec._store("a", torch.rand(3, 4, 4))
    with pytest.raises(RuntimeError, match=r"\(got None\)"):
        rec._store("a", None)


def test_num_heads_and_token_geometry(vit):
    assert num_heads(vit, "blocks.0.attn") == 4
    hf_like = nn.Module()
    hf_like.attn = nn.Linear(2, 2)
    hf_like.attn.config = type("Cfg", (), {"num_attention_heads": 6})()
    assert num_heads(hf_like, "attn") == 6
    with pytest.raises(ModelError, match=r"cannot tell how many heads 'attn' \(Linear\) has"):
        num_heads(_bare(), "attn")
    geo = token_geometry(vit)
    assert (geo.grid_size, geo.patch_size, geo.num_prefix_tokens, geo.has_cls) == ((8, 8), (4, 4), 1, True)
    gap = vitlens.create_model("vit_micro_patch4_32", depth=1, class_token=False, pool="gap", num_registers=2)
    geo = token_geometry(gap)
    assert (geo.num_prefix_tokens, geo.has_cls) == (2, False)
    with pytest.raises(ModelError, match="cannot tell where Linear's tokens sit"):
        token_geometry(nn.Linear(2, 2))


def _bare():
    m = nn.Module()
    m.attn = nn.Linear(2, 2)
    return m


def test_patch_distances_on_a_non_square_grid_of_non_square_patches():
    d = patch_distances((2, 3), (4, 8))  # 2 rows x 3 columns of 4 px high, 8 px wide patches
    assert d.shape == (6, 6) and d.dtype == torch.float64
    assert d[0, 1].item() == 8.0  # right neighbour: one patch width
    assert d[0, 3].item() == 4.0  # neighbour below: one patch height
    assert d[0, 5].item() == pytest.approx(math.hypot(4, 16))
    assert d[2, 3].item() == pytest.approx(math.hypot(4, 16))  # (0, 2) -> (1, 0)
    assert torch.equal(d, d.T) and torch.all(d.diagonal() == 0)
    assert patch_distances(2, 3)[0, 2].item() == 3.0  # ints are a square grid of square patches


def _planted(gh, gw, step_r, step_c, prefix=0, prefix_mass=0.0):
    """(1, 1, P+N, P+N): each patch query attends to the patch (r + step_r, c + step_c) (mod grid),
    and ``prefix_mass`` of every row goes to the prefix tokens."""
    n = gh * gw
    a = torch.zeros(prefix + n, prefix + n)
    for r in range(gh):
        for c in range(gw):
            q = prefix + r * gw + c
            k = prefix + ((r + step_r) % gh) * gw + (c + step_c) % gw
            a[q, k] = 1.0 - prefix_mass
            a[q, :prefix] = prefix_mass / max(prefix, 1)
    a[:prefix, prefix:] = 1.0 / n
    return a[None, None]


def test_attention_distance_of_planted_heads_and_images():
    gh, gw, ph, pw = 3, 1, 4, 8  # a column of 3 patches: "below" is the only neighbour
    below = _planted(gh, gw, 1, 0, prefix=1, prefix_mass=0.9)
    # rows 0->1 and 1->2 are one patch height (4 px); row 2 wraps to row 0: two heights (8 px)
    d = attention_distance(below, (gh, gw), (ph, pw), num_prefix_tokens=1)
    torch.testing.assert_close(d, torch.tensor([(4 + 4 + 8) / 3], dtype=torch.float64))
    grid, patch = (2, 3), (4, 8)
    right = _planted(*grid, 0, 1)  # columns 0->1, 1->2: 8 px; column 2 -> 0: 16 px
    self_ = _planted(*grid, 0, 0)
    heads = torch.cat([right, self_], dim=1)  # (1, 2 heads, 6, 6)
    images = torch.cat([heads, heads.flip(1)], dim=0)  # image 1 swaps the heads
    d = attention_distance(images, grid, patch, num_prefix_tokens=0)
    per_image_right = (8 + 8 + 16) / 3
    torch.testing.assert_close(d, torch.full((2,), per_image_right / 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"7 tokens do not match 0 prefix tokens \+ 6 patches"):
        attention_distance(torch.rand(1, 1, 7, 7), grid, patch, num_prefix_tokens=0)
    with pytest.raises(
        ValueError, match=r"self-attention probabilities \(B, heads, L, L\), got \(1, 1, 6, 7\)"
    ):
        attention_distance(torch.rand(1, 1, 6, 7), grid, patch, num_prefix_tokens=0)


def test_renorm_rows_keeps_empty_rows_empty():
    a = torch.tensor([[1.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        att._renorm_rows(a), torch.tensor([[0.25, 0.75], [0.0, 0.0]], dtype=torch.float64)
    )


def test_head_sums_average_distance_over_patches_and_entropy_over_all_queries(vit, monkeypatch):
    geo = att.TokenGeometry((2, 3), (4, 8), 1, True)
    sums = att._HeadSums(vit, ["blocks.0.attn"], geo, "cpu")
    with pytest.raises(DataError, match="no batches to measure attention on"):
        sums.means()
    right = _planted(2, 3, 0, 1, prefix=1, prefix_mass=0.5)  # 7 tokens: [CLS] + 6 patches
    probs = right.expand(2, 4, 7, 7).clone()  # 2 images, 4 heads
    sums.add_layer("blocks.0.attn", probs)
    sums.images = 2
    out = sums.means()
    assert out["layers"] == ["blocks.0.attn"] and out["distance"].shape == (1, 4)
    np.testing.assert_allclose(out["distance"], np.full((1, 4), 32 / 3), rtol=1e-12)
    # entropy per query: patch queries split 0.5 / 0.5 (log 2), the [CLS] query is uniform on 6 patches
    np.testing.assert_allclose(
        out["entropy"], np.full((1, 4), (6 * math.log(2) + math.log(6)) / 7), rtol=1e-6
    )
    monkeypatch.setattr(att, "sum_across_ranks", lambda parts, what: [2 * p for p in parts])
    sums.sum_across_ranks()  # two identical ranks: sums and image counts double, the means stay
    assert sums.images == 4 and isinstance(sums.images, int)
    np.testing.assert_allclose(sums.means()["distance"], out["distance"], rtol=1e-12)
    np.testing.assert_allclose(sums.means()["entropy"], out["entropy"], rtol=1e-12)


def test_mean_attention_distance_forwards_its_options(vit):
    data = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    one = mean_attention_distance(vit, data, layers=[1], max_batches=1)
    assert one.shape == (1, 4)
    both = mean_attention_distance(vit, data)
    assert both.shape == (2, 4)
    np.testing.assert_allclose(one[0], mean_attention_distance(vit, data[:1], layers=[1])[0], rtol=1e-12)
    assert not np.allclose(one[0], mean_attention_distance(vit, data[1:], layers=[1])[0], rtol=1e-9)


# ======================================== entropy and rollout
def test_entropy_of_hand_made_distributions():
    p = torch.tensor(
        [[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], [[0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]]
    )  # (2 heads, 2, 3)
    per_query = [[math.log(2), 0.0], [1.5 * math.log(2), math.log(3)]]
    torch.testing.assert_close(
        attention_entropy(p, reduce=False), torch.tensor(per_query, dtype=torch.float64)
    )
    torch.testing.assert_close(
        attention_entropy(p),
        torch.tensor([math.log(2) / 2, (1.5 * math.log(2) + math.log(3)) / 2], dtype=torch.float64),
    )
    batched = torch.stack([p, p.flip(0)])  # (B=2, heads=2, 2, 3): both heads average the same two rows
    torch.testing.assert_close(attention_entropy(batched), attention_entropy(p).mean().expand(2))
    with pytest.raises(ValueError, match=r"expected probabilities \(..., heads, L, S\), got \(3,\)"):
        attention_entropy(torch.full((3,), 1 / 3))


def test_rollout_min_fusion_dict_input_and_argument_checks():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(1, 2, 3, 3, generator=g), -1)
    b = torch.softmax(torch.randn(1, 2, 3, 3, generator=g), -1)
    eye = torch.eye(3, dtype=torch.float64)

    def step(x):
        m = 0.5 * x.double().amin(1) + 0.5 * eye
        return m / m.sum(-1, keepdim=True)

    torch.testing.assert_close(attention_rollout({"l0": a, "l1": b}, head_fusion="min"), step(b) @ step(a))
    assert not torch.allclose(attention_rollout([a, b]), attention_rollout([b, a]))  # order matters
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"discard_ratio must be in \[0, 1\), got {bad}"):
            attention_rollout([a], discard_ratio=bad)
    with pytest.raises(ValueError, match=r"head_fusion must be one of \['max', 'mean', 'min'\], got 'sum'"):
        attention_rollout([a], head_fusion="sum")
    # discard_ratio 0.5 of 9 entries: the 4 smallest fused entries are zeroed before adding I
    fused = a.double().mean(1)[0]
    kept = fused.flatten().clone()
    kept[fused.flatten().argsort()[:4]] = 0
    m = 0.5 * kept.view(3, 3) + 0.5 * eye
    torch.testing.assert_close(attention_rollout([a], discard_ratio=0.5)[0], m / m.sum(-1, keepdim=True))


# ======================================== text attention
def test_token_distances_and_padding_aware_head_statistics():
    assert token_distances(3, 3).tolist() == [[0, 1, 2], [1, 0, 1], [2, 1, 0]]
    assert token_distances(2, 4).tolist() == [[2, 1, 0, 1], [3, 2, 1, 0]]  # queries are the last two keys
    assert token_distances(2, 3, query_offset=0).tolist() == [[0, 1, 2], [1, 0, 1]]
    probs = torch.tensor([[[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]]]])  # (1, 1, 3, 3)
    torch.testing.assert_close(
        head_entropy(probs), torch.tensor([(math.log(2) + math.log(3)) / 3], dtype=torch.float64)
    )
    pad = torch.tensor([[False, False, True]])  # the third query is padding
    torch.testing.assert_close(head_entropy(probs, pad), torch.tensor([math.log(2) / 2], dtype=torch.float64))
    # distances: query 0 -> 0.5 * 1, query 1 -> 1 * 1, query 2 -> (2 + 1 + 0) / 3
    torch.testing.assert_close(head_distance(probs), torch.tensor([(0.5 + 1 + 1) / 3], dtype=torch.float64))
    torch.testing.assert_close(head_distance(probs, pad), torch.tensor([0.75], dtype=torch.float64))
    torch.testing.assert_close(  # query i at position i + 1: query 0 -> 0.5 * 1 + 0.5 * 0, query 1 -> 0
        head_distance(probs[:, :, :2], query_offset=1), torch.tensor([0.25], dtype=torch.float64)
    )
    all_pad = torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(head_distance(probs, all_pad), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"query_padding_mask must be \(B, L\) = \(1, 3\), got \(1, 2\)"):
        head_entropy(probs, pad[:, :2])
    for fn in (head_entropy, head_distance):
        with pytest.raises(ValueError, match=r"expected probabilities \(B, heads, L, S\), got \(3, 3\)"):
            fn(probs[0, 0])


def test_self_attention_layers_leave_out_cross_attention():
    m = nn.Module()
    m.decoder = nn.Module()
    m.decoder.attn, m.decoder.cross_attn = Attention(8, 2), Attention(8, 2, cross=True)
    assert attention_layers(m) == ["decoder.attn", "decoder.cross_attn"]
    assert self_attention_layers(m) == ["decoder.attn"]


@pytest.mark.parametrize("kind", ["gpt_nano", "bert_nano"])
def test_text_attention_report_on_a_tiny_model(kind):
    from vitlens.text.data import BERT_SPECIALS, CharTokenizer

    tok = CharTokenizer(list("abc "), specials=BERT_SPECIALS if kind == "bert_nano" else ())
    torch.manual_seed(0)
    model = vitlens.create_model(kind, vocab_size=tok.vocab_size).eval()
    rep = text_attention_report(model, tok, "abc a")
    L = 5 if kind == "gpt_nano" else 6  # BERT reads [CLS] first
    want_tokens = list("abc a") if kind == "gpt_nano" else ["[CLS]", *"abc a"]
    assert rep["tokens"] == want_tokens and rep["layers"] == ["blocks.0.attn", "blocks.1.attn"]
    assert rep["maps"]["blocks.0.attn"].shape == (2, L, L)
    uniform = np.mean(np.log(np.arange(1, L + 1))) if kind == "gpt_nano" else math.log(L)
    assert rep["uniform_entropy"] == pytest.approx(uniform)
    maps = torch.as_tensor(rep["maps"]["blocks.1.attn"])[None].double()
    assert rep["entropy"][1] == pytest.approx(head_entropy(maps).tolist(), rel=1e-5)
    assert rep["distance"][1] == pytest.approx(head_distance(maps).tolist(), rel=1e-5)
    if kind == "gpt_nano":  # causal: nothing above the diagonal
        assert np.abs(np.triu(rep["maps"]["blocks.0.attn"], 1)).max() == 0
    with pytest.raises(ModelError, match="Linear is not a GPT or BERT"):
        text_attention_report(nn.Linear(2, 2), tok, "ab")


# ======================================== probes (public behaviour only)
K = 3


class Exact(nn.Module):
    """Noise-free planted tokens (B, 2, K + 1): token 0 is the class one-hot (plus a marker that
    tells the positions apart), token 1 is the same constant vector for every image."""

    num_prefix_tokens = 0

    def __init__(self):
        super().__init__()
        self.tokens = nn.Identity()

    def forward(self, onehot):
        B = onehot.shape[0]
        t = torch.zeros(B, 2, K + 1)
        t[:, 0, :K] = onehot
        t[:, 0, K] = 1.0
        t[:, 1, K] = -1.0
        self.tokens(t)
        return onehot


def _labelled(labels, batch=8):
    y = torch.as_tensor(labels)
    return [(F.one_hot(y[s : s + batch], K).float(), y[s : s + batch]) for s in range(0, len(y), batch)]


def test_per_position_probe_accuracies_are_exact_on_planted_tokens():
    train = _labelled([0] * 10 + [1] * 4 + [2] * 2)  # class 0 is the majority
    test = _labelled([0, 1, 2, 2, 0, 1, 2, 2])  # 2 of 8 test images are class 0
    r = localization_probes(Exact(), train, test, ["tokens"], class_probe="per_position")["tokens"]
    # token 0 reads the class; token 1 is constant, so its probe can only say "class 0" (2/8 right)
    np.testing.assert_allclose(r["class_acc_map"], [[1.0, 0.25]])
    assert r["class_acc"] == pytest.approx(0.625) and r["position_acc"] == 1.0
    np.testing.assert_allclose(r["position_acc_map"], [[1.0, 1.0]])
    assert (r["grid_size"], r["num_positions"], r["num_classes"]) == ((1, 2), 2, 3)
    assert (r["chance_class"], r["chance_position"]) == (pytest.approx(1 / 3), 0.5)
    assert r["train_tokens"] == 16 * 2 and r["class_probe"] == "per_position"


def test_probe_options_reach_the_fit():
    train = _labelled([0] * 10 + [1] * 3 + [2] * 3)
    test = _labelled([1, 2, 1, 2, 0, 1, 2, 1])
    r = localization_probes(Exact(), train, test, ["tokens"])["tokens"]
    assert r["class_probe"] == "shared" and r["class_acc_map"][0, 0] == 1.0
    # an enormous ridge shrinks every weight to ~0: only the majority class (0, 1 of 8) is predicted
    big = localization_probes(Exact(), train, test, ["tokens"], ridge=1e9)["tokens"]
    np.testing.assert_allclose(big["class_acc_map"], [[0.125, 0.125]])
    cut = localization_probes(Exact(), train, test, ["tokens"], max_images=12)["tokens"]
    assert cut["train_tokens"] == 12 * 2
    # classes found while streaming: the first batches know only 0 and 1, the last adds 2
    late = _labelled([0, 1] * 8 + [2] * 8)
    grown = localization_probes(Exact(), late, test, ["tokens"], class_probe="per_position")["tokens"]
    assert grown["num_classes"] == 3 and grown["class_acc_map"][0, 0] == 1.0
    with pytest.raises(DataError, match="no test images"):
        localization_probes(Exact(), train, [], ["tokens"])


class Maps(nn.Module):
    """A (B, 2, H, W) feature map: channel 0 codes the row, channel 1 the column (noise-free)."""

    def __init__(self, h, w):
        super().__init__()
        self.h, self.w = h, w
        self.fmap = nn.Identity()

    def forward(self, onehot):
        rows = torch.arange(self.h, dtype=torch.float32)[:, None].expand(self.h, self.w)
        cols = torch.arange(self.w, dtype=torch.float32)[None, :].expand(self.h, self.w)
        m = torch.stack([rows, cols])[None].expand(onehot.shape[0], 2, self.h, self.w)
        self.fmap(torch.cat([m, m**2, m[:, :1] * m[:, 1:]], 1))
        return onehot


def test_cnn_maps_pool_only_when_larger_than_the_grid():
    data = _labelled([0, 1, 2, 0, 1, 2, 0, 1])
    r = localization_probes(Maps(6, 8), data, data, ["fmap"], grid=(3, 4))["fmap"]
    assert r["grid_size"] == (3, 4) and r["class_acc_map"].shape == (3, 4) and r["num_positions"] == 12
    small = localization_probes(Maps(2, 3), data, data, ["fmap"], grid=4)["fmap"]
    assert small["grid_size"] == (2, 3)  # smaller maps keep their size
    same = localization_probes(Maps(2, 3), data, data, ["fmap"])["fmap"]
    assert same["grid_size"] == (2, 3) and same["train_tokens"] == 8 * 6


# ======================================== maps, capture reuse, translation, text plots
def _one_hot_rows(L, targets):
    a = torch.zeros(1, 1, L, L)
    for q, k in enumerate(targets):
        a[0, 0, q, k] = 1.0
    return a


@pytest.mark.parametrize("layer", [0, -1])
def test_attention_maps_read_the_cls_row_row_major_on_a_non_square_grid(monkeypatch, layer):
    """4 x 10 patches + [CLS]. Layer 0: [CLS] looks at patch (1, 7) (and half at itself); layer 1:
    [CLS] looks at patch (2, 3). Patch queries look at themselves."""
    model = vitlens.create_model(
        "vit_micro_patch4_32", img_size=(16, 40), depth=2, pos_embed="sincos2d"
    ).eval()
    L = 1 + 40
    first = _one_hot_rows(L, [1 + 1 * 10 + 7] + list(range(1, L)))
    first[0, 0, 0] = 0.5 * first[0, 0, 0]
    first[0, 0, 0, 0] = 0.5  # [CLS] keeps half on itself: left out and renormalised away
    second = _one_hot_rows(L, [1 + 2 * 10 + 3] + list(range(1, L)))
    planted = {"blocks.0.attn": first.expand(1, 4, L, L), "blocks.1.attn": second.expand(1, 4, L, L)}
    asked = []
    monkeypatch.setattr(
        att,
        "attention_probs",
        lambda m, x, layers: asked.append(list(layers)) or {n: planted[n] for n in layers},
    )
    maps = attention_maps(model, torch.zeros(3, 16, 40), layer=layer)
    target = "blocks.0.attn" if layer == 0 else "blocks.1.attn"
    assert asked == [["blocks.0.attn"] if layer == 0 else ["blocks.0.attn", "blocks.1.attn"]]
    assert maps["layer"] == target and maps["grid_size"] == (4, 10)
    where = (1, 7) if layer == 0 else (2, 3)
    want = np.zeros((4, 10))
    want[where] = 1.0
    assert maps["heads"].shape == (4, 4, 10)
    np.testing.assert_allclose(maps["heads"], np.broadcast_to(want, (4, 4, 10)))
    np.testing.assert_allclose(maps["mean"], want)
    # rollout: the residual keeps half of each token on itself; patch rows are identities, so
    # [CLS] -> patch mass is what the [CLS] rows send, renormalised over patches
    if layer == 0:
        np.testing.assert_allclose(maps["rollout"], want)
    else:  # two layers: [CLS] reaches (2, 3) through layer 1 and (1, 7) through layer 0
        a0 = 0.5 * first[0, 0].double() + 0.5 * torch.eye(L, dtype=torch.float64)
        a1 = 0.5 * second[0, 0].double() + 0.5 * torch.eye(L, dtype=torch.float64)
        r = (a1 / a1.sum(-1, keepdim=True)) @ (a0 / a0.sum(-1, keepdim=True))
        row = r[0, 1:] / r[0, 1:].sum()
        np.testing.assert_allclose(maps["rollout"], row.view(4, 10).numpy(), rtol=1e-12)
        assert maps["rollout"][2, 3] > maps["rollout"][1, 7] > 0


def test_attention_maps_without_cls_average_the_patch_queries(monkeypatch):
    model = vitlens.create_model(
        "vit_micro_patch4_32", depth=1, class_token=False, pool="gap", num_registers=2
    )
    model.eval()
    P, N = 2, 64
    a = torch.zeros(1, 1, P + N, P + N)
    a[..., :, 0] = 0.5  # every query puts half on the first register (left out)
    a[..., P:, P + 5] = 0.5  # patch queries: the other half on patch 5 = (0, 5)
    a[..., :P, P + 9] = 0.5  # register queries (not patch queries: ignored)
    planted = {"blocks.0.attn": a.expand(1, 4, P + N, P + N)}
    monkeypatch.setattr(att, "attention_probs", lambda m, x, layers: planted)
    maps = attention_maps(model, torch.zeros(3, 32, 32), layer=0)
    want = np.zeros((8, 8))
    want[0, 5] = 1.0
    np.testing.assert_allclose(maps["mean"], want)
    with pytest.raises(ValueError, match="takes one image \\(C, H, W\\), got a batch of 2"):
        attention_maps(model, torch.zeros(2, 3, 32, 32))


def test_capture_runs_twice_without_warning():
    seq = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with ActivationCapture(seq, ["0", "1"]) as cap, warnings.catch_warnings():
        warnings.simplefilter("error")
        first = cap.run(torch.randn(2, 3))
        second = cap.run(torch.randn(5, 3))
    assert first["0"].shape == (2, 3) and second["1"].shape == (5, 3)


SENTENCES_DE = ["ein hund läuft .", "eine katze schläft .", "ein mann fährt rad .", "zwei hunde spielen ."]
SENTENCES_EN = ["a dog runs .", "a cat sleeps .", "a man rides a bike .", "two dogs play ."]


def test_translation_attention_report_layout():
    from vitlens.text.data import train_bpe

    tok = train_bpe(SENTENCES_DE + SENTENCES_EN, vocab_size=80)
    torch.manual_seed(0)
    model = vitlens.create_model(
        "transformer_nano", src_vocab_size=tok.get_vocab_size(), tgt_vocab_size=tok.get_vocab_size()
    ).eval()
    rep = translation_attention_report(model, tok, "ein hund läuft .", "a dog runs .")
    S, T = len(rep["src_tokens"]), len(rep["tgt_tokens"])
    assert (
        rep["src_tokens"][-1] == "</s>" and rep["tgt_tokens"][0] == "<s>" and "<s>" not in rep["src_tokens"]
    )
    assert rep["src_tokens"][:-1] == [tok.id_to_token(i) for i in tok.encode("ein hund läuft .").ids]
    names = rep["layers"]
    assert {n.split(".")[0] for n in names} == {"encoder", "decoder"}
    for n, dist in zip(names, rep["distance"]):
        h = rep["maps"][n].shape[0]
        if n.startswith("encoder"):
            assert rep["maps"][n].shape == (h, S, S) and len(dist) == h
        elif n.endswith("cross_attn"):
            assert rep["maps"][n].shape == (h, T, S) and dist is None
        else:
            assert rep["maps"][n].shape == (h, T, T) and len(dist) == h
        ent = head_entropy(torch.as_tensor(rep["maps"][n])[None].double())
        np.testing.assert_allclose(rep["entropy"][names.index(n)], ent.numpy(), rtol=1e-5)
    assert ta._axis_labels(rep, "encoder.0.attn") == (rep["src_tokens"], rep["src_tokens"])
    assert ta._axis_labels(rep, "decoder.0.attn") == (rep["tgt_tokens"], rep["tgt_tokens"])
    assert ta._axis_labels(rep, "decoder.0.cross_attn") == (rep["tgt_tokens"], rep["src_tokens"])
    assert ta._axis_labels({"tokens": ["a", "b"]}, "blocks.0.attn") == (["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="Linear is not an encoder-decoder"):
        translation_attention_report(nn.Linear(2, 2), tok, "a", "b")


def test_text_head_statistics_average_over_every_image():
    one = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])  # (1, 1, 2, 2): entropies 0 and log 2
    two = torch.cat([one, torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])])  # second image: log 2 twice
    torch.testing.assert_close(head_entropy(two), torch.tensor([3 * math.log(2) / 4], dtype=torch.float64))
    torch.testing.assert_close(
        ta.head_distance(two), torch.tensor([(0 + 0.5 + 0.5 + 0.5) / 4], dtype=torch.float64)
    )
    pad = torch.tensor([[False, False], [False, True]])
    torch.testing.assert_close(
        head_entropy(two, pad), torch.tensor([2 * math.log(2) / 3], dtype=torch.float64)
    )


def test_plot_text_attention_draws_each_head_without_touching_the_global_backend(tmp_path, monkeypatch):
    import matplotlib
    from matplotlib.figure import Figure

    monkeypatch.setattr(
        matplotlib, "use", lambda *a, **k: pytest.fail("changed the global matplotlib backend")
    )
    saved = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self) or real(self, *a, **k))
    maps = np.random.default_rng(0).random((3, 2, 2))
    report = {
        "tokens": ["a", "\n"],
        "layers": ["blocks.0.attn", "blocks.1.attn"],
        "maps": {"blocks.1.attn": maps},
    }
    ta.plot_text_attention(report, -1, str(tmp_path / "t.png"), max_heads=2)
    assert (tmp_path / "t.png").stat().st_size > 0
    axes = saved[0].axes
    assert [ax.get_title() for ax in axes] == ["blocks.1.attn h0", "blocks.1.attn h1"]
    np.testing.assert_allclose(axes[1].images[0].get_array(), maps[1])
    assert axes[0].images[0].get_clim()[0] == 0.0
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["a", "\\n"]  # keys on x, escaped
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["a", "\\n"]
    long = {"tokens": [str(i) for i in range(65)], "layers": ["x"], "maps": {"x": np.zeros((1, 65, 65))}}
    ta.plot_text_attention(long, "x", str(tmp_path / "long.png"))
    assert list(saved[1].axes[0].get_xticks()) == []  # too many tokens to label
    with pytest.raises(ValueError, match=r"no layer 'nope'; layers: \['x'\]"):
        ta.plot_text_attention(long, "nope", str(tmp_path / "n.png"))

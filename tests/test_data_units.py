"""Fast unit tests of data/ against independent expectations.

MixUp / CutMix against their definitions (images and label mass), subsets against hand-counted
per-class sizes, transforms against torchvision ops applied by hand, the device path's order and
batched ops against ``DistributedSampler`` and direct slicing, and the cache and dataset helpers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, Subset
from torchvision.transforms import v2

from vitlens.data.datasets import TensorImageDataset, TransformedDataset, dataset_classes, dataset_targets
from vitlens.data.mixing import BatchMixer, build_batch_mixer
from vitlens.data.subset import nested_fraction_indices
from vitlens.data.transforms import build_transforms, parse_randaugment
from vitlens.errors import ConfigError, DataError


def _ops(tf) -> dict:
    return {type(op).__name__: op for op in tf.transforms}


def _source_coded_batch(b=8, c=2, h=8, w=8):
    """Image i is filled with the value i: every output pixel tells which image it came from."""
    return torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, c, h, w).clone()


# =============================================================================== MixUp / CutMix
def test_mixup_mixes_images_and_labels_with_the_same_lambda():
    """MixUp (Zhang et al. 2018): x = lam x_i + (1 - lam) x_j, y = lam y_i + (1 - lam) y_j, with j the
    batch rolled by one (torchvision's pairing), one lam per batch."""
    torch.manual_seed(0)
    mixer = build_batch_mixer(5, mixup_alpha=0.4)
    images = torch.rand(6, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    out, soft = mixer(images, labels)
    one_hot = F.one_hot(labels, 5).float()
    partner = one_hot.roll(1, 0)
    lam = soft[1, 1].item()  # item 1 is class 1, its partner (item 0) class 0
    torch.testing.assert_close(soft, lam * one_hot + (1 - lam) * partner)
    torch.testing.assert_close(out, lam * images + (1 - lam) * images.roll(1, 0))
    assert 0 < lam < 1


def test_cutmix_label_mass_equals_the_pasted_box_area():
    torch.manual_seed(1)
    mixer = build_batch_mixer(8, cutmix_alpha=1.0)
    labels = torch.arange(8)
    pasted = 0.0
    for _ in range(5):
        images = _source_coded_batch()
        out, soft = mixer(images, labels)
        for i in range(8):
            from_partner = (out[i, 0] == (i - 1) % 8).float().mean().item()
            assert (out[i, 0] == i).float().mean().item() + from_partner == pytest.approx(1.0)
            assert soft[i, (i - 1) % 8].item() == pytest.approx(from_partner, abs=1e-6)
            assert soft[i, i].item() == pytest.approx(1 - from_partner, abs=1e-6)
            pasted += from_partner
        assert torch.allclose(soft.sum(1), torch.ones(8))
    assert pasted > 0.5  # boxes were pasted (not all lam = 1)


def test_mixer_probability_and_choice():
    torch.manual_seed(0)
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    half = build_batch_mixer(6, mixup_alpha=1.0, prob=0.25)  # 6 classes, 4 of them in the batch
    assert isinstance(half, BatchMixer) and half.prob == 0.25
    mixed = 0
    for _ in range(400):
        out, soft = half(images, labels)
        if torch.equal(out, images):
            assert torch.equal(soft, F.one_hot(labels, 6).float())  # unmixed: one-hot soft labels
        else:
            mixed += 1
    assert mixed / 400 == pytest.approx(0.25, abs=0.07)
    both = build_batch_mixer(4, mixup_alpha=1.0, cutmix_alpha=1.0)
    assert isinstance(both.mix, v2.RandomChoice) and len(both.mix.transforms) == 2
    assert isinstance(build_batch_mixer(4, cutmix_alpha=1.0).mix, v2.CutMix)
    assert isinstance(build_batch_mixer(4, mixup_alpha=0.2).mix, v2.MixUp)
    assert build_batch_mixer(4, mixup_alpha=0.2).mix.alpha == 0.2
    assert build_batch_mixer(4, cutmix_alpha=0.7).mix.alpha == 0.7
    assert build_batch_mixer(4, 0.0, 0.0) is None and build_batch_mixer(4, 1.0, prob=0.0) is None
    assert build_batch_mixer(4, 1.0, prob=1.0).prob == 1.0
    with pytest.raises(ConfigError, match=">= 0"):
        build_batch_mixer(4, mixup_alpha=-0.1)
    with pytest.raises(ConfigError, match=">= 0"):
        build_batch_mixer(4, cutmix_alpha=-1.0)
    with pytest.raises(ConfigError, match="prob"):
        build_batch_mixer(4, 1.0, prob=-0.1)
    with pytest.raises(ValueError, match="class indices"):
        build_batch_mixer(4, 1.0)(images, F.one_hot(labels, 4))
    # int32 labels are accepted (cast to long) and give (B, num_classes) soft targets
    _, soft = build_batch_mixer(6, mixup_alpha=1.0)(images, labels.int())
    assert soft.shape == (4, 6) and soft[:, 4:].abs().sum() == 0


# =============================================================================== subsets
def test_subset_sizes_per_class_by_hand():
    targets = [0] * 10 + [1] * 3 + [2] * 25 + [3] * 1
    idx = nested_fraction_indices(targets, 0.25, seed=3)
    labels = [targets[i] for i in idx]
    # per class: max(1, floor(0.25 n + 0.5)): 10 -> 3 (2.5 rounds up), 3 -> 1, 25 -> 6, 1 -> 1
    assert [labels.count(c) for c in range(4)] == [3, 1, 6, 1]
    assert list(idx) == sorted(idx) and len(set(idx.tolist())) == len(idx)
    assert nested_fraction_indices(targets, 1.0).tolist() == list(range(len(targets)))
    assert nested_fraction_indices(targets, 1).tolist() == list(range(len(targets)))
    small, big = nested_fraction_indices(targets, 0.3, seed=5), nested_fraction_indices(targets, 0.6, seed=5)
    assert set(small.tolist()) <= set(big.tolist())
    seed0 = nested_fraction_indices(targets, 0.5, seed=0)
    seed1 = nested_fraction_indices(targets, 0.5, seed=1)
    assert set(seed0.tolist()) != set(seed1.tolist())
    for bad in (0, 0.0, 1.5, -0.2, True, "0.1", None):
        with pytest.raises(ConfigError, match="fraction"):
            nested_fraction_indices(targets, bad)


# =============================================================================== transforms
def test_published_normalisation_statistics():
    from vitlens.data import transforms as T

    assert T.IMAGENET_MEAN == (0.485, 0.456, 0.406)  # torchvision's documented ImageNet statistics
    assert T.IMAGENET_STD == (0.229, 0.224, 0.225)
    assert T.CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and T.CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    assert T.CIFAR100_MEAN == (0.5071, 0.4865, 0.4409) and T.CIFAR100_STD == (0.2673, 0.2564, 0.2762)
    assert T.DATASET_STATS["cifar10-mini"] == (T.CIFAR10_MEAN, T.CIFAR10_STD)
    assert T.DATASET_STATS["cifar100"] == (T.CIFAR100_MEAN, T.CIFAR100_STD)
    assert T.DATASET_STATS["imagefolder"] == (T.IMAGENET_MEAN, T.IMAGENET_STD)
    assert T.EVAL_CROP_PCT == 0.875  # timm's default center-crop fraction


def test_eval_transform_is_normalise_only_at_native_size_and_resize_otherwise():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    tf = build_transforms(False, img_size=16, src_size=16, mean=mean, std=std)
    expected = (img.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(tf(img), expected)
    # a 16 px source shown at 32 px ("pad" recipe): one Resize to (32, 32), no crop
    up = build_transforms(False, img_size=32, src_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    want = v2.Resize((32, 32), antialias=True)(img).float() / 255
    torch.testing.assert_close(up(img), want)
    # unknown source size at a small output: short side to 32, then a center crop
    wide = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8)
    got = build_transforms(False, img_size=32, mean=(0, 0, 0), std=(1, 1, 1))(wide)
    want = v2.CenterCrop(32)(v2.Resize(32, antialias=True)(wide)).float() / 255
    torch.testing.assert_close(got, want)
    # "rrc" recipe at eval: short side to round(64 / 0.875) = 73, then the central 64 x 64
    big = torch.randint(0, 256, (3, 100, 120), dtype=torch.uint8)
    got = build_transforms(False, img_size=64, crop="rrc", mean=(0, 0, 0), std=(1, 1, 1))(big)
    want = v2.CenterCrop(64)(v2.Resize(73, antialias=True)(big)).float() / 255
    torch.testing.assert_close(got, want)


def test_train_pad_recipe_padding_scales_with_the_resize():
    ops = _ops(build_transforms(True, img_size=32, src_size=32))
    assert list(ops) == ["RandomCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    assert list(ops["RandomCrop"].padding) == [4, 4, 4, 4] and ops["RandomHorizontalFlip"].p == 0.5
    ops = _ops(build_transforms(True, img_size=224, src_size=32, crop="pad"))
    assert list(ops["RandomCrop"].padding) == [28] * 4  # 4 source pixels, 7x upscaled
    assert list(ops["Resize"].size) == [224, 224]
    ops = _ops(build_transforms(True, img_size=32, src_size=32, crop_padding=6, hflip=False))
    assert list(ops["RandomCrop"].padding) == [6] * 4 and "RandomHorizontalFlip" not in ops
    assert "RandomCrop" not in _ops(build_transforms(True, img_size=32, src_size=32, crop_padding=0))
    assert "RandomCrop" in _ops(build_transforms(True, img_size=64, src_size=64))  # up to 64 px: "pad"
    assert "RandomCrop" in _ops(build_transforms(True, img_size=224, src_size=64))  # the source decides
    ops = _ops(build_transforms(True, img_size=96, src_size=96))
    assert "RandomResizedCrop" in ops and "RandomCrop" not in ops
    assert tuple(ops["RandomResizedCrop"].size) == (96, 96)
    # no augmentation in the eval pipeline
    assert list(_ops(build_transforms(False, img_size=32, src_size=32, randaugment="rand-m9-n2",
                                      random_erasing=0.5))) == ["ToDtype", "Normalize"]
    out = build_transforms(True, img_size=32, src_size=32)(torch.zeros(3, 32, 32, dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    with pytest.raises(ConfigError, match="img_size"):
        build_transforms(True, img_size=0)
    with pytest.raises(ConfigError, match="random_erasing"):
        build_transforms(True, img_size=32, random_erasing=1.5)
    with pytest.raises(ConfigError, match="crop"):
        build_transforms(True, img_size=32, crop="center")


def test_train_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    torch.manual_seed(0)
    img = torch.randint(1, 256, (3, 8, 8), dtype=torch.uint8)
    tf = build_transforms(True, img_size=8, src_size=8, crop_padding=2, hflip=False, mean=(0, 0, 0),
                          std=(1 / 255,) * 3)
    padded = F.pad(img.float(), (2, 2, 2, 2))
    windows = {(t, left) for t in range(5) for left in range(5)}
    seen = set()
    for _ in range(200):
        out = tf(img)
        match = [(t, left) for t, left in windows
                 if torch.allclose(out, padded[:, t:t + 8, left:left + 8], atol=1e-3)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 15  # offsets spread over the 5 x 5 positions


@pytest.mark.parametrize("spec,want", [
    ("rand-m9-n2", (2, 9)), ("rand-n3-m5", (3, 5)), ("rand-m7", (2, 7)), ("rand-n3", (3, 9)),
    ("RAND-M0-N1", (1, 0)),
    ((4, 30), (4, 30)), (None, None), ("none", None), ("", None), ("off", None),
])
def test_parse_randaugment_values(spec, want):
    assert parse_randaugment(spec) == want


@pytest.mark.parametrize("spec", ["rand", "augmix-m9", "rand-m31", "rand-n0", "rand-x3", (1,), "rand-mx"])
def test_parse_randaugment_rejects(spec):
    with pytest.raises(ConfigError, match="randaugment"):
        parse_randaugment(spec)


# =============================================================================== datasets
def test_tensor_dataset_and_targets_through_subsets():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).view(5, 3, 2, 2)
    ds = TensorImageDataset(images, [4, 3, 2, 1, 0], ["a", "b", "c", "d", "e"], source="mem")
    assert len(ds) == 5 and ds.image_size == (2, 2)
    img, label = ds[1]
    assert torch.equal(img, images[1]) and label == 3
    inner = Subset(ds, [4, 2, 0, 1])
    outer = Subset(inner, [3, 0])
    assert dataset_targets(outer) == [3, 0] and dataset_classes(outer) == ["a", "b", "c", "d", "e"]
    tds = TransformedDataset(outer, lambda x: x.float() * 2)
    assert tds.targets == [3, 0] and len(tds) == 2
    x, y = tds[0]
    torch.testing.assert_close(x, images[1].float() * 2)
    assert y == 3
    assert torch.equal(TransformedDataset(ds)[2][0], images[2])
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(images.float(), [0] * 5, [])
    with pytest.raises(ValueError, match="targets"):
        TensorImageDataset(images, [0] * 4, [])
    with pytest.raises(TypeError, match="targets"):
        dataset_targets(object())


# =============================================================================== cache
def test_cache_file_key_and_round_trip(tmp_path):
    from vitlens.data import cache

    a = cache.cache_file(tmp_path, "cifar 10/train", "fp-1")
    assert a.parent == tmp_path / "decoded" and a.suffix == ".safetensors"
    assert a.name.startswith("cifar_10_train-")  # the label, made safe for a file name
    assert a != cache.cache_file(tmp_path, "cifar 10/train", "fp-2")  # another source, another file
    assert a == cache.cache_file(tmp_path, "cifar 10/train", "fp-1")
    images = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    split = cache.DecodedSplit(images, [2, 0, 1], ["x", "y", "z"], "somewhere", ["bad.png"])
    assert cache.load_decoded(a) is None
    cache.save_decoded(a, split)
    back = cache.load_decoded(a)
    assert torch.equal(back.images, split.images) and back.targets == [2, 0, 1]
    assert (back.classes, back.source, back.skipped) == (["x", "y", "z"], "somewhere", ["bad.png"])
    assert not list(a.parent.glob("*.tmp"))
    a.write_bytes(b"not a safetensors file")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert cache.load_decoded(a) is None
    assert any("rebuilding" in str(x.message) for x in w)


def test_default_cache_dir_env(monkeypatch, tmp_path):
    from vitlens.data.cache import default_cache_dir

    monkeypatch.setenv("VITLENS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VITLENS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "vitlens"


# =============================================================================== the device path
@pytest.mark.parametrize("n,world,epoch", [(10, 3, 0), (7, 2, 4), (5, 4, 1), (9, 1, 2)])
def test_epoch_order_equals_distributed_sampler(n, world, epoch):
    from vitlens.data.device_loader import epoch_order

    for rank in range(world):
        s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=11,
                               drop_last=False)
        s.set_epoch(epoch)
        assert epoch_order(n, seed=11, epoch=epoch, world_size=world, rank=rank).tolist() == list(s)


def test_drop_last_rule_and_seeds():
    from vitlens.data.device_loader import augment_seed, drop_last_rule

    assert drop_last_rule(9, 4) and not drop_last_rule(8, 4) and not drop_last_rule(10, 4)
    assert not drop_last_rule(3, 4) and drop_last_rule(1, 4)
    seeds = {augment_seed(s, e, r) for s in range(3) for e in range(3) for r in range(3)}
    assert len(seeds) == 27


def test_batched_crop_flip_and_normalize_by_hand():
    from vitlens.data.device_loader import normalize, random_crop, random_hflip

    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 2, 5, 6), dtype=torch.uint8)
    out = random_crop(x, g, size=(5, 6), padding=(1, 2, 3, 0))  # left, top, right, bottom
    padded = F.pad(x, (1, 3, 2, 0))  # (left, right, top, bottom) for F.pad
    offsets = set()
    for i in range(64):
        hits = [(t, left) for t in range(3) for left in range(5)
                if torch.equal(out[i], padded[i, :, t:t + 5, left:left + 6])]
        assert hits
        offsets.update(hits)
    assert {t for t, _ in offsets} == {0, 1, 2} and {left for _, left in offsets} == set(range(5))
    flipped = random_hflip(x, g, p=0.5)
    is_flip = torch.tensor([torch.equal(flipped[i], x[i].flip(-1)) for i in range(64)])
    assert all(torch.equal(flipped[i], x[i]) or is_flip[i] for i in range(64))
    assert 15 < is_flip.sum().item() < 49
    assert torch.equal(random_hflip(x, g, p=0.0), x) and torch.equal(random_hflip(x, g, p=1.0), x.flip(-1))
    mean, std = [0.1, 0.7], [0.2, 0.5]
    xf = x.float() / 255
    torch.testing.assert_close(normalize(mean, std)(xf.clone(), g), v2.Normalize(mean, std)(xf))


def test_batched_random_erasing_area_and_fill():
    from vitlens.data.device_loader import random_erasing

    g = torch.Generator().manual_seed(0)
    x = torch.ones(400, 1, 20, 20)
    out = random_erasing(x, g, p=0.5, value=-3.0)
    erased = (out == -3.0).flatten(1).float().sum(1)
    assert torch.all((out == -3.0) | (out == 1.0))
    frac = (erased > 0).float().mean().item()
    assert frac == pytest.approx(0.5, abs=0.08)
    areas = erased[erased > 0] / 400
    assert areas.min().item() >= 0.015 and areas.max().item() <= 0.36  # scale (0.02, 0.33), rounded sides
    assert torch.equal(random_erasing(x, g, p=0.0), x)


def test_batched_pipeline_translation():
    from vitlens.data.device_loader import batched_pipeline

    assert batched_pipeline(build_transforms(True, img_size=96, src_size=96)) is None  # RandomResizedCrop
    ops = batched_pipeline(build_transforms(False, img_size=8, src_size=8, mean=(0.5,) * 3, std=(0.25,) * 3))
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    y = x
    for op in ops:
        y = op(y, torch.Generator())
    torch.testing.assert_close(y, (x.float() / 255 - 0.5) / 0.25)
    assert batched_pipeline(v2.Compose([v2.RandomErasing(value=[1, 2, 3])])) is None
    assert batched_pipeline(v2.Compose([v2.RandomCrop(8, padding=2, padding_mode="reflect")])) is None
    assert batched_pipeline(None) == []
    # asymmetric padding (left 1, top 2, right 3, bottom 4) with a crop the size of the padded image:
    # one possible offset, so the batched op must give exactly torchvision's own result
    crop = v2.RandomCrop((8, 6), padding=(1, 2, 3, 4))
    (op,) = batched_pipeline(v2.Compose([crop]))
    x = torch.randint(1, 256, (2, 1, 2, 2), dtype=torch.uint8)
    torch.testing.assert_close(op(x, torch.Generator()), crop(x))
    torch.testing.assert_close(crop(x), F.pad(x, (1, 3, 2, 4)))


def _tensor_ds(n=10, classes=2):
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 4, 4).clone()
    return TensorImageDataset(images, [i % classes for i in range(n)], [str(c) for c in range(classes)])


def test_device_loader_batches_subsets_and_length():
    from vitlens.data.device_loader import DeviceLoader, epoch_order, resident_parts

    base = _tensor_ds(20)
    sub = Subset(Subset(base, list(range(2, 20))), [5, 0, 7, 3, 9, 11, 1])  # base 7, 2, 9, 5, 11, 13, 3
    ds = TransformedDataset(sub, None)
    images, targets, index, transform = resident_parts(ds)
    assert index.tolist() == [7, 2, 9, 5, 11, 13, 3] and transform is None
    loader = DeviceLoader(ds, 3, seed=4, ops=[])
    assert loader.drop_last and len(loader) == 2  # 7 = 3 + 3 + 1: the single-image batch is dropped
    order = epoch_order(7, seed=4, epoch=0)
    batches = list(loader)
    assert len(batches) == 2
    want = torch.tensor([7, 2, 9, 5, 11, 13, 3])[order[:6]]
    got = torch.cat([x[:, 0, 0, 0] for x, _ in batches]).long()
    assert got.tolist() == want.tolist()
    assert torch.cat([y for _, y in batches]).tolist() == (want % 2).tolist()
    loader.set_epoch(3)
    assert torch.cat(loader.batch_indices()).tolist() == epoch_order(7, seed=4, epoch=3)[:6].tolist()
    ev = DeviceLoader(ds, 3, shuffle=False, world_size=2, rank=1, ops=[])
    assert not ev.drop_last and len(ev) == 1
    assert [b.tolist() for b in ev.batch_indices()] == [[1, 3, 5]]
    assert len(DeviceLoader(TransformedDataset(base, None), 4, ops=[])) == 5
    with pytest.raises(DataError, match="dataloader"):
        DeviceLoader(TransformedDataset(base, v2.RandomResizedCrop(4)), 2)


def test_resolve_data_path():
    from vitlens.data.device_loader import resolve_data_path

    cpu = torch.device("cpu")
    ok = TransformedDataset(_tensor_ds(), build_transforms(True, img_size=4, src_size=4))
    rrc = TransformedDataset(_tensor_ds(), build_transforms(True, img_size=4, src_size=4, crop="rrc"))
    assert resolve_data_path("auto", ok, cpu) == "device"
    assert resolve_data_path("auto", ok, cpu, num_workers=2) == "dataloader"
    assert resolve_data_path("auto", rrc, cpu) == "dataloader"
    assert resolve_data_path("dataloader", ok, cpu) == "dataloader"
    assert resolve_data_path("device", ok, cpu) == "device"
    with pytest.raises(DataError, match="device"):
        resolve_data_path("device", rrc, cpu)
    with pytest.raises(ConfigError, match="data_path"):
        resolve_data_path("gpu", ok, cpu)


"""Behaviours of ``vitlens.data`` that a one-line bug could change unnoticed (issue 15, round 2).

Where the cache file goes and what it is called, where CIFAR is looked for and which options reach
each route, the archive key per split, what archives and folders list (torchvision's ImageFolder as
the reference), the transform recipes op by op, what ``build_data`` records, decoding and mixing
edge cases, each against a hand-computed expectation. The device path is in test_mut2_data_device.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile

import numpy as np
import pytest
import torch
from _files import png_bytes as _png
from _files import write_tar as _tar
from _files import write_tree as _tree
from PIL import Image
from torchvision.transforms import v2


# ------------------------------------------------------------------------------------ cache file names
def test_cache_file_name_keeps_a_readable_label_and_keys_by_version_and_fingerprint(tmp_path, monkeypatch):
    from vitlens.data.cache import CACHE_VERSION, cache_file

    key = hashlib.sha1(f"{CACHE_VERSION}|tar|abc".encode()).hexdigest()[:20]
    # letters of both cases, digits, '_', '.', '-' stay; any run of other characters becomes one '_'
    assert cache_file(tmp_path, "CIFAR10 Mini/Train.v2-x", "tar|abc") == (
        tmp_path / "decoded" / f"CIFAR10_Mini_Train.v2-x-{key}.safetensors"
    )
    assert cache_file(tmp_path, "a  /\\b", "tar|abc").name == f"a_b-{key}.safetensors"
    assert cache_file(tmp_path, "Z" * 70, "tar|abc").name == "Z" * 60 + f"-{key}.safetensors"
    assert len(key) == 20
    monkeypatch.setenv("VITLENS_CACHE", str(tmp_path / "env"))
    assert cache_file(None, "x", "tar|abc") == tmp_path / "env" / "decoded" / f"x-{key}.safetensors"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_file("~/c", "x", "tar|abc") == tmp_path / "home" / "c" / "decoded" / f"x-{key}.safetensors"


def test_default_cache_dir_falls_back_to_home_cache(monkeypatch, tmp_path):
    from vitlens.data.cache import default_cache_dir

    monkeypatch.delenv("VITLENS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "vitlens"
    monkeypatch.setenv("VITLENS_CACHE", "")  # empty means unset
    assert default_cache_dir() == tmp_path / ".cache" / "vitlens"
    monkeypatch.setenv("VITLENS_CACHE", "~/vc")
    assert default_cache_dir() == tmp_path / "vc"


def test_saved_cache_file_holds_int64_targets_and_the_version(tmp_path):
    from safetensors import safe_open

    from vitlens.data.cache import CACHE_VERSION, DecodedSplit, save_decoded

    path = tmp_path / "d" / "x.safetensors"
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 2, 2).transpose(2, 3)  # not contiguous
    save_decoded(path, DecodedSplit(images, [1, 0], ["a", "b"], "src", ["bad.png"]))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("targets").dtype == torch.int64
        assert torch.equal(f.get_tensor("images"), images)
    assert meta == {
        "classes": '["a", "b"]',
        "source": "src",
        "skipped": '["bad.png"]',
        "version": CACHE_VERSION,
    }
    assert sorted(os.listdir(path.parent)) == ["x.safetensors"]  # no temp file left behind


# ------------------------------------------------------------------------------------ where CIFAR is found
def test_cifar_without_data_dir_reads_the_default_data_folder(tmp_path, monkeypatch):
    """No data_dir: ``$VITLENS_DATA`` (default_data_dir) is searched, here holding an ImageFolder tree."""
    from vitlens.data.catalog import build_dataset

    _tree(
        tmp_path / "data", {"train/cat/0.png": _png(1), "train/dog/0.png": _png(2), "test/cat/0.png": _png(3)}
    )
    monkeypatch.setenv("VITLENS_DATA", str(tmp_path / "data"))
    ds = build_dataset("cifar10", "train", cache_dir=False)
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    assert [int(ds[i][0][0, 0, 0]) for i in range(2)] == [1, 2]


def test_cifar_jpeg_tarball_for_the_split_is_found_by_name(tmp_path):
    """``<name>-<split>.tar`` next to each other: the split's own tarball is read, not the other one."""
    from vitlens.data.catalog import build_dataset

    _tar(tmp_path / "cifar10-train.tar", {"train/a/0.png": _png(10), "train/b/0.png": _png(20)})
    _tar(tmp_path / "cifar10-test.tgz", {"test/a/0.png": _png(30)})  # .tgz: an uncompressed tar named .tgz
    train = build_dataset("cifar10", "train", tmp_path, cache_dir=False)
    assert len(train) == 2 and int(train[1][0][0, 0, 0]) == 20
    test = build_dataset("cifar10", "test", tmp_path, cache_dir=False)
    assert len(test) == 1 and int(test[0][0][0, 0, 0]) == 30
    # a data_dir that *is* an archive is read directly
    direct = build_dataset("cifar10", "train", tmp_path / "cifar10-train.tar", cache_dir=False)
    assert len(direct) == 2


def test_torchvision_binary_release_is_loaded_as_nchw_uint8(tmp_path, monkeypatch):
    """torchvision's CIFAR (N, H, W, C) numpy -> our (N, C, H, W) tensor; train/test and download are
    passed through (a fake stands in for torchvision's class: no download)."""
    import torchvision.datasets

    from vitlens.data.catalog import build_dataset

    calls = []

    class FakeCIFAR:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            self.data = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)  # N, H, W, C
            self.targets, self.classes = [1, 0], ["x", "y"]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    (tmp_path / "cifar-10-batches-py").mkdir()
    ds = build_dataset("cifar10", "test", tmp_path)
    assert calls == [(str(tmp_path), False, False)]
    assert ds.images.shape == (2, 3, 2, 3)  # C moved to the front
    assert ds.images[1, 2, 1, 0] == 1 * 18 + 1 * 9 + 0 * 3 + 2  # image 1, row 1, col 0, channel 2
    assert ds.images.is_contiguous() and ds.targets == [1, 0] and ds.classes == ["x", "y"]
    assert ds.source == str(tmp_path / "cifar-10-batches-py")
    # nothing found and download=True: torchvision is asked to fetch into data_dir
    calls.clear()
    build_dataset("cifar10", "train", tmp_path / "fresh", download=True)
    assert calls == [(str(tmp_path / "fresh"), True, True)]


# ------------------------------------------------------------------------------------ archive keys
def test_archive_fingerprint_differs_per_split_and_changes_with_the_file(tmp_path):
    from vitlens.data.sources import TarSource

    path = _tar(tmp_path / "d.tar", {"train/a/0.png": _png(), "test/a/0.png": _png()})
    train, test = TarSource(path, "train"), TarSource(path, "test")
    assert train.fingerprint() != test.fingerprint()
    before = train.fingerprint()
    assert before == TarSource(path, "train").fingerprint()
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert TarSource(path, "train").fingerprint() != before


def test_cached_splits_of_one_archive_do_not_mix(tmp_path):
    from vitlens.data.catalog import load_image_folder

    path = _tar(
        tmp_path / "d.tar", {"train/a/0.png": _png(5), "train/a/1.png": _png(6), "test/a/0.png": _png(9)}
    )
    cache = tmp_path / "cache"
    for _ in range(2):  # the second round reads the cache
        train = load_image_folder(path, "train", cache_dir=cache)
        test = load_image_folder(path, "test", cache_dir=cache)
        assert [int(train[i][0][0, 0, 0]) for i in range(len(train))] == [5, 6]
        assert [int(test[i][0][0, 0, 0]) for i in range(len(test))] == [9]
    assert sorted(p.name.split("-")[:2] for p in (cache / "decoded").iterdir()) == [
        ["d", "test"],
        ["d", "train"],
    ]


# ------------------------------------------------------------------------------------ transform recipes
def _same_pipeline(got: v2.Compose, want: list) -> None:
    """Same ops with the same parameters (their reprs), and float32 from every ToDtype."""
    assert repr(got) == repr(v2.Compose(want))
    for op in got.transforms:
        if isinstance(op, v2.ToDtype):
            assert op.dtype == torch.float32 and op.scale is True


@pytest.mark.parametrize(
    "kwargs, want",
    [
        # CIFAR at its own size: pad 4, flip, RandAugment on uint8, float, normalize, erasing last
        (
            dict(train=True, img_size=32, src_size=32, randaugment="rand-m7-n3", random_erasing=0.25),
            lambda m, s: [
                v2.RandomCrop(32, padding=4),
                v2.RandomHorizontalFlip(),
                v2.RandAugment(num_ops=3, magnitude=7),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
                v2.RandomErasing(p=0.25, value=0),
            ],
        ),
        # 32 px source shown at 48: resize to 48 x 48, padding 4 * 48/32 = 6
        (
            dict(train=True, img_size=48, src_size=32, hflip=False),
            lambda m, s: [
                v2.Resize((48, 48), antialias=True),
                v2.RandomCrop(48, padding=6),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
            ],
        ),
        # padding 1 * 16/32 = 0.5 rounds to 0, but at least 1 pixel is kept
        (
            dict(train=True, img_size=16, src_size=32, crop_padding=1),
            lambda m, s: [
                v2.Resize((16, 16), antialias=True),
                v2.RandomCrop(16, padding=1),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
            ],
        ),
        # unknown source size, small output: "pad" recipe, fit by short side + center crop
        (
            dict(train=True, img_size=32, crop_padding=2),
            lambda m, s: [
                v2.Resize(32, antialias=True),
                v2.CenterCrop(32),
                v2.RandomCrop(32, padding=2),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
            ],
        ),
        (
            dict(train=False, img_size=48, src_size=32, randaugment="rand-m9-n2", random_erasing=0.5),
            lambda m, s: [
                v2.Resize((48, 48), antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
            ],
        ),
        # ImageNet style: RandomResizedCrop for training, resize to 224 / 0.875 = 256 + center crop for eval
        (
            dict(train=True, img_size=224, random_erasing=1.0),
            lambda m, s: [
                v2.RandomResizedCrop(224, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
                v2.RandomErasing(p=1.0, value=0),
            ],
        ),
        (
            dict(train=False, img_size=224),
            lambda m, s: [
                v2.Resize(256, antialias=True),
                v2.CenterCrop(224),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
            ],
        ),
        # the size limit of the "pad" recipe is 64 px, judged on the source when known
        (
            dict(train=True, img_size=64, hflip=False, crop_padding=0),
            lambda m, s: [
                v2.Resize(64, antialias=True),
                v2.CenterCrop(64),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
            ],
        ),
        (
            dict(train=True, img_size=32, src_size=65, hflip=False),
            lambda m, s: [
                v2.RandomResizedCrop(32, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
            ],
        ),
        (
            dict(train=False, img_size=64, src_size=65),
            lambda m, s: [
                v2.Resize(73, antialias=True),
                v2.CenterCrop(64),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
            ],
        ),
        (
            dict(train=False, img_size=100, src_size=64),
            lambda m, s: [
                v2.Resize((100, 100), antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
            ],
        ),
        # an explicit recipe overrides the size rule
        (
            dict(train=True, img_size=16, src_size=16, crop="rrc", hflip=False),
            lambda m, s: [
                v2.RandomResizedCrop(16, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(m, s),
            ],
        ),
    ],
)
def test_transform_recipes_op_by_op(kwargs, want):
    from vitlens.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

    kwargs = dict(kwargs)  # a copy: the parameter dict is shared by reruns in one process (mutmut)
    train = kwargs.pop("train")
    _same_pipeline(build_transforms(train, **kwargs), want(list(IMAGENET_MEAN), list(IMAGENET_STD)))


def test_transform_defaults_are_imagenet_stats_pad_4_and_flip():
    from vitlens.data.transforms import build_transforms

    _same_pipeline(
        build_transforms(True, img_size=8, src_size=8),
        [
            v2.RandomCrop(8, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ],
    )


@pytest.mark.parametrize(
    "spec, want",
    [
        ("rand-m9-n2", (2, 9)),
        ("RAND-N3-M0", (3, 0)),
        (" rand-m30 ", (2, 30)),
        ("rand-n1", (1, 9)),
        ("none", None),
        ("Off", None),
        ("", None),
        (None, None),
        ((4, 12), (4, 12)),
        (["2", "5"], (2, 5)),
    ],
)
def test_parse_randaugment_table(spec, want):
    from vitlens.data.transforms import parse_randaugment

    assert parse_randaugment(spec) == want


# ------------------------------------------------------------------------------------ build_data
def test_build_data_statistics_sizes_and_info_per_dataset_name(tmp_path, monkeypatch):
    from vitlens.data import build_data
    from vitlens.data.transforms import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

    root = _tree(
        tmp_path / "r",
        {
            f"{s}/{c}/{i}.png": _png(i, size=8)
            for s in ("train", "test")
            for c in ("a", "b")
            for i in range(2)
        },
    )
    train, test, info = build_data("imagefolder", root, cache_dir=False, augment=False)
    assert (info.mean, info.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert info.to_dict() == {
        "num_classes": 2,
        "classes": ["a", "b"],
        "img_size": 8,
        "in_chans": 3,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "name": "imagefolder",
        "train_size": 4,
        "test_size": 4,
        "extra": {"fraction": 1.0, "seed": 0, "src_size": 8, "augment": False},
    }
    want = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))]
    _same_pipeline(train.transform, want)  # augment=False: the eval pipeline for training too
    _same_pipeline(test.transform, want)
    # a CIFAR name (any case) gets CIFAR's statistics; explicit mean/std win
    _, _, info = build_data("CIFAR10", root, cache_dir=False)
    assert (info.mean, info.std) == (CIFAR10_MEAN, CIFAR10_STD)
    _, _, info = build_data("cifar10", root, cache_dir=False, mean=[0.5] * 3, std=(0.25,) * 3)
    assert (info.mean, info.std) == ((0.5,) * 3, (0.25,) * 3)


def test_build_data_image_size_defaults(tmp_path):
    from vitlens.data import build_data

    mixed = _tree(
        tmp_path / "m",
        {
            "train/a/0.png": _png(size=8),
            "train/a/1.png": _png(size=12),
            "test/a/0.png": _png(size=8),
            "test/a/1.png": _png(size=8),
        },
    )
    train, test, info = build_data("imagefolder", mixed, cache_dir=False)
    assert info.img_size == 224 and info.extra["src_size"] is None  # differing sizes: 224
    assert test[0][0].shape == (3, 224, 224)
    # train 8 px, test 6 px: the sizes disagree, so no known source size, output from img_size
    other = _tree(tmp_path / "o", {"train/a/0.png": _png(size=8), "test/a/0.png": _png(size=6)})
    train, test, info = build_data("imagefolder", other, img_size=8, cache_dir=False, augment=False)
    assert info.extra["src_size"] is None and info.img_size == 8
    _same_pipeline(
        test.transform,
        [
            v2.Resize(8, antialias=True),
            v2.CenterCrop(8),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ],
    )
    # non-square 8 x 6 sources: no square source size either
    rect = tmp_path / "rect"
    for s in ("train", "test"):
        (rect / s / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(rect / s / "a" / "0.png")
    _, _, info = build_data("imagefolder", rect, cache_dir=False)
    assert info.extra["src_size"] is None and info.img_size == 224


def test_build_data_with_a_pretrained_preprocess(tmp_path):
    from torchvision import transforms as T

    from vitlens.data import build_data
    from vitlens.data.preprocess import ToPILRGB

    root = _tree(tmp_path / "r", {f"{s}/a/0.png": _png(100, size=8) for s in ("train", "test")})
    pre = {"resize": 12, "crop": 10, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    train, test, info = build_data("imagefolder", root, cache_dir=False, preprocess=pre, augment=False)
    assert (info.img_size, info.mean, info.std) == (10, (0.5,) * 3, (0.5,) * 3)
    want = T.Compose(
        [
            ToPILRGB(),
            T.Resize(12, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(10),
            T.ToTensor(),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    assert repr(test.transform) == repr(want) and train.transform is test.transform
    torch.testing.assert_close(test[0][0], torch.full((3, 10, 10), (100 / 255 - 0.5) / 0.5))
    train, _, _ = build_data("imagefolder", root, cache_dir=False, preprocess=pre, augment=True)
    ops = [type(op).__name__ for op in train.transform.transforms]
    assert (
        ops[0] == "Resize" and "RandomCrop" in ops and "Normalize" in ops
    )  # the augmenting recipe, at 10 px
    assert train[0][0].shape == (3, 10, 10)


# ------------------------------------------------------------------------------------ archives in detail
@pytest.mark.parametrize(
    "mode, suffix", [("w", ".tar"), ("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz")]
)
def test_archives_of_every_compression_read_the_same_items(tmp_path, mode, suffix):
    """Prefix folders, './' parts, files deeper under a class, non-image files and directory entries:
    the same sorted (name, class) items from a plain or compressed tar, bytes read back exactly."""
    from vitlens.data.sources import open_source

    files = {
        "./data/train/b/z.png": _png(1),
        "data/train/a/deep/er/x.PNG": _png(2),
        "data/train/a/y.png": _png(3),
        "data/train/a/notes.txt": b"not an image",
        "data/test/a/t.png": _png(4),
        "data/train/loose.png": _png(5),  # no class folder: ignored
    }
    path = tmp_path / f"d{suffix}"
    with tarfile.open(path, mode) as tf:
        d = tarfile.TarInfo("data/train/c_empty")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)  # a directory entry: not an item, and no class
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    src = open_source(path, "train")
    assert src.compressed is (mode != "w")
    assert src.classes == ["a", "b"]
    assert src.names == ["./data/train/b/z.png", "data/train/a/deep/er/x.PNG", "data/train/a/y.png"]
    assert src.targets == [1, 0, 0]
    assert [src.read(i) for i in range(3)] == [files[n] for n in src.names]
    assert src.location == str(path) and src.split_dir == "train" and len(src) == 3
    src.drop({1})  # names, labels and bytes stay aligned
    assert src.names == ["./data/train/b/z.png", "data/train/a/y.png"] and src.targets == [1, 0]
    assert [src.read(i) for i in range(2)] == [_png(1), _png(3)]
    test = open_source(path, "val")  # 'val' falls back to a test/ folder
    assert test.split_dir == "test" and test.names == ["data/test/a/t.png"]


def test_directory_source_walks_nested_class_folders_in_sorted_order(tmp_path):
    from vitlens.data.sources import open_source

    root = _tree(
        tmp_path / "r",
        {
            "train/b/2.png": _png(),
            "train/b/10.png": _png(),
            "train/a/sub/z.jpg": _png(),
            "train/a/sub/a/q.png": _png(),
            "train/a/m.png": _png(),
            "train/a/readme.md": b"",
            "train/loose.png": _png(),
            "val/a/v.png": _png(),
        },
    )
    (root / "train" / "empty_class").mkdir()
    src = open_source(root, "train")
    tr = root / "train"
    assert src.classes == ["a", "b", "empty_class"]
    # torchvision's ImageFolder is the reference for the order and the labels
    from torchvision.datasets import ImageFolder

    ref = ImageFolder(str(tr), allow_empty=True)
    assert src.classes == ref.classes
    assert list(zip(src.names, src.targets)) == ref.samples
    assert src.names == [
        str(tr / "a" / "m.png"),
        str(tr / "a" / "sub" / "z.jpg"),
        str(tr / "a" / "sub" / "a" / "q.png"),
        str(tr / "b" / "10.png"),
        str(tr / "b" / "2.png"),
    ]
    assert src.read(3) == _png()
    assert open_source(root, "test").location == str(root / "val")
    fp = src.fingerprint()
    assert fp == open_source(root, "train").fingerprint()
    (tr / "b" / "2.png").write_bytes(_png(9))  # edit a file (size or mtime changes)
    os.utime(tr / "b" / "2.png", ns=(5, 5))
    assert open_source(root, "train").fingerprint() != fp
    src.drop({0, 4})
    assert src.names == [
        str(tr / "a" / "sub" / "z.jpg"),
        str(tr / "a" / "sub" / "a" / "q.png"),
        str(tr / "b" / "10.png"),
    ] and src.targets == [0, 0, 1]


@pytest.mark.parametrize(
    "name, label",
    [("cifar10-train.tar.gz", "cifar10-train"), ("x.tgz", "x"), ("y.tar.xz", "y"), ("plain.tar", "plain")],
)
def test_cache_file_label_drops_the_archive_suffix(tmp_path, name, label):
    from vitlens.data.catalog import load_image_folder

    mode = {"gz": "w:gz", "tgz": "w:gz", "xz": "w:xz"}.get(name.rsplit(".", 1)[-1], "w")
    with tarfile.open(tmp_path / name, mode) as tf:
        info = tarfile.TarInfo("test/a/0.png")
        data = _png(3)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    load_image_folder(tmp_path / name, "test", cache_dir=tmp_path / "c")
    (f,) = (tmp_path / "c" / "decoded").iterdir()
    assert re.fullmatch(re.escape(f"{label}-test-") + r"[0-9a-f]{20}\.safetensors", f.name), f.name


def test_folder_cache_is_written_once_then_read(tmp_path, monkeypatch):
    from vitlens.data import catalog
    from vitlens.data.catalog import load_image_folder

    root = _tree(tmp_path / "r", {"train/a/0.png": _png(1), "train/b/0.png": _png(2)})
    monkeypatch.setenv("VITLENS_CACHE", str(tmp_path / "envcache"))
    first = load_image_folder(root, "train", cache_dir=True)  # True: the default cache folder
    (f,) = (tmp_path / "envcache" / "decoded").iterdir()
    assert f.name.startswith("r-train-")
    calls = []
    monkeypatch.setattr(catalog, "decode_all", lambda *a: calls.append(a))
    again = load_image_folder(root, "train", cache_dir=True)
    assert calls == []  # served from the cache, nothing decoded
    assert torch.equal(again.images, first.images) and again.targets == [0, 1] and again.classes == ["a", "b"]
    assert again.source == str(root / "train")
    # cache_dir=False neither reads nor writes
    with pytest.raises(TypeError):
        load_image_folder(root, "train", cache_dir=False)  # decode_all replaced by a stub returning None


# ------------------------------------------------------------------------------------ mixing
def test_unmixed_batches_get_one_hot_labels_in_the_images_dtype(monkeypatch):
    from vitlens.data.mixing import BatchMixer

    images = torch.rand(3, 3, 4, 4, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1], dtype=torch.int32)
    mixer = BatchMixer(4, [v2.MixUp(alpha=1.0, num_classes=4)], prob=0.5)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(0.75))  # above prob: no mixing
    out, soft = mixer(images, labels)
    assert out is images and soft.dtype == torch.float64
    assert soft.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(0.25))  # below prob: mixed
    out, soft = mixer(images, labels)
    assert not torch.equal(out, images)
    assert torch.allclose(soft.sum(1).double(), torch.ones(3, dtype=torch.float64))
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(0.5))  # the boundary: not mixed
    assert mixer(images, labels)[0] is images


def test_both_mixers_are_used_when_both_alphas_are_set():
    from vitlens.data.mixing import build_batch_mixer

    torch.manual_seed(0)
    mixer = build_batch_mixer(4, mixup_alpha=1.0, cutmix_alpha=1.0, prob=1.0)
    images = torch.arange(4.0)[:, None, None, None].expand(4, 1, 8, 8).contiguous()
    kinds = set()
    for _ in range(20):
        out, _ = mixer(images, torch.arange(4))
        # CutMix pastes whole pixels of the partner (values stay integers); MixUp blends them
        kinds.add("cutmix" if torch.equal(out, out.round()) else "mixup")
    assert kinds == {"cutmix", "mixup"}


# ------------------------------------------------------------------------------------ lazy datasets
def test_lazy_dataset_wraps_around_to_the_start_and_obeys_on_corrupt(tmp_path):
    import warnings

    from vitlens.data.datasets import LazyImageDataset, TransformedDataset
    from vitlens.data.decode import CorruptImageError
    from vitlens.data.sources import open_source

    root = _tree(
        tmp_path / "r", {"train/a/0.png": _png(11), "train/b/1.png": _png(22), "train/b/2.png": b"bad"}
    )
    lazy = LazyImageDataset(open_source(root, "train"))  # on_corrupt defaults to "warn"
    assert lazy.on_corrupt == "warn" and lazy.classes == ["a", "b"] and lazy.targets == [0, 1, 1]
    assert lazy.source == str(root / "train") and len(lazy) == 3
    assert (int(lazy[1][0][0, 0, 0]), lazy[1][1]) == (22, 1)
    with pytest.warns(UserWarning):
        img, label = lazy[2]  # the last file is bad: the next item is the first one, with its label
    assert (int(img[0, 0, 0]), label) == (11, 0)
    strict = LazyImageDataset(open_source(root, "train"), "error")
    with pytest.raises(CorruptImageError) as e:
        strict[2]
    assert e.value.name == str(root / "train" / "b" / "2.png")
    # TransformedDataset applies its transform to the image only
    tds = TransformedDataset(lazy, lambda im: im.float() / 11)
    assert tds[0][0][0, 0, 0].item() == 1.0 and tds[0][1] == 0 and tds.classes == ["a", "b"] and len(tds) == 3
    # a folder of garbage: gives up after 64 tries
    many = _tree(tmp_path / "g", {f"train/a/{i:03d}.png": b"x" for i in range(70)})
    junk = LazyImageDataset(open_source(many, "train"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CorruptImageError) as e:
            junk[5]
    assert e.value.reason == "it and the 63 items after it are unreadable"
    assert e.value.name == str(many / "train" / "a" / "005.png")


# ------------------------------------------------------------------------------------ decoding
def test_an_animated_gif_decodes_to_its_first_frame():
    from vitlens.data.decode import decode_bytes

    frames = [Image.fromarray(np.full((4, 5, 3), v, np.uint8)) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_bytes(buf.getvalue(), "a.gif")
    assert out.shape == (3, 4, 5) and out.dtype == torch.uint8 and int(out.max()) == 0


def test_decode_all_keeps_the_exact_byte_budget_and_clones_only_when_files_were_skipped():
    from vitlens.data.decode import decode_all

    blobs = [_png(1, size=2), _png(2, size=2), _png(3, size=2)]  # 3 images of 3 * 2 * 2 = 12 bytes
    names = ["a", "b", "c"]
    images, skipped = decode_all(3, blobs.__getitem__, names.__getitem__, "warn", 36)  # exactly fits
    assert skipped == [] and images.shape == (3, 3, 2, 2) and images[:, 0, 0, 0].tolist() == [1, 2, 3]
    assert decode_all(3, blobs.__getitem__, names.__getitem__, "warn", 35) == (None, [])
    with pytest.warns(UserWarning):
        images, skipped = decode_all(3, [blobs[0], b"x", blobs[2]].__getitem__, names.__getitem__, "warn", 36)
    assert skipped == [1] and images[:, 0, 0, 0].tolist() == [1, 3] and images.shape == (2, 3, 2, 2)
    assert images.untyped_storage().nbytes() == 2 * 12  # trimmed: not holding room for the skipped file


def test_build_data_passes_download_on_corrupt_and_cache_dir_to_both_splits(tmp_path, monkeypatch):
    import torchvision.datasets

    from vitlens.data import build_data

    calls = []

    class FakeCIFAR:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            self.data = np.zeros((3, 4, 4, 3), dtype=np.uint8)
            self.targets, self.classes = [0, 1, 0], ["x", "y"]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    train, test, info = build_data("cifar10", tmp_path / "none_here", download=True)
    assert calls == [(str(tmp_path / "none_here"), True, True), (str(tmp_path / "none_here"), False, True)]
    assert info.train_size == info.test_size == 3 and info.img_size == 4


# ------------------------------------------------------------------------------ more cache, catalog, order
def test_save_decoded_makes_nested_folders_rewrites_and_cleans_up_a_failed_rename(tmp_path):
    import warnings

    from vitlens.data.cache import DecodedSplit, load_decoded, save_decoded

    split = DecodedSplit(torch.ones(1, 3, 2, 2, dtype=torch.uint8), [0], ["a"], "src", [])
    path = tmp_path / "a" / "b" / "decoded" / "x.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the first write nor a rewrite warns
        save_decoded(path, split)
        save_decoded(path, DecodedSplit(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), [0], ["a"], "src", []))
    assert int(load_decoded(path).images.sum()) == 0
    # the final name is taken by a non-empty folder: the rename fails, the temp file is removed
    blocked = tmp_path / "c" / "y.safetensors"
    (blocked / "inside").mkdir(parents=True)
    with pytest.warns(UserWarning, match="could not write the decoded-image cache"):
        save_decoded(blocked, split)
    assert sorted(p.name for p in blocked.parent.iterdir()) == ["y.safetensors"]


def test_cifar_found_as_a_val_tarball_or_a_tree_in_a_subfolder(tmp_path):
    from vitlens.data.catalog import build_dataset

    with tarfile.open(tmp_path / "cifar100-val.tar.gz", "w:gz") as tf:
        data = _png(40)
        info = tarfile.TarInfo("val/a/0.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    test = build_dataset("cifar100", "test", tmp_path, cache_dir=False)  # test split: a val tarball serves
    assert len(test) == 1 and int(test[0][0][0, 0, 0]) == 40
    _tree(tmp_path / "holder" / "cifar10", {"train/a/0.png": _png(50), "train/b/0.png": _png(60)})
    train = build_dataset("Cifar10", "train", tmp_path / "holder", cache_dir=tmp_path / "c")  # any case
    assert train.classes == ["a", "b"] and int(train[1][0][0, 0, 0]) == 60
    (f,) = (tmp_path / "c" / "decoded").iterdir()
    assert f.name.startswith("cifar10-train-")


def test_build_dataset_checks_its_arguments_before_loading_and_passes_the_options(tmp_path):
    from vitlens.data.catalog import build_dataset
    from vitlens.data.datasets import LazyImageDataset
    from vitlens.errors import ConfigError

    with pytest.raises(ConfigError, match="^on_corrupt='skip' is not supported"):
        build_dataset("cifar10-mini", "train", on_corrupt="skip")
    with pytest.raises(ConfigError, match="^unknown split 'dev'"):
        build_dataset("cifar10-mini", "dev")
    lazy = build_dataset("CIFAR10-MINI", "test", max_decoded_bytes=1000, cache_dir=False)
    assert isinstance(lazy, LazyImageDataset) and len(lazy) == 500
    ds = build_dataset("cifar10-mini", "test", cache_dir=tmp_path)
    assert len(ds) == 500
    (f,) = (tmp_path / "decoded").iterdir()
    assert f.name.startswith("cifar10-mini-test-")
    root = _tree(tmp_path / "folder", {"train/a/0.png": b"broken", "train/a/1.png": _png(1)})
    from vitlens.data.decode import CorruptImageError

    with pytest.raises(CorruptImageError):
        build_dataset("imagefolder", "train", root, on_corrupt="error", cache_dir=False)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert len(build_dataset("ImageFolder", "train", root, on_corrupt="warn", cache_dir=False)) == 1


# ------------------------------------------------------------------------------------ preprocess
def test_resize_crop_shorter_side_or_squash_then_center_crop():
    from torchvision import transforms as T

    from vitlens.data.preprocess import ToPILRGB, eval_transform, resize_crop

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    pre = {"resize": 20, "crop": 16, "interpolation": "bicubic", "mean": [0.5, 0.4, 0.3], "std": [0.2] * 3}
    shorter = resize_crop(pre)(img)  # default resize_mode: the shorter side to 20 -> 20 x 26, crop 16
    want = T.CenterCrop(16)(T.Resize(20, interpolation=T.InterpolationMode.BICUBIC)(img))
    assert shorter.mode == "RGB" and np.array_equal(np.array(shorter), np.array(want))
    squash = resize_crop({**pre, "resize_mode": "squash"})(img)  # 20 x 20, then crop 16
    want = T.CenterCrop(16)(T.Resize((20, 20), interpolation=T.InterpolationMode.BICUBIC)(img))
    assert np.array_equal(np.array(squash), np.array(want))
    out = eval_transform(pre)(torch.from_numpy(np.array(img)).permute(2, 0, 1))  # a uint8 tensor works too
    ref = T.Normalize([0.5, 0.4, 0.3], [0.2] * 3)(T.ToTensor()(shorter))
    assert out.dtype == torch.float32 and out.shape == (3, 16, 16)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grey = ToPILRGB()(Image.fromarray(np.full((3, 3), 77, np.uint8)))  # L mode -> RGB
    assert grey.mode == "RGB" and np.array(grey).tolist() == [[[77] * 3] * 3] * 3


def test_an_archive_cache_hit_never_opens_the_archive_but_a_folder_is_rechecked(tmp_path, monkeypatch):
    from vitlens.data import catalog
    from vitlens.data.catalog import load_image_folder

    path = _tar(tmp_path / "d.tar", {"train/a/0.png": _png(5), "train/b/0.png": _png(6)})
    root = _tree(tmp_path / "f", {"train/a/0.png": _png(7), "train/b/0.png": _png(8)})
    cache = tmp_path / "cache"
    load_image_folder(path, "train", cache_dir=cache)
    load_image_folder(root, "train", cache_dir=cache)

    def no_open(*a):
        raise AssertionError("the source was opened")

    monkeypatch.setattr(catalog, "open_source", no_open)
    hit = load_image_folder(path, "train", cache_dir=cache)
    assert hit.targets == [0, 1] and int(hit[1][0][0, 0, 0]) == 6
    with pytest.raises(AssertionError, match="the source was opened"):  # a folder is listed to key it
        load_image_folder(root, "train", cache_dir=cache)
    monkeypatch.undo()
    # editing one image in place (same folder mtime) gives a new key: the edit is seen
    img = root / "train" / "b" / "0.png"
    img.write_bytes(_png(9, size=4))
    os.utime(img, ns=(10**9, 10**9))
    assert int(load_image_folder(root, "train", cache_dir=cache)[1][0][0, 0, 0]) == 9


def test_build_data_defaults_to_the_embedded_subset(tmp_path):
    from vitlens.data import build_data
    from vitlens.data.transforms import CIFAR10_MEAN, CIFAR10_STD

    train, test, info = build_data(cache_dir=tmp_path)
    assert (info.name, info.train_size, info.test_size, info.img_size) == ("cifar10-mini", 2000, 500, 32)
    assert (info.mean, info.std, info.num_classes) == (CIFAR10_MEAN, CIFAR10_STD, 10)
    assert info.extra == {"fraction": 1.0, "seed": 0, "src_size": 32, "augment": True}
    _same_pipeline(
        train.transform,
        [
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(CIFAR10_MEAN), list(CIFAR10_STD)),
        ],
    )


def test_every_cifar_route_passes_the_cache_and_corrupt_options_on(tmp_path, monkeypatch):
    """Archive as data_dir, a split tarball, an ImageFolder tree: each honours cache_dir and on_corrupt."""
    from vitlens.data.catalog import build_dataset
    from vitlens.data.decode import CorruptImageError

    monkeypatch.setenv("VITLENS_CACHE", str(tmp_path / "default_cache"))
    files = {"train/a/0.png": _png(1), "train/a/1.png": b"broken"}
    _tar(tmp_path / "direct.tar", files)
    (tmp_path / "tb").mkdir()
    _tar(tmp_path / "tb" / "cifar10-train.tar", files)
    _tree(tmp_path / "tree", files)
    for i, data_dir in enumerate([tmp_path / "direct.tar", tmp_path / "tb", tmp_path / "tree"]):
        with pytest.raises(CorruptImageError):
            build_dataset("cifar10", "train", data_dir, on_corrupt="error", cache_dir=False)
        with pytest.warns(UserWarning, match="skipping unreadable image"):
            ds = build_dataset("cifar10", "train", data_dir, cache_dir=tmp_path / f"c{i}")
        assert len(ds) == 1 and len(list((tmp_path / f"c{i}" / "decoded").iterdir())) == 1
        with pytest.warns(UserWarning, match="skipping unreadable image"):
            assert len(build_dataset("cifar10", "train", data_dir, cache_dir=False)) == 1
    assert not (tmp_path / "default_cache").exists()  # cache_dir=False wrote nothing anywhere


def test_a_one_pixel_output_is_allowed():
    from vitlens.data.transforms import build_transforms

    out = build_transforms(False, img_size=1, src_size=1)(torch.zeros(3, 1, 1, dtype=torch.uint8))
    assert out.shape == (3, 1, 1)

"""Data pipeline: datasets, tar reading, decoded cache, corrupt files, nested subsets, transforms, mixing."""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from _files import write_tar, write_tree
from PIL import Image
from torch.utils.data import DataLoader

from vitlens.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CorruptImageError,
    CorruptImageWarning,
    DataInfo,
    LazyImageDataset,
    TensorImageDataset,
    build_batch_mixer,
    build_data,
    build_dataset,
    build_transforms,
    catalog,
    nested_fraction_indices,
    parse_randaugment,
)
from vitlens.data.catalog import EMBEDDED_CIFAR10_MINI

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Calls without cache_dir must not write into the developer's ~/.cache."""
    monkeypatch.setenv("VITLENS_CACHE", str(tmp_path_factory.getbasetemp() / "default-cache"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vitlens-cache")


@pytest.fixture(scope="session")
def cifar10_test(shared_data, cache_dir) -> TensorImageDataset:
    """The real CIFAR-10 test split (10,000 JPEGs), decoded once for the session (~1-2 s)."""
    return build_dataset("cifar10", "test", shared_data / "cifar10", cache_dir=cache_dir)


def jpeg_bytes(h: int = 8, w: int = 8, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


make_folder = write_tree


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    return write_tar(path, files, mode)


def small_tree(corrupt: bool = False) -> dict[str, bytes]:
    """Two classes x 3 train + 2 test images of 8x8; optionally one truncated and one garbage train file."""
    files = {}
    for c, cls in enumerate(["ant", "bee"]):
        for i in range(3):
            files[f"train/{cls}/{i}.jpg"] = jpeg_bytes(seed=10 * c + i)
        for i in range(2):
            files[f"test/{cls}/{i}.jpg"] = jpeg_bytes(seed=100 + 10 * c + i)
    if corrupt:
        files["train/ant/truncated.jpg"] = jpeg_bytes(seed=7)[:150]
        files["train/bee/garbage.jpg"] = b"this is not a jpeg" * 20
    return files


# --------------------------------------------------------------------------- embedded subset


def test_embedded_subset_counts_and_items(cache_dir):
    train = build_dataset("cifar10-mini", "train", cache_dir=cache_dir)
    test = build_dataset("cifar10-mini", "test", cache_dir=cache_dir)
    assert EMBEDDED_CIFAR10_MINI.stat().st_size < 5e6  # "a few MB" inside the package
    assert train.classes == test.classes == CIFAR10_CLASSES
    assert (len(train), len(test)) == (2000, 500)
    assert Counter(train.targets) == {c: 200 for c in range(10)}
    assert Counter(test.targets) == {c: 50 for c in range(10)}
    img, label = train[1234]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and isinstance(label, int)
    assert train.images.float().std() > 30  # real pictures, not blank


def test_embedded_subset_is_first_files_of_real_cifar10(cifar10_test, cache_dir):
    # The mini test split = the first 50 test files per class (sorted), byte-identical JPEGs.
    mini = build_dataset("cifar10-mini", "test", cache_dir=cache_dir)
    seen: Counter = Counter()
    first50 = [i for i, t in enumerate(cifar10_test.targets) if (seen.update([t]) or seen[t]) <= 50]
    assert torch.equal(mini.images, cifar10_test.images[first50])
    assert mini.targets == [cifar10_test.targets[i] for i in first50]


# --------------------------------------------------------------------------- tar reading


@pytest.mark.parametrize("which", ["embedded .tar (offset reads)", "shared .tar.gz (streamed)"])
def test_tar_reader_matches_pil_on_extracted_files(which, shared_data, cifar10_test, cache_dir, tmp_path):
    if which.startswith("embedded"):
        archive, ds = EMBEDDED_CIFAR10_MINI, build_dataset("cifar10-mini", "test", cache_dir=cache_dir)
        picks = {0: "test/airplane/0000.jpg", 187: "test/cat/0037.jpg", 499: "test/truck/0049.jpg"}
    else:
        archive, ds = shared_data / "cifar10" / "cifar10-test.tar.gz", cifar10_test
        picks = {0: "test/airplane/0000.jpg", 3456: "test/cat/0456.jpg", 9999: "test/truck/0999.jpg"}
    with tarfile.open(archive) as tf:
        tf.extractall(tmp_path, members=[tf.getmember(n) for n in picks.values()], filter="data")
    for idx, name in picks.items():
        ref = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert np.array_equal(ds[idx][0].permute(1, 2, 0).numpy(), ref), name
        assert ds.classes[ds[idx][1]] == name.split("/")[1]


def test_tar_with_prefix_folder_and_val_split(tmp_path):
    files = {f"mydata/{k.replace('test/', 'val/')}": v for k, v in small_tree().items()}
    archive = make_tar(tmp_path / "data.tar", files, mode="w")
    train = build_dataset("imagefolder", "train", archive, cache_dir=tmp_path / "c")
    test = build_dataset("imagefolder", "test", archive, cache_dir=tmp_path / "c")  # falls back to val/
    assert (len(train), len(test), train.classes) == (6, 4, ["ant", "bee"])
    assert test.targets == [0, 0, 1, 1]


def test_folder_and_tar_give_identical_datasets(tmp_path):
    files = small_tree()
    folder = build_dataset("imagefolder", "train", make_folder(tmp_path / "dir", files), cache_dir=False)
    tgz = build_dataset("imagefolder", "train", make_tar(tmp_path / "d.tar.gz", files), cache_dir=False)
    assert isinstance(folder, TensorImageDataset) and isinstance(tgz, TensorImageDataset)
    assert torch.equal(folder.images, tgz.images) and folder.targets == tgz.targets == [0, 0, 0, 1, 1, 1]


def test_mixed_sizes_stay_lazy(tmp_path):
    files = small_tree()
    files["train/bee/big.jpg"] = jpeg_bytes(20, 12)
    ds = build_dataset("imagefolder", "train", make_folder(tmp_path / "d", files), cache_dir=tmp_path / "c")
    assert isinstance(ds, LazyImageDataset) and len(ds) == 7
    assert ds[6][0].shape == (3, 20, 12) and ds[0][0].shape == (3, 8, 8)  # bee/big.jpg sorts last
    assert not (tmp_path / "c").exists()  # nothing stacked, nothing cached
    train, _, info = build_data("imagefolder", tmp_path / "d", img_size=16, cache_dir=False)
    assert info.img_size == 16 and info.mean == (0.485, 0.456, 0.406)  # ImageNet stats for folders
    assert {train[i][0].shape for i in range(len(train))} == {(3, 16, 16)}


# --------------------------------------------------------------------------- decoded cache


def test_cache_round_trip_is_identical_fast_and_keyed_by_mtime(tmp_path, monkeypatch):
    archive = tmp_path / "mini.tar"
    archive.write_bytes(EMBEDDED_CIFAR10_MINI.read_bytes())
    first = build_dataset("imagefolder", "train", archive, cache_dir=tmp_path / "c")
    cached = list((tmp_path / "c" / "decoded").glob("*.safetensors"))
    assert len(cached) == 1

    # A hit must not even open the archive.
    def no_decode(*a, **k):
        raise AssertionError("archive reopened despite a valid cache")

    monkeypatch.setattr(catalog, "open_source", no_decode)
    t0 = time.perf_counter()
    second = build_dataset("imagefolder", "train", archive, cache_dir=tmp_path / "c")
    assert time.perf_counter() - t0 < 0.5
    assert torch.equal(first.images, second.images)
    assert (first.targets, first.classes) == (second.targets, second.classes)

    # Touching the source changes the key: the stale cache is not used.
    os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(AssertionError, match="reopened"):
        build_dataset("imagefolder", "train", archive, cache_dir=tmp_path / "c")


def test_cache_disabled_and_unwritable(tmp_path):
    files = small_tree()
    root = make_folder(tmp_path / "d", files)
    build_dataset("imagefolder", "train", root, cache_dir=False)
    assert not any(tmp_path.glob("**/*.safetensors"))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should go")
    with pytest.warns(UserWarning, match="could not write the decoded-image cache"):
        ds = build_dataset("imagefolder", "train", root, cache_dir=blocker)
    assert len(ds) == 6


# --------------------------------------------------------------------------- corrupt files


@pytest.mark.parametrize("container", ["folder", "tar.gz"])
def test_corrupt_files_warn_or_error(container, tmp_path):
    files = small_tree(corrupt=True)
    src = make_folder(tmp_path / "d", files) if container == "folder" else make_tar(tmp_path / "d.tgz", files)
    with pytest.raises(CorruptImageError, match=r"(truncated|garbage)\.jpg") as exc:
        build_dataset("imagefolder", "train", src, on_corrupt="error", cache_dir=tmp_path / "c")
    assert "on_corrupt='warn'" in str(exc.value)  # the message says how to get past it

    with pytest.warns(CorruptImageWarning) as record:
        ds = build_dataset("imagefolder", "train", src, on_corrupt="warn", cache_dir=tmp_path / "c")
    named = " ".join(str(w.message) for w in record)
    assert "truncated.jpg" in named and "garbage.jpg" in named
    assert len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]  # labels stay aligned after skipping

    # The cache remembers what it skipped, so a cached load still obeys on_corrupt.
    with pytest.raises(CorruptImageError, match=r"(truncated|garbage)\.jpg"):
        build_dataset("imagefolder", "train", src, on_corrupt="error", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="on_corrupt"):
        build_dataset("imagefolder", "train", src, on_corrupt="ignore")


def test_corrupt_file_in_lazy_dataset(tmp_path):
    files = small_tree()
    files["train/bee/big.jpg"] = jpeg_bytes(20, 12)  # mixed sizes -> lazy
    files["train/bee/zz_truncated.jpg"] = jpeg_bytes(16, 16)[:120]
    root = make_folder(tmp_path / "d", files)
    strict = build_dataset("imagefolder", "train", root, on_corrupt="error", cache_dir=False)
    assert isinstance(strict, LazyImageDataset)
    with pytest.raises(CorruptImageError, match="zz_truncated.jpg"):
        strict[len(strict) - 1]
    lenient = build_dataset("imagefolder", "train", root, on_corrupt="warn", cache_dir=False)
    with pytest.warns(CorruptImageWarning, match="zz_truncated.jpg"):
        img, label = lenient[len(lenient) - 1]  # replaced by the next readable item (wraps to 0)
    assert img.shape == (3, 8, 8) and label == 0


# --------------------------------------------------------------------------- helpful errors


def test_missing_and_empty_sources_explain_the_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*does not exist.*train/<class>"):
        build_dataset("imagefolder", "train", missing)
    with pytest.raises(FileNotFoundError, match=r"no 'train/' folder.*train/<class>"):
        build_dataset("imagefolder", "train", tmp_path)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"train is empty.*no image files"):
        build_dataset("imagefolder", "train", tmp_path)
    (tmp_path / "train" / "loose.jpg").write_bytes(jpeg_bytes())
    with pytest.raises(ValueError, match="not inside class folders"):
        build_dataset("imagefolder", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no 'test/<class>/<image>' or 'val/.*entries"):
        build_dataset("imagefolder", "test", make_tar(tmp_path / "t.tar", {"train/a/0.jpg": jpeg_bytes()}))
    with pytest.raises(ValueError, match="needs data_dir"):
        build_dataset("imagefolder", "train")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*cifar10-mini"):
        build_dataset("mnist", "train")
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("cifar10-mini", "holdout")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b" + b"\0" * 100)
    with pytest.raises(ValueError, match="broken.tar.gz.*damaged"):
        build_dataset("imagefolder", "train", broken)


def test_cifar_not_found_lists_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        build_dataset("cifar10", "train", tmp_path)
    msg = str(exc.value)
    for expected in [
        "cifar-10-batches-py",
        "cifar10-train.tar.gz",
        "train/<class>",
        "--data-dir",
        "download=True",
    ]:
        assert expected in msg
    assert "--download" not in msg  # the CLI has no such flag


def test_cifar_source_detection(tmp_path, monkeypatch, shared_data, cache_dir):
    # ImageFolder tree under data_dir/cifar100
    make_folder(tmp_path / "cifar100", small_tree())
    assert len(build_dataset("cifar100", "test", tmp_path, cache_dir=False)) == 4
    # data_dir = the parent of cifar10/ with the JPEG tarballs (the shared data layout)
    assert len(build_dataset("cifar10", "test", shared_data, cache_dir=cache_dir)) == 10_000

    # torchvision's binary release: routed to torchvision.datasets.CIFAR10 (md5-checked files are
    # not available offline, so a stand-in records the call).
    import torchvision.datasets

    class FakeCIFAR10:
        classes = CIFAR10_CLASSES

        def __init__(self, root, train, download):
            self.call = (root, train, download)
            self.data = np.zeros((4, 32, 32, 3), np.uint8)
            self.data[:, 0, 1, 2] = 255
            self.targets = [0, 1, 2, 3]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    ds = build_dataset("cifar10", "train", tmp_path)
    assert ds.images.shape == (4, 3, 32, 32) and ds.images[0, 2, 0, 1] == 255 and ds.targets == [0, 1, 2, 3]


# --------------------------------------------------------------------------- nested subsets


def test_nested_fraction_indices_on_real_cifar10(cifar10_test):
    targets = np.asarray(cifar10_test.targets)
    sets = {f: nested_fraction_indices(targets, f, seed=3) for f in (0.05, 0.1, 0.5)}
    assert set(sets[0.05]) <= set(sets[0.1]) <= set(sets[0.5])
    for f, idx in sets.items():
        assert np.all(np.diff(idx) > 0)  # sorted, no duplicates
        counts = np.bincount(targets[idx], minlength=10)
        assert counts.max() - counts.min() <= 1 and counts.sum() == pytest.approx(f * len(targets), abs=10)
    assert np.array_equal(nested_fraction_indices(targets, 0.1, seed=3), sets[0.1])  # deterministic
    assert not np.array_equal(nested_fraction_indices(targets, 0.1, seed=4), sets[0.1])
    assert len(nested_fraction_indices(targets, 1.0)) == len(targets)


def test_nested_fraction_indices_edge_cases():
    targets = [0] * 7 + [1] * 3 + [5] * 1  # unbalanced, sparse labels
    idx = nested_fraction_indices(targets, 0.01)
    assert Counter(np.asarray(targets)[idx]) == {0: 1, 1: 1, 5: 1}  # at least one per class
    assert Counter(np.asarray(targets)[nested_fraction_indices(targets, 0.5)]) == {0: 4, 1: 2, 5: 1}
    for bad in (0, -0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
            nested_fraction_indices(targets, bad)


# --------------------------------------------------------------------------- transforms and mixing


def test_eval_transform_normalizes_exactly():
    tf = build_transforms(False, img_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD, src_size=32)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out = tf(img)
    expected = (img.float() / 255 - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[
        :, None, None
    ]
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    assert torch.allclose(out, expected, atol=1e-6)


def test_train_transforms_shapes_and_randomness():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    tf = build_transforms(
        True,
        img_size=32,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        randaugment="rand-m9-n2",
        random_erasing=0.25,
        src_size=32,
    )
    outs = torch.stack([tf(img) for _ in range(8)])
    assert outs.shape == (8, 3, 32, 32) and outs.dtype == torch.float32
    assert not torch.allclose(outs[0], outs[1]) or not torch.allclose(outs[2], outs[3])  # augmented
    names = [type(t).__name__ for t in tf.transforms]
    assert names == [
        "RandomCrop",
        "RandomHorizontalFlip",
        "RandAugment",
        "ToDtype",
        "Normalize",
        "RandomErasing",
    ]
    # Source size unknown: a deterministic resize + center crop first (a no-op on 32x32 input).
    unknown = build_transforms(True, img_size=32, hflip=False, crop_padding=0)
    assert [type(t).__name__ for t in unknown.transforms][:2] == ["Resize", "CenterCrop"]
    assert torch.equal(unknown(img), build_transforms(False, img_size=32, src_size=32)(img))
    # CIFAR upscaled for a bigger model: resize, then pad-crop with scaled padding; eval just resizes.
    up = build_transforms(True, img_size=64, src_size=32)
    assert type(up.transforms[0]).__name__ == "Resize" and up.transforms[1].padding == [8, 8, 8, 8]
    assert up(img).shape == (3, 64, 64) and build_transforms(False, img_size=64, src_size=32)(img).shape == (
        3,
        64,
        64,
    )
    # Large / unknown-size images: RandomResizedCrop for train, resize + center crop for eval.
    big = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    rrc = build_transforms(True, img_size=96)
    assert type(rrc.transforms[0]).__name__ == "RandomResizedCrop" and rrc(big).shape == (3, 96, 96)
    assert build_transforms(False, img_size=96)(big).shape == (3, 96, 96)


def test_parse_randaugment():
    assert parse_randaugment("rand-m9-n2") == (2, 9) == parse_randaugment("rand-n2-m9")
    assert parse_randaugment((3, 15)) == (3, 15)
    assert parse_randaugment(None) is None and parse_randaugment("none") is None
    with pytest.raises(ValueError, match="mstd0.5.*not supported"):
        parse_randaugment("rand-m9-mstd0.5")
    with pytest.raises(ValueError, match="rand-m9-n2"):
        parse_randaugment("autoaugment")
    with pytest.raises(ValueError, match="magnitude <= 30"):
        parse_randaugment("rand-m40")


def test_batch_mixer_soft_labels():
    assert build_batch_mixer(10, 0.0, 0.0) is None
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for mixup, cutmix in [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)]:
        mixer = build_batch_mixer(10, mixup_alpha=mixup, cutmix_alpha=cutmix)
        out, soft = mixer(images, labels)
        assert out.shape == images.shape and soft.shape == (16, 10)
        assert torch.allclose(soft.sum(1), torch.ones(16)) and (soft >= 0).all()
        assert (soft.argmax(1) == labels).float().mean() > 0 or (soft.max(1).values < 1).all()
    never = build_batch_mixer(10, mixup_alpha=0.8, prob=1e-9)
    out, soft = never(images, labels)  # unmixed batches still come back as one-hot soft labels
    assert torch.equal(out, images) and torch.equal(soft, torch.nn.functional.one_hot(labels, 10).float())
    with pytest.raises(ValueError, match="prob"):
        build_batch_mixer(10, 0.8, prob=2.0)


# --------------------------------------------------------------------------- build_data


def test_build_data_embedded_with_fraction(cache_dir):
    train, test, info = build_data(
        "cifar10-mini", fraction=0.1, seed=1, randaugment="rand-m9-n2", cache_dir=cache_dir
    )
    assert isinstance(info, DataInfo)
    assert (info.num_classes, info.img_size, info.in_chans) == (10, 32, 3)
    assert info.classes == CIFAR10_CLASSES and info.mean == CIFAR10_MEAN and info.std == CIFAR10_STD
    assert (len(train), len(test)) == (200, 500) == (info.train_size, info.test_size)
    assert Counter(train.targets) == {c: 20 for c in range(10)}  # balanced, and exposed through the Subset
    x, y = next(iter(DataLoader(train, batch_size=32, shuffle=True)))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.5  # normalized
    # Nested across fractions for the same seed.
    train_small, _, _ = build_data("cifar10-mini", fraction=0.05, seed=1, cache_dir=cache_dir)
    assert set(train_small.base.indices) <= set(train.base.indices)
    # augment=False: the training split gets the deterministic eval transforms.
    plain, test, _ = build_data("cifar10-mini", augment=False, cache_dir=cache_dir)
    assert torch.equal(plain[5][0], plain[5][0]) and torch.equal(
        plain[5][0], test.transform(plain.base[5][0])
    )
    # Upscaled for a larger model.
    _, test224, info224 = build_data("cifar10-mini", img_size=64, cache_dir=cache_dir)
    assert info224.img_size == 64 and test224[0][0].shape == (3, 64, 64)


def test_build_data_rejects_mismatched_classes(tmp_path):
    files = small_tree()
    files["train/cow/0.jpg"] = jpeg_bytes()
    with pytest.raises(ValueError, match=r"different classes.*only in train: \['cow'\]"):
        build_data("imagefolder", make_folder(tmp_path / "d", files), cache_dir=False)

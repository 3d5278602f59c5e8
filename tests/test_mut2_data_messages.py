"""Every user-facing message of ``vitlens.data``, checked whole (issue 15, mutation round 2).

A message is the UX contract ("name the problem AND the fix"): ``pytest.raises(match=...)`` only
searches a substring, so a mangled tail or a changed case goes unnoticed. Here each raise, warning
and ``repr`` is compared in full with the text a user reads, written out by hand.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _files import png_bytes as _png
from _files import write_tar as _tar
from _files import write_tree as _tree
from PIL import Image
from torchvision.transforms import v2

from vitlens.errors import ConfigError, DataError, MissingFileError

HINT = "expected the ImageFolder layout <root>/train/<class>/<image> and <root>/test/<class>/<image>"
EXTS = ".jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp, .gif"






def _raised(call, err):
    with pytest.raises(err) as e:
        call()
    return str(e.value)


def _warned(call, category=UserWarning):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = call()
    hits = [x for x in w if issubclass(x.category, category)]
    return out, hits


# ------------------------------------------------------------------------------------ transforms
def test_transform_and_randaugment_errors_read_in_full():
    from vitlens.data.transforms import build_transforms, parse_randaugment

    cases = [
        (lambda: build_transforms(False, img_size=0), "img_size must be a positive number of pixels, got 0"),
        (
            lambda: build_transforms(True, img_size=8, random_erasing=1.5),
            "random_erasing is a probability in [0, 1], got 1.5",
        ),
        (
            lambda: build_transforms(True, img_size=8, random_erasing=-0.1),
            "random_erasing is a probability in [0, 1], got -0.1",
        ),
        (
            lambda: build_transforms(True, img_size=8, crop="zoom"),
            "crop='zoom' is not a recipe; use 'pad' (CIFAR-style) or 'rrc' (RandomResizedCrop)",
        ),
        (
            lambda: parse_randaugment("augmix"),
            "randaugment='augmix' is not understood; write it like 'rand-m9-n2' (magnitude 9, 2 ops)",
        ),
        (
            lambda: parse_randaugment("rand"),
            "randaugment='rand' is not understood; write it like 'rand-m9-n2' (magnitude 9, 2 ops)",
        ),
        (
            lambda: parse_randaugment("rand-q9"),
            "randaugment='rand-q9': 'q9' is not supported (torchvision's RandAugment takes only m<magnitude> "
            "and n<num_ops>); write it like 'rand-m9-n2'",
        ),
        (
            lambda: parse_randaugment(3.5),
            "randaugment=3.5: give a string like 'rand-m9-n2' or (num_ops, magnitude)",
        ),
        (
            lambda: parse_randaugment("rand-m31"),
            "randaugment='rand-m31': need num_ops >= 1 and 0 <= magnitude <= 30",
        ),
        (lambda: parse_randaugment((0, 9)), "randaugment=(0, 9): need num_ops >= 1 and 0 <= magnitude <= 30"),
    ]
    for call, msg in cases:
        assert _raised(call, ConfigError) == msg


# ------------------------------------------------------------------------------------ mixing, subsets
def test_mixing_and_subset_errors_and_repr_read_in_full():
    from vitlens.data.mixing import BatchMixer, build_batch_mixer
    from vitlens.data.subset import nested_fraction_indices

    assert _raised(lambda: build_batch_mixer(10, mixup_alpha=-1.0), ConfigError) == (
        "mixup_alpha and cutmix_alpha must be >= 0 (0 disables), got -1.0, 0.0"
    )
    assert _raised(lambda: build_batch_mixer(10, cutmix_alpha=-2.0), ConfigError) == (
        "mixup_alpha and cutmix_alpha must be >= 0 (0 disables), got 0.0, -2.0"
    )
    assert _raised(lambda: build_batch_mixer(10, mixup_alpha=0.2, prob=1.5), ConfigError) == (
        "prob is the chance a batch gets mixed, in [0, 1]; got 1.5"
    )
    mixer = build_batch_mixer(3, mixup_alpha=0.2)
    assert _raised(lambda: mixer(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3)), ValueError) == (
        "labels must be a (B,) tensor of class indices, got shape (2, 3)"
    )
    # the default prob is 1: every batch mixed, and the repr says so
    plain = BatchMixer(3, [v2.MixUp(alpha=0.2, num_classes=3)])
    assert plain.prob == 1.0
    assert repr(plain) == "BatchMixer(prob=1.0, MixUp(alpha=0.2, num_classes=3))"
    assert repr(build_batch_mixer(3, cutmix_alpha=1.0, prob=0.5)) == (
        "BatchMixer(prob=0.5, CutMix(alpha=1.0, num_classes=3))"
    )
    assert _raised(lambda: nested_fraction_indices([0, 1], 0), ConfigError) == (
        "fraction must be a number in (0, 1] (the share of each class's training images to use), got 0; "
        "e.g. 0.1 for 10%"
    )
    assert _raised(lambda: nested_fraction_indices([[0, 1]], 0.5), ValueError) == (
        "targets must be a 1-D sequence of int labels, got shape (1, 2) int64"
    )
    assert _raised(lambda: nested_fraction_indices([0.5, 1.0], 0.5), ValueError) == (
        "targets must be a 1-D sequence of int labels, got shape (2,) float64"
    )


# ------------------------------------------------------------------------------------ decode
def test_decode_errors_and_warnings_read_in_full():
    from vitlens.data.decode import (
        CorruptImageError,
        CorruptImageWarning,
        check_on_corrupt,
        decode_bytes,
        report_corrupt,
    )

    assert _raised(lambda: check_on_corrupt("ignore"), ConfigError) == (
        "on_corrupt='ignore' is not supported; use one of ('warn', 'error')"
    )
    assert check_on_corrupt("warn") == "warn" and check_on_corrupt("error") == "error"
    err = CorruptImageError("cat/1.png", "bad header")
    assert (err.name, err.reason) == ("cat/1.png", "bad header")
    assert str(err) == (
        "cannot decode image cat/1.png: bad header. Delete or replace the file, or pass on_corrupt='warn' "
        "(--on-corrupt warn) to skip unreadable files"
    )
    assert isinstance(err, ValueError)
    for data, reason in [
        (b"", "not a recognizable image file (empty)"),
        (b"garbage bytes", "not a recognizable image file"),
    ]:
        with pytest.raises(CorruptImageError) as e:
            decode_bytes(data, "dog/2.jpg")
        assert (e.value.name, e.value.reason) == ("dog/2.jpg", reason)
    # a truncated file Pillow recognises: the reason is "<exception type>: <its text>"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="BMP")
    with pytest.raises(CorruptImageError) as e:
        decode_bytes(buf.getvalue()[:40], "x.bmp")
    assert re.fullmatch(r"[A-Za-z]*Error: \S.*", e.value.reason), e.value.reason

    _, hits = _warned(lambda: report_corrupt(err, "warn"), CorruptImageWarning)
    assert [str(h.message) for h in hits] == ["skipping unreadable image cat/1.png: bad header"]
    with pytest.raises(CorruptImageError) as e:
        report_corrupt(err, "error")
    assert e.value is err


# ------------------------------------------------------------------------------------ datasets
def test_dataset_errors_warnings_and_reprs_read_in_full(tmp_path):
    from vitlens.data.datasets import (
        LazyImageDataset,
        TensorImageDataset,
        TransformedDataset,
        dataset_targets,
    )
    from vitlens.data.decode import CorruptImageError, CorruptImageWarning
    from vitlens.data.sources import open_source

    assert _raised(lambda: TensorImageDataset(torch.zeros(2, 3, 4, 4), [0, 1], ["a"]), ValueError) == (
        "images must be a uint8 (N, C, H, W) tensor, got torch.float32 (2, 3, 4, 4)"
    )
    assert (
        _raised(lambda: TensorImageDataset(torch.zeros(3, 4, 4, dtype=torch.uint8), [0], ["a"]), ValueError)
        == "images must be a uint8 (N, C, H, W) tensor, got torch.uint8 (3, 4, 4)"
    )
    assert (
        _raised(
            lambda: TensorImageDataset(torch.zeros(2, 3, 4, 5, dtype=torch.uint8), [0, 1, 0], ["a"]),
            ValueError,
        )
        == "2 images but 3 targets"
    )
    ds = TensorImageDataset(torch.zeros(2, 3, 4, 5, dtype=torch.uint8), [0, 1], ["a", "b"], "somewhere")
    assert repr(ds) == "TensorImageDataset(2 images 3x4x5, 2 classes, from somewhere)"
    assert ds.image_size == (4, 5)
    assert repr(TransformedDataset(ds, None)) == (
        "TransformedDataset(TensorImageDataset(2 images 3x4x5, 2 classes, from somewhere),\n  transform=None)"
    )
    assert _raised(lambda: dataset_targets(torch.nn.Linear(1, 1)), TypeError) == (
        "Linear has no .targets (one int label per item)"
    )

    root = _tree(
        tmp_path / "t", {"train/a/0.png": b"junk", "train/a/1.png": _png(7), "train/b/2.png": b"junk"}
    )
    lazy = LazyImageDataset(open_source(root, "train"), "warn")
    split_dir = root / "train"
    assert repr(lazy) == f"LazyImageDataset(3 images, 2 classes, from {split_dir})"
    (img, label), hits = _warned(lambda: lazy[0], CorruptImageWarning)
    assert label == 0 and int(img[0, 0, 0]) == 7
    assert [str(h.message) for h in hits] == [
        f"unreadable image {split_dir / 'a' / '0.png'} (not a recognizable image file); "
        "returning the next item instead"
    ]
    bad = LazyImageDataset(
        open_source(_tree(tmp_path / "g", {"train/a/0.png": b"x", "train/a/1.png": b"y"}), "train"), "warn"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CorruptImageError) as e:
            bad[1]
    assert e.value.name == str(tmp_path / "g" / "train" / "a" / "1.png")
    assert e.value.reason == "it and the 1 items after it are unreadable"


# ------------------------------------------------------------------------------------ preprocess
def test_preprocess_errors_read_in_full():
    from vitlens.data.preprocess import ToPILRGB, check_preprocess

    ok = {"resize": 8, "crop": 8, "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3}
    assert _raised(lambda: check_preprocess({"resize": 8}), ConfigError) == (
        "a preprocessing description needs resize, crop, interpolation, mean, std; missing crop, "
        "interpolation, mean, std"
    )
    assert _raised(lambda: check_preprocess({**ok, "resize_mode": "fit"}), ConfigError) == (
        "preprocess resize_mode 'fit' is not one of shorter, squash"
    )
    assert _raised(lambda: check_preprocess({**ok, "interpolation": "cubic-ish"}), ConfigError) == (
        "preprocess interpolation 'cubic-ish' is not one of "
        "nearest, nearest-exact, bilinear, bicubic, box, hamming, lanczos"
    )
    assert check_preprocess(ok) is ok and check_preprocess({**ok, "resize_mode": "squash"})
    assert _raised(lambda: ToPILRGB()(np.zeros((3, 4, 4), np.uint8)), TypeError) == (
        "expected a PIL image or a uint8 (3, H, W) tensor, got ndarray"
    )
    assert repr(ToPILRGB()) == "ToPILRGB()"


# ------------------------------------------------------------------------------------ sources
def test_source_errors_read_in_full(tmp_path):
    from vitlens.data.sources import open_source, split_dirs

    assert (
        _raised(lambda: split_dirs("dev"), ConfigError)
        == "unknown split 'dev'; use one of ['test', 'train', 'val']"
    )
    nowhere = tmp_path / "nowhere"
    assert _raised(lambda: open_source(nowhere, "train"), MissingFileError) == (
        f"image folder {nowhere} does not exist; {HINT}. Pass the folder that holds train/ and test/ "
        "(--data-dir)"
    )
    (tmp_path / "file.txt").write_text("x")
    assert _raised(lambda: open_source(tmp_path / "file.txt", "train"), DataError) == (
        f"{tmp_path / 'file.txt'} is not a directory or a .tar/.tar.gz archive; {HINT}"
    )
    holder = tmp_path / "holder"
    (holder / "zz").mkdir(parents=True)
    (holder / "other").mkdir()
    (holder / "a_file.png").write_bytes(_png())
    assert _raised(lambda: open_source(holder, "train"), MissingFileError) == (
        f"no 'train/' folder in {holder} (it holds folders: other, zz); {HINT}"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _raised(lambda: open_source(empty, "test"), MissingFileError) == (
        f"no 'test/' or 'val/' folder in {empty} (it holds folders: nothing); {HINT}"
    )
    loose = _tree(tmp_path / "loose", {"train/x.png": _png(), "train/y.jpg": _png(), "train/notes.txt": b""})
    assert _raised(lambda: open_source(loose, "train"), DataError) == (
        f"{loose / 'train'} is empty for training: its 2 images are not inside class folders; {HINT}"
    )
    bare = _tree(tmp_path / "bare", {"train/cat/notes.txt": b"x"})
    assert _raised(lambda: open_source(bare, "train"), DataError) == (
        f"{bare / 'train'} is empty for training: it has no image files ({EXTS}) in class folders; {HINT}"
    )


def test_archive_errors_read_in_full(tmp_path):
    from vitlens.data.sources import TarSource, open_source

    missing = tmp_path / "gone.tar"
    assert _raised(lambda: TarSource(missing, "train"), MissingFileError) == (
        f"archive {missing} does not exist; {HINT} inside a .tar/.tar.gz"
    )
    wrong = _tar(tmp_path / "wrong.tar", {"stuff/train/a/0.png": _png(), "other/readme.png": _png()})
    assert _raised(lambda: open_source(wrong, "test"), MissingFileError) == (
        f"no 'test/<class>/<image>' or 'val/<class>/<image>' entries in {wrong} "
        f"(top-level names: other, stuff); {HINT}"
    )
    no_images = _tar(tmp_path / "noimg.tar", {"train/a/readme.txt": b"hello"})
    assert _raised(lambda: open_source(no_images, "train"), MissingFileError) == (
        f"no 'train/<class>/<image>' entries in {no_images} (top-level names: no image files at all); {HINT}"
    )
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x00" * 10 + b"definitely not a tar archive" * 40)
    msg = _raised(lambda: open_source(bad, "train"), DataError)
    assert re.fullmatch(
        re.escape(f"could not read the archive {bad} (")
        + r"[A-Za-z]+: .*"
        + re.escape(
            "); it looks damaged or is not a tar file. Re-download or re-create it, or pass an "
            "unpacked folder instead"
        ),
        msg,
    ), msg


# ------------------------------------------------------------------------------------ catalog
def test_catalog_errors_read_in_full(tmp_path, monkeypatch):
    from vitlens.data import catalog
    from vitlens.data.catalog import build_dataset, load_image_folder

    assert _raised(lambda: build_dataset("imagefolder", "train"), ConfigError) == (
        "dataset 'imagefolder' needs data_dir (--data-dir): a folder or .tar/.tar.gz holding "
        "train/<class>/<image> and test/<class>/<image> (or val/)"
    )
    assert _raised(lambda: build_dataset("mnist", "train"), ConfigError) == (
        "unknown dataset 'mnist'; choose one of cifar10-mini, cifar10, cifar100, imagefolder"
    )
    broken = _tree(tmp_path / "broken", {"train/a/0.png": b"x", "train/b/1.png": b"y"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _raised(lambda: load_image_folder(broken, "train", cache_dir=False), DataError) == (
            f"none of the 2 image files in {broken / 'train'} could be decoded; check the files"
        )
    gone = tmp_path / "no_mini.tar"
    monkeypatch.setattr(catalog, "EMBEDDED_CIFAR10_MINI", gone)
    assert _raised(lambda: build_dataset("cifar10-mini", "train"), MissingFileError) == (
        f"the embedded dataset {gone} is missing from this install; reinstall vitlens, or rebuild it with "
        "scripts/make_embedded_subset.py"
    )


def test_cifar10_mini_with_a_data_dir_warns_at_the_callers_line(tmp_path):
    from vitlens.data.catalog import build_dataset

    ds, hits = _warned(lambda: build_dataset("cifar10-mini", "test", tmp_path / "mine", cache_dir=False))
    assert len(ds) == 500
    assert [str(h.message) for h in hits] == [
        f"cifar10-mini is embedded in the package; ignoring data_dir='{tmp_path / 'mine'}' "
        "(use name 'cifar10' to read CIFAR-10 from a folder)"
    ]
    # stacklevel: the warning points out of catalog.py (at the caller), not at the warn() line itself
    assert Path(hits[0].filename).name != "catalog.py"


def test_cifar_not_found_message_in_full(tmp_path):
    from vitlens.data.catalog import build_dataset

    msg = _raised(lambda: build_dataset("cifar10", "test", tmp_path), MissingFileError)
    r, rc = tmp_path, tmp_path / "cifar10"
    assert msg == (
        "cifar10 (test split) not found. Looked for:\n"
        f"    {r / 'cifar-10-batches-py'}/  (torchvision binary release)\n"
        f"    {r / 'cifar10-test.tar.gz'}  (JPEG tarball; also .tgz/.tar)\n"
        f"    {r / 'test'}/<class>/<image>  (ImageFolder)\n"
        f"    {rc / 'cifar-10-batches-py'}/  (torchvision binary release)\n"
        f"    {rc / 'cifar10-test.tar.gz'}  (JPEG tarball; also .tgz/.tar)\n"
        f"    {rc / 'test'}/<class>/<image>  (ImageFolder)\n"
        "Fix: pass --data-dir (data_dir=) pointing at a folder with one of these (or, from Python when "
        f"online, build_dataset(..., download=True) fetches it into {r})"
    )
    # a folder already named after the dataset is searched alone
    named = tmp_path / "cifar100"
    named.mkdir()
    msg = _raised(lambda: build_dataset("cifar100", "train", named), MissingFileError)
    assert msg.splitlines()[1:4] == [
        f"    {named / 'cifar-100-python'}/  (torchvision binary release)",
        f"    {named / 'cifar100-train.tar.gz'}  (JPEG tarball; also .tgz/.tar)",
        f"    {named / 'train'}/<class>/<image>  (ImageFolder)",
    ]
    assert msg.splitlines()[4].startswith("Fix: ")


def test_torchvision_cifar_failures_read_in_full(tmp_path, monkeypatch):
    """torchvision's own errors become ours: 'not found or corrupted' -> MissingFileError, a failed
    download (no network) -> DataError, each naming the folder and the fix."""
    import torchvision.datasets

    from vitlens.data.catalog import build_dataset

    def raising(exc):
        class Fake:
            def __init__(self, root, train, download):
                raise exc

        return Fake

    monkeypatch.setattr(
        torchvision.datasets, "CIFAR10", raising(RuntimeError("Dataset not found or corrupted."))
    )
    assert _raised(lambda: build_dataset("cifar10", "train", tmp_path, download=True), MissingFileError) == (
        f"cifar10 binary files in {tmp_path / 'cifar-10-batches-py'} are missing or corrupted (Dataset not "
        "found or corrupted.); delete that folder and fetch it again (from Python: download=True), or pass "
        "another --data-dir"
    )
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", raising(OSError("no route to host")))
    assert _raised(lambda: build_dataset("cifar100", "test", tmp_path, download=True), DataError) == (
        f"could not download cifar100 into {tmp_path} (OSError: no route to host); without internet, fetch "
        "it elsewhere and pass --data-dir"
    )


# ------------------------------------------------------------------------------------ cache
def test_cache_warnings_read_in_full(tmp_path):
    from vitlens.data.cache import DecodedSplit, load_decoded, save_decoded

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    out, hits = _warned(lambda: load_decoded(junk))
    assert out is None and len(hits) == 1
    text = str(hits[0].message)
    assert re.fullmatch(
        re.escape(f"ignoring unreadable decoded cache {junk} (")
        + r"[A-Za-z]+: .+"
        + re.escape("); rebuilding it"),
        text,
    ), text
    assert Path(hits[0].filename).name != "cache.py"  # points at the caller

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    target = blocker / "decoded" / "x.safetensors"
    split = DecodedSplit(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), [0], ["a"], "src", [])
    _, hits = _warned(lambda: save_decoded(target, split))
    assert len(hits) == 1
    text = str(hits[0].message)
    assert re.fullmatch(
        re.escape(f"could not write the decoded-image cache {target} (")
        + r".+"
        + re.escape(
            "); continuing without it, so the next run decodes again. Point cache_dir / "
            "$VITLENS_CACHE at a writable folder to fix this"
        ),
        text,
    ), text
    assert Path(hits[0].filename).name != "cache.py"


# ------------------------------------------------------------------------------------ build_data
def test_mismatched_class_message_in_full(tmp_path):
    from vitlens.data import build_data

    root = _tree(
        tmp_path / "r",
        {"train/a/0.png": _png(), "train/b/0.png": _png(), "test/a/0.png": _png(), "test/c/0.png": _png()},
    )
    assert _raised(lambda: build_data("imagefolder", root, cache_dir=False), DataError) == (
        "the train and test splits of imagefolder have different classes (only in train: ['b']; "
        "only in test: ['c']), so their labels would not match; give both splits the same class folders"
    )
    extra = _tree(tmp_path / "e", {"train/a/0.png": _png(), "test/a/0.png": _png(), "test/c/0.png": _png()})
    assert _raised(lambda: build_data("imagefolder", extra, cache_dir=False), DataError) == (
        "the train and test splits of imagefolder have different classes (only in train: -; "
        "only in test: ['c']), so their labels would not match; give both splits the same class folders"
    )
    only = _tree(tmp_path / "s", {"train/a/0.png": _png(), "train/b/0.png": _png(), "test/a/0.png": _png()})
    assert _raised(lambda: build_data("imagefolder", only, cache_dir=False), DataError) == (
        "the train and test splits of imagefolder have different classes (only in train: ['b']; "
        "only in test: -), so their labels would not match; give both splits the same class folders"
    )


# ------------------------------------------------------------------------------------ device path
def test_device_path_errors_and_repr_read_in_full(tmp_path):
    from vitlens.data.datasets import LazyImageDataset, TensorImageDataset, TransformedDataset
    from vitlens.data.device_loader import DeviceLoader, resolve_data_path
    from vitlens.data.sources import open_source

    root = _tree(tmp_path / "t", {"train/a/0.png": _png(), "train/b/1.png": _png()})
    lazy = LazyImageDataset(open_source(root, "train"))
    assert _raised(lambda: DeviceLoader(lazy, 2), DataError) == (
        "LazyImageDataset is not decoded in memory, so it cannot live on the device; "
        "use data_path='dataloader' (or 'auto', which picks it)"
    )
    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    base = TensorImageDataset(images, [0] * 10, ["a"])
    rrc = v2.Compose([v2.RandomResizedCrop(4)])
    assert _raised(lambda: DeviceLoader(TransformedDataset(base, rrc), 2), DataError) == (
        f"the transform {rrc} has an op with no batched version (e.g. RandomResizedCrop); "
        "use data_path='dataloader' (or 'auto', which picks it)"
    )
    assert _raised(lambda: resolve_data_path("gpu", base, torch.device("cpu")), ConfigError) == (
        "data_path must be one of auto, device, dataloader; got 'gpu'"
    )
    assert _raised(lambda: resolve_data_path("device", lazy, torch.device("cpu")), DataError) == (
        "data_path='device' needs data decoded in memory (CIFAR, cifar10-mini, any same-size image folder "
        "under the decode limit) and pad-crop augmentation; this data has neither. Use data_path='auto' or "
        "'dataloader'"
    )
    loader = DeviceLoader(base, 4, ops=[], world_size=2, rank=1, seed=3)
    assert repr(loader) == (
        "DeviceLoader(10 images 3x4x4 on cpu, batch 4, rank 1/2, shuffle=True, drop_last=True)"
    )


def test_load_logs_say_what_was_decoded(tmp_path, caplog):
    from vitlens.data.catalog import load_image_folder

    root = _tree(tmp_path / "t", {"train/a/0.png": _png(size=4), "train/b/1.png": _png(size=6)})
    with caplog.at_level(logging.INFO, logger="vitlens.data.catalog"):
        load_image_folder(root, "train", cache_dir=False, max_decoded_bytes=1000)
    assert [r.getMessage() for r in caplog.records] == [
        "t-train: 2 images of differing sizes (or > 1000 bytes); decoding on access"
    ]
    caplog.clear()
    same = _tree(tmp_path / "same", {"train/a/0.png": _png(size=4), "train/b/1.png": _png(size=4)})
    with caplog.at_level(logging.INFO, logger="vitlens.data.catalog"):
        load_image_folder(same, "train", cache_dir=False)
    [rec] = caplog.records
    assert re.fullmatch(r"same-train: decoded 2 images in \d+\.\d s", rec.getMessage()), rec.getMessage()

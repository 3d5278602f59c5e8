"""Tests closing mutation-testing gaps in ``vitlens.data`` and ``vitlens.analysis`` (issue 15).

Each test pins a behaviour a one-line bug would change unnoticed by the rest of the suite: where
data is found and cached, what ``build_data`` records and hands its transforms, RandAugment's
per-image draw (both signs, reproducible from the generator alone), the messages users read, and
the defaults of the minibatch-CKA entry points (checked against a numpy reference).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from vitlens.analysis import ActivationCapture, MinibatchCKA, cka_matrix
from vitlens.data import build_data
from vitlens.data.catalog import build_dataset, default_data_dir
from vitlens.data.datasets import LazyImageDataset
from vitlens.data.decode import CorruptImageError, CorruptImageWarning
from vitlens.data.device_loader import batched_randaugment
from vitlens.data.sources import open_source
from vitlens.errors import MissingFileError


# ------------------------------------------------------------------------------------ helpers
def _write_tree(root, size=8, per_class=4, classes=("a", "b"), splits=("train", "test")):
    """An ImageFolder tree of distinct, same-size RGB PNGs."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def _ref_cka(x, y, kernel="linear", debiased=False, sigma_frac=1.0) -> float:
    """Kornblith et al.'s gram_linear / gram_rbf and HSIC (biased, or Song et al.'s unbiased)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def gram(z):
        g = z @ z.T
        if kernel == "linear":
            return g
        sq = np.diag(g)[:, None] + np.diag(g)[None, :] - 2 * g
        return np.exp(-sq / (2 * sigma_frac**2 * np.median(sq)))

    def hsic(k, l):  # noqa: E741
        n = k.shape[0]
        if not debiased:
            h = np.eye(n) - np.ones((n, n)) / n
            return np.trace(k @ h @ l @ h) / (n - 1) ** 2
        kt, lt = k.copy(), l.copy()
        np.fill_diagonal(kt, 0)
        np.fill_diagonal(lt, 0)
        one = np.ones(n)
        t1 = np.trace(kt @ lt)
        t2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        t3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
        return (t1 + t2 - t3) / (n * (n - 3))

    k, l = gram(x), gram(y)  # noqa: E741
    return float(hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l)))


# ------------------------------------------------------------------------------------ catalog
def test_default_data_dir_is_home_cache_or_the_env_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("VITLENS_DATA", raising=False)
    assert default_data_dir() == tmp_path / ".cache" / "vitlens" / "data"
    monkeypatch.setenv("VITLENS_DATA", "~/mydata")
    assert default_data_dir() == tmp_path / "mydata"  # ~ expanded


@pytest.mark.parametrize("point_at_binary_folder", [True, False])
def test_a_broken_torchvision_cifar_folder_is_reported_not_downloaded(tmp_path, point_at_binary_folder):
    """data_dir holding (or being) cifar-10-batches-py: torchvision is asked to load, never to download,
    and its 'not found or corrupted' becomes a MissingFileError naming the folder."""
    binary = tmp_path / "cifar-10-batches-py"
    binary.mkdir()
    data_dir = binary if point_at_binary_folder else tmp_path
    msg = r"cifar-10-batches-py are missing or corrupted.*download=True"
    with pytest.raises(MissingFileError, match=msg):
        build_dataset("cifar10", "train", data_dir)


def test_cifar_imagefolder_tree_is_cached_under_the_dataset_name(tmp_path):
    """An unpacked CIFAR ImageFolder tree in any folder: its decoded cache is labelled '<name>-<split>'."""
    root = _write_tree(tmp_path / "some_folder")
    cache = tmp_path / "cache"
    ds = build_dataset("cifar10", "train", root, cache_dir=cache)
    assert len(ds) == 8 and ds.classes == ["a", "b"]
    files = [p.name for p in (cache / "decoded").iterdir()]
    assert len(files) == 1 and files[0].startswith("cifar10-train-"), files


def test_missing_cifar_lists_every_place_it_looked(tmp_path):
    with pytest.raises(MissingFileError) as e:
        build_dataset("cifar100", "test", tmp_path)
    msg = str(e.value)
    assert "cifar100 (test split) not found" in msg
    looked = [line.strip() for line in msg.splitlines()]
    for r in (tmp_path, tmp_path / "cifar100"):
        assert f"{r / 'cifar-100-python'}/  (torchvision binary release)" in looked
        assert f"{r / 'cifar100-test.tar.gz'}  (JPEG tarball; also .tgz/.tar)" in looked
        assert f"{r / 'test'}/<class>/<image>  (ImageFolder)" in looked
    assert "download=True" in msg and "--data-dir" in msg


# ------------------------------------------------------------------------------------ build_data
def test_build_data_records_its_choices_and_scales_padding_to_the_source(tmp_path):
    root = _write_tree(tmp_path / "tree", size=8, per_class=4)
    train_ds, test_ds, info = build_data(
        "imagefolder", root, fraction=0.5, seed=3, img_size=16, cache_dir=tmp_path / "cache"
    )
    assert info.extra == {"fraction": 0.5, "seed": 3, "src_size": 8, "augment": True}
    assert (info.num_classes, info.img_size, info.train_size, info.test_size) == (2, 16, 4, 8)
    ops = {type(op).__name__: op for op in train_ds.transform.transforms}
    # known 8 px sources -> the "pad" recipe, resized to 16, with the 4 px padding scaled by 16/8
    assert "RandomResizedCrop" not in ops
    assert ops["Resize"].size == [16, 16]
    assert list(ops["RandomCrop"].padding) == [8, 8, 8, 8]
    assert train_ds[0][0].shape == test_ds[0][0].shape == (3, 16, 16)


# ------------------------------------------------------------------------------------ datasets
def test_lazy_dataset_skips_to_the_next_readable_image_and_names_the_bad_one(tmp_path):
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    (d / "0_bad.png").write_bytes(b"not an image")
    Image.fromarray(np.full((6, 5, 3), 7, np.uint8)).save(d / "1_good.png")
    Image.fromarray(np.full((6, 5, 3), 9, np.uint8)).save(d / "2_good.png")
    ds = LazyImageDataset(open_source(tmp_path, "train"), "warn")
    with pytest.warns(CorruptImageWarning, match=r"unreadable image .*0_bad\.png.*returning the next item"):
        img, label = ds[0]
    assert img.shape == (3, 6, 5) and int(img[0, 0, 0]) == 7 and label == 0
    with pytest.raises(CorruptImageError, match="0_bad.png"):
        LazyImageDataset(open_source(tmp_path, "train"), "error")[0]


def test_lazy_dataset_of_only_garbage_says_how_many_it_tried(tmp_path):
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    for i in range(3):
        (d / f"{i}.png").write_bytes(b"garbage")
    ds = LazyImageDataset(open_source(tmp_path, "train"), "warn")
    with pytest.warns(CorruptImageWarning), pytest.raises(
        CorruptImageError, match=r"1\.png: it and the 2 items after it are unreadable"
    ):
        ds[1]


# ------------------------------------------------------------------------------------ RandAugment
def test_batched_randaugment_depends_only_on_its_generator():
    op = v2.RandAugment(num_ops=2, magnitude=9)
    g0 = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (32, 3, 10, 10), dtype=torch.uint8, generator=g0)
    aug = batched_randaugment(op)
    torch.manual_seed(0)
    a = aug(imgs, torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global RNG must play no part
    b = aug(imgs, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(imgs, torch.Generator().manual_seed(6)))


def test_batched_randaugment_draws_both_signs_of_signed_ops():
    """Rotate/Shear/Translate/... take a random sign per image, as torchvision's RandAugment does."""
    op = v2.RandAugment(num_ops=1, magnitude=20)
    g0 = torch.Generator().manual_seed(3)
    imgs = torch.randint(0, 256, (200, 3, 12, 12), dtype=torch.uint8, generator=g0)
    out = batched_randaugment(op)(imgs, torch.Generator().manual_seed(0))
    m = float(op._AUGMENTATION_SPACE["Rotate"][0](op.num_magnitude_bins, 12, 12)[op.magnitude])
    signs = set()
    for i in range(len(imgs)):
        for sign in (-1, 1):
            ref = op._apply_image_or_video_transform(
                imgs[i], "Rotate", sign * m, interpolation=op.interpolation, fill=op._fill
            )
            other = op._apply_image_or_video_transform(
                imgs[i], "Rotate", -sign * m, interpolation=op.interpolation, fill=op._fill
            )
            if torch.equal(ref, out[i]) and not torch.equal(other, out[i]):
                signs.add(sign)
    assert signs == {-1, 1}


# ------------------------------------------------------------------------------------ capture
def test_shared_module_warning_names_the_module_and_the_fix():
    relu = nn.ReLU()
    lin = nn.Linear(3, 3)
    shared = nn.Sequential(relu, lin, relu)
    x = torch.randn(2, 3)
    with ActivationCapture(shared, ["0"]) as cap:
        with pytest.warns(
            UserWarning,
            match=r"module '0' ran 2 times in one forward pass .*keeping its last output\. "
            r"Hook a module that runs once \(e\.g\. the enclosing block\)",
        ):
            out = cap.run(x)
    with torch.no_grad():
        assert torch.equal(out["0"], torch.relu(lin(torch.relu(x))))  # the last call's output


# ------------------------------------------------------------------------------------ CKA defaults
class _TwoLayer(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 5)
        self.double()

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))

    def feats(self, x):
        with torch.no_grad():
            h = self.fc1(x.flatten(1))
            return h, self.fc2(torch.tanh(h))


def test_cka_matrix_and_minibatch_cka_default_to_debiased_hsic_and_median_bandwidth():
    a, b = _TwoLayer(0), _TwoLayer(1)
    x = torch.randn(11, 3, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m, _, _ = cka_matrix(
        a, b, [x], layers_a=["fc1", "fc2"], layers_b=["fc2"], kernel="rbf", gram_dtype=torch.float64,
        progress=False,
    )  # fmt: skip
    fa, fb = a.feats(x), b.feats(x)
    for i in range(2):
        assert m[i, 0] == pytest.approx(_ref_cka(fa[i], fb[1], "rbf", True, 1.0), abs=1e-9)
    acc = MinibatchCKA(1, 1, kernel="rbf")
    acc.update([fa[0]], [fb[1]])
    assert acc.compute()[0, 0] == pytest.approx(_ref_cka(fa[0], fb[1], "rbf", True, 1.0), abs=1e-9)
    lin = MinibatchCKA(1, 1)  # linear by default
    lin.update([fa[0]], [fb[1]])
    assert lin.compute()[0, 0] == pytest.approx(_ref_cka(fa[0], fb[1], "linear", True), abs=1e-9)


# ------------------------------------------------------------------------------------ messages
# A user mistake must come back as the project's error type with a message naming the problem and
# the fix; each case pins both key parts, so a dropped or mangled message part is caught.
def _data_errors(tmp_path):
    from vitlens.data.datasets import TensorImageDataset, dataset_targets
    from vitlens.data.decode import check_on_corrupt
    from vitlens.data.mixing import build_batch_mixer
    from vitlens.data.preprocess import ToPILRGB, check_preprocess
    from vitlens.data.transforms import build_transforms, parse_randaugment
    from vitlens.errors import ConfigError, DataError

    ok_pre = {"resize": 8, "crop": 8, "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3}
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "holder" / "other").mkdir(parents=True)
    (tmp_path / "loose" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "loose" / "train" / "x.png")
    (tmp_path / "bad.tar").write_bytes(b"\x00" * 10 + b"definitely not a tar archive" * 40)
    return [
        (lambda: build_transforms(False, img_size=0), ConfigError,
         r"img_size must be a positive number of pixels, got 0"),
        (lambda: build_transforms(True, img_size=8, random_erasing=1.5), ConfigError,
         r"random_erasing is a probability in \[0, 1\], got 1\.5"),
        (lambda: parse_randaugment("rand-m9-n0"), ConfigError,
         r"'rand-m9-n0': need num_ops >= 1 and 0 <= magnitude <= 30"),
        (lambda: parse_randaugment("rand-q9"), ConfigError,
         r"'q9' is not supported \(torchvision's RandAugment takes only m<magnitude> and n<num_ops>\); "
         r"write it like 'rand-m9-n2'"),
        (lambda: parse_randaugment("augmix"), ConfigError,
         r"'augmix' is not understood; write it like 'rand-m9-n2' \(magnitude 9, 2 ops\)"),
        (lambda: parse_randaugment(3.5), ConfigError,
         r"randaugment=3\.5: give a string like 'rand-m9-n2' or \(num_ops, magnitude\)"),
        (lambda: build_batch_mixer(10, mixup_alpha=-1.0), ConfigError,
         r"mixup_alpha and cutmix_alpha must be >= 0 \(0 disables\), got -1\.0, 0\.0"),
        (lambda: build_batch_mixer(10, mixup_alpha=0.2, prob=1.5), ConfigError,
         r"prob is the chance a batch gets mixed, in \[0, 1\]; got 1\.5"),
        (lambda: build_batch_mixer(3, mixup_alpha=0.2)(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3)),
         ValueError,
         r"labels must be a \(B,\) tensor of class indices, got shape \(2, 3\)"),
        (lambda: TensorImageDataset(torch.zeros(2, 3, 4, 4), [0, 1], ["a", "b"]), ValueError,
         r"images must be a uint8 \(N, C, H, W\) tensor, got"),
        (lambda: dataset_targets(torch.nn.Linear(1, 1)), TypeError,
         r"Linear has no \.targets \(one int label per item\)"),
        (lambda: check_on_corrupt("ignore"), ConfigError,
         r"on_corrupt='ignore' is not supported; use one of .*warn"),
        (lambda: check_preprocess({"resize": 8}), ConfigError,
         r"a preprocessing description needs resize, crop, interpolation, mean, std; missing crop, "
         r"interpolation, mean, std"),
        (lambda: check_preprocess({**ok_pre, "resize_mode": "fit"}), ConfigError,
         r"preprocess resize_mode 'fit' is not one of shorter, squash"),
        (lambda: check_preprocess({**ok_pre, "interpolation": "cubic-ish"}), ConfigError,
         r"preprocess interpolation 'cubic-ish' is not one of .*bicubic"),
        (lambda: ToPILRGB()(np.zeros((3, 4, 4), np.uint8)), TypeError,
         r"expected a PIL image or a uint8 \(3, H, W\) tensor, got ndarray"),
        (lambda: open_source(tmp_path / "nowhere", "train"), MissingFileError,
         r"image folder .*nowhere does not exist; expected the ImageFolder layout .*Pass the folder that "
         r"holds train/ and test/ \(--data-dir\)"),
        (lambda: open_source(tmp_path / "file.txt", "train"), DataError,
         r"file\.txt is not a directory or a \.tar/\.tar\.gz archive; expected the ImageFolder layout"),
        (lambda: open_source(tmp_path / "holder", "train"), MissingFileError,
         r"no 'train/' folder in .*holder \(it holds folders: other\); expected the ImageFolder layout"),
        (lambda: open_source(tmp_path / "loose", "train"), DataError,
         r"train is empty for training: its 1 images are not inside class folders; expected the ImageFolder"),
        (lambda: open_source(tmp_path / "bad.tar", "train"), DataError,
         r"could not read the archive .*bad\.tar .*it looks damaged or is not a tar file\. Re-download or "
         r"re-create it, or pass an unpacked folder instead"),
    ]


def test_data_user_errors_name_the_problem_and_the_fix(tmp_path):
    for call, err, msg in _data_errors(tmp_path):
        with pytest.raises(err, match=msg):
            call()


def test_train_and_test_splits_with_different_classes_are_refused(tmp_path):
    from vitlens.errors import DataError

    root = _write_tree(tmp_path / "tree", classes=("a", "b"), splits=("train",), per_class=1)
    _write_tree(root, classes=("a", "c"), splits=("test",), per_class=1)
    with pytest.raises(
        DataError,
        match=r"the train and test splits of imagefolder have different classes \(only in train: \['b'\]; "
        r"only in test: \['c'\]\), so their labels would not match; give both splits the same class folders",
    ):
        build_data("imagefolder", root, cache_dir=False)


def _analysis_errors():
    from vitlens.analysis import batch_images, cka, default_layers, feature_gram, reduce_activation
    from vitlens.analysis.distributed import RankBatches
    from vitlens.analysis.plots import plot_attention_distance, plot_probe_accuracy
    from vitlens.errors import ConfigError, DataError, ModelError

    seq = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    x4 = torch.randn(4, 3)

    class _ReturnsNone(nn.Module):
        def forward(self, x):
            return None

    holder = nn.Sequential(_ReturnsNone())

    def capture(model, layers, data):
        with ActivationCapture(model, layers) as cap:
            return cap.run(data)

    def nested():
        cap = ActivationCapture(seq, ["0"])
        with cap, cap:
            pass

    return [
        (lambda: reduce_activation(torch.zeros(2, 3), lambda t: t[0]), ValueError,
         r"token policy callable must return \(B, features\), got shape \(3,\)"),
        (lambda: reduce_activation(torch.zeros(2, 3), "first"), ConfigError,
         r"unknown token policy 'first'; choose one of .* or pass a callable"),
        (lambda: reduce_activation(torch.zeros(2, 3, 4, 4), "cls"), ConfigError,
         r"token_policy='cls' does not apply to the feature map of shape \(2, 3, 4, 4\); use 'mean' "
         r"\(spatial average\) or 'flatten' for CNN layers "
         r"\(cka_matrix accepts a \(policy_a, policy_b\) pair\)"),
        (lambda: reduce_activation(torch.zeros(2, 3, 4, 4, 5)), ValueError,
         r"cannot reduce an activation of shape \(2, 3, 4, 4, 5\): expected \(B, D\), \(B, N, D\) or "
         r"\(B, C, H, W\); pass a callable token_policy for other layouts"),
        (lambda: reduce_activation(torch.zeros(2, 1, 4), "mean", 1), ValueError,
         r"token_policy='mean' needs patch tokens after the 1 prefix tokens, but the sequence has shape"),
        (lambda: default_layers(nn.Linear(2, 2)), ModelError,
         r"cannot guess which layers of Linear to analyse \(no ViT `blocks`, ResNet `layer1..` or Hugging "
         r"Face encoder layers\); pass layers=\[...\] explicitly"),
        (lambda: ActivationCapture(seq, []), ConfigError,
         r"layers is empty; pass at least one module name \(or None for default_layers\(model\)\)"),
        (lambda: ActivationCapture(seq, ["0", "1", "0"]), ConfigError,
         r"duplicate layer names \['0'\]; list each module once"),
        (lambda: ActivationCapture(seq, ["00"]), ConfigError,
         r"Sequential has no module named '00' \(did you mean .*\)\. "
         r"Layer names are model\.named_modules\(\) "
         r"names; vitlens\.analysis\.default_layers\(model\) gives a sensible list"),
        (lambda: capture(holder, ["0"], x4), TypeError,
         r"cannot capture a module output of type NoneType; hook a module returning a tensor"),
        (nested, RuntimeError, r"ActivationCapture is already active; do not nest the same instance"),
        (lambda: feature_gram(torch.zeros(3)), ValueError,
         r"feature_gram expects \(n, features\), got shape \(3,\); flatten it first"),
        (lambda: cka(torch.zeros(1, 2), torch.zeros(1, 2)), DataError,
         r"HSIC/CKA needs at least 2 examples, got n=1"),
        (lambda: cka(torch.randn(3, 2), torch.randn(3, 2), debiased=True), DataError,
         r"debiased HSIC/CKA needs at least 4 examples \(it divides by n-3\), got n=3"),
        (lambda: cka(torch.randn(4, 2), torch.randn(5, 2)), ValueError,
         r"cka: x and y must describe the same examples, got 4 and 5 rows; "
         r"pass activations of the same inputs"),
        (lambda: MinibatchCKA(0), ValueError, r"need at least one layer per model, got 0 and None"),
        (lambda: MinibatchCKA(2).compute(), RuntimeError,
         r"MinibatchCKA: no batch of >= 4 examples was added; feed data with update\(\)"),
        (lambda: cka_matrix(seq, None, None), TypeError,
         r"cka_matrix needs data: cka_matrix\(model_a, model_b, data\) or cka_matrix\(model, data=\.\.\.\)"),
        (lambda: cka_matrix(seq, [x4], layers_a=["0"], token_policy=("mean",), progress=False), ValueError,
         r"token_policy tuple must be \(policy_a, policy_b\), got \('mean',\)"),
        (lambda: batch_images("abc"), TypeError,
         r"cannot find images in a batch of type str; data must yield image tensors, \(images, labels\) "
         r"tuples or dicts with one of the keys"),
        (lambda: RankBatches([x4], max_batches=0), ValueError, r"max_batches must be >= 1 or None, got 0"),
        (lambda: RankBatches([x4], max_images=0), ValueError, r"max_images must be >= 1 or None, got 0"),
        (lambda: plot_probe_accuracy({}, "never.png"), ValueError,
         r"plot_probe_accuracy needs at least one run"),
        (lambda: plot_attention_distance({}, "never.png"), ValueError,
         r"plot_attention_distance needs at least one run"),
    ]


def test_analysis_user_errors_name_the_problem_and_the_fix():
    for call, err, msg in _analysis_errors():
        with pytest.raises(err, match=msg):
            call()


def test_cka_of_a_constant_representation_is_nan_with_a_warning():
    from vitlens.analysis import cka

    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    with pytest.warns(
        UserWarning,
        match=r"cka: a representation is constant across examples \(HSIC\(K, K\) = 0\); CKA is undefined",
    ):
        assert np.isnan(cka(x, torch.ones(6, 2)))
    acc = MinibatchCKA(1, 1)
    acc.update([x], [torch.ones(6, 2)])
    msg = r"MinibatchCKA: some layers are constant over the data \(HSIC = 0\)"
    with pytest.warns(UserWarning, match=msg):
        assert np.isnan(acc.compute()[0, 0])


# ------------------------------------------------------------------------------------ decode / sources
def _encoded(arr: np.ndarray, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_bytes_gives_rgb_for_grey_rgba_and_pillow_only_formats():
    from vitlens.data.decode import decode_bytes

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = decode_bytes(_encoded(grey, "PNG"), "g.png")
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 4)
    for c in range(3):
        assert torch.equal(out[c], torch.from_numpy(grey))
    rgba = np.random.default_rng(0).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    want = torch.from_numpy(rgba[..., :3]).permute(2, 0, 1)
    assert torch.equal(decode_bytes(_encoded(rgba, "PNG"), "a.png"), want)
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    for fmt in ("BMP", "TIFF", "PPM"):  # Pillow's path: lossless, so exact pixels
        want = torch.from_numpy(rgb).permute(2, 0, 1)
        assert torch.equal(decode_bytes(_encoded(rgb, fmt), f"x.{fmt}"), want)


def test_decode_bytes_names_the_file_and_why_it_failed():
    from vitlens.data.decode import decode_bytes

    msg = r"cannot decode image e\.png: not a recognizable image file \(empty\)\."
    with pytest.raises(CorruptImageError, match=msg):
        decode_bytes(b"", "e.png")
    with pytest.raises(CorruptImageError) as e:
        decode_bytes(b"hello world" * 10, "junk.jpg")
    assert (e.value.name, e.value.reason) == ("junk.jpg", "not a recognizable image file")
    assert "on_corrupt='warn'" in str(e.value) and "Delete or replace the file" in str(e.value)
    png = _encoded(np.zeros((40, 40, 3), np.uint8) + 100, "PNG")
    with pytest.raises(CorruptImageError, match=r"cannot decode image t\.png: \w+Error: "):
        decode_bytes(png[: len(png) // 2], "t.png")  # truncated: Pillow's own error, named


def test_decode_all_stacks_same_size_images_skips_bad_ones_and_gives_up_on_mixed_sizes():
    from vitlens.data.decode import decode_all

    rng = np.random.default_rng(0)
    arrs = [rng.integers(0, 256, (4, 5, 3), dtype=np.uint8) for _ in range(3)]
    blobs = [_encoded(arrs[0], "PNG"), b"bad", _encoded(arrs[1], "PNG"), _encoded(arrs[2], "PNG")]
    names = ["a.png", "b.png", "c.png", "d.png"]
    msg = r"skipping unreadable image b\.png: not a recognizable image file"
    with pytest.warns(CorruptImageWarning, match=msg):
        images, skipped = decode_all(4, blobs.__getitem__, names.__getitem__, "warn", 10**6)
    assert skipped == [1] and images.shape == (3, 3, 4, 5)
    for k in range(3):
        assert torch.equal(images[k], torch.from_numpy(arrs[k]).permute(2, 0, 1))
    with pytest.raises(CorruptImageError, match="b.png"):
        decode_all(4, blobs.__getitem__, names.__getitem__, "error", 10**6)
    # a total above max_bytes (4 images of 60 bytes > 239), or a second size: decode on access instead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        assert decode_all(4, blobs.__getitem__, names.__getitem__, "warn", 239)[0] is None
        assert decode_all(4, blobs.__getitem__, names.__getitem__, "warn", 240)[0] is not None
    mixed = [blobs[0], _encoded(np.zeros((4, 6, 3), np.uint8), "PNG")]
    assert decode_all(2, mixed.__getitem__, names.__getitem__, "warn", 10**6) == (None, [])
    with pytest.warns(CorruptImageWarning):
        empty, skipped = decode_all(2, [b"", b"x"].__getitem__, names.__getitem__, "warn", 10**6)
    assert empty.shape == (0, 3, 0, 0) and skipped == [0, 1]


def test_split_folders_image_names_and_archives(tmp_path):
    from vitlens.data.sources import is_archive, is_image_file, split_dirs
    from vitlens.errors import ConfigError

    assert split_dirs("train") == ("train",)
    assert split_dirs("test") == ("test", "val") and split_dirs("val") == ("val", "test")
    with pytest.raises(ConfigError, match=r"unknown split 'dev'; use one of \['test', 'train', 'val'\]"):
        split_dirs("dev")
    for ok in ("a.JPG", "b.jpeg", "c.png", "d.webp", "e.gif", "f.TIFF", "g.bmp", "h.ppm", "i.pgm", "j.tif"):
        assert is_image_file(ok), ok
    for no in ("a.txt", "png", "b.png.txt", "c.svg"):
        assert not is_image_file(no), no
    for ok in ("a.tar", "b.TAR.GZ", "c.tgz", "d.tar.bz2", "e.tar.xz"):
        (tmp_path / ok).write_bytes(b"")
        assert is_archive(tmp_path / ok), ok
    (tmp_path / "f.zip").write_bytes(b"")
    (tmp_path / "dir.tar").mkdir()
    assert not is_archive(tmp_path / "f.zip") and not is_archive(tmp_path / "dir.tar")
    assert not is_archive(tmp_path / "missing.tar")


def test_a_val_folder_serves_as_the_test_split(tmp_path):
    root = _write_tree(tmp_path / "t", splits=("train", "val"), per_class=1)
    src = open_source(root, "test")
    assert src.location == str(root / "val") and src.classes == ["a", "b"] and src.targets == [0, 1]


# ------------------------------------------------------------------------------ load_image_folder + cache
def test_cached_load_obeys_on_corrupt_for_files_skipped_when_it_was_built(tmp_path):
    from vitlens.data.catalog import load_image_folder
    from vitlens.data.datasets import TensorImageDataset

    root = _write_tree(tmp_path / "t", splits=("train",), per_class=2)
    (root / "train" / "a" / "zz_bad.png").write_bytes(b"broken")
    cache = tmp_path / "cache"
    with pytest.warns(CorruptImageWarning, match="zz_bad.png"):
        first = load_image_folder(root, "train", cache_dir=cache, label="mine")
    assert isinstance(first, TensorImageDataset) and len(first) == 4 and first.targets == [0, 0, 1, 1]
    (cached,) = (cache / "decoded").iterdir()
    assert cached.name.startswith("mine-train-")
    msg = r"skipping unreadable image .*zz_bad\.png \(found when the cache was built\)"
    with pytest.warns(CorruptImageWarning, match=msg):
        again = load_image_folder(root, "train", cache_dir=cache, label="mine")
    assert torch.equal(again.images, first.images) and again.targets == first.targets
    msg = r"zz_bad\.png: found unreadable when the decoded cache was built"
    with pytest.raises(CorruptImageError, match=msg):
        load_image_folder(root, "train", cache_dir=cache, label="mine", on_corrupt="error")


def test_load_image_folder_without_cache_mixed_sizes_and_all_broken(tmp_path):
    from vitlens.data.catalog import load_image_folder
    from vitlens.errors import DataError

    root = _write_tree(tmp_path / "t", splits=("train",), per_class=1)
    ds = load_image_folder(root, "train", cache_dir=False)
    assert len(ds) == 2 and not list(tmp_path.rglob("*.safetensors"))
    Image.fromarray(np.zeros((5, 9, 3), np.uint8)).save(root / "train" / "b" / "wide.png")
    lazy = load_image_folder(root, "train", cache_dir=False)
    assert isinstance(lazy, LazyImageDataset) and len(lazy) == 3 and lazy[2][0].shape == (3, 5, 9)
    bad = tmp_path / "bad" / "train" / "a"
    bad.mkdir(parents=True)
    for i in range(2):
        (bad / f"{i}.png").write_bytes(b"x")
    with pytest.warns(CorruptImageWarning), pytest.raises(
        DataError, match=r"none of the 2 image files in .*train could be decoded; check the files"
    ):
        load_image_folder(tmp_path / "bad", "train", cache_dir=False)


def test_unwritable_cache_warns_and_carries_on(tmp_path):
    from vitlens.data import cache

    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache folder should be: mkdir fails
    path = blocker / "decoded" / "x.safetensors"
    split = cache.DecodedSplit(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), [0], ["a"], "src", [])
    with pytest.warns(
        UserWarning,
        match=r"could not write the decoded-image cache .*; continuing without it, so the next run decodes "
        r"again\. Point cache_dir / \$VITLENS_CACHE at a writable folder to fix this",
    ):
        cache.save_decoded(path, split)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    with pytest.warns(UserWarning, match=r"ignoring unreadable decoded cache .*bad\.safetensors \(\w+"):
        assert cache.load_decoded(bad) is None


# ------------------------------------------------------------------------------------ DeviceLoader
def _resident(n=10, size=4):
    from vitlens.data.datasets import TensorImageDataset

    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return TensorImageDataset(images, [i % 3 for i in range(n)], ["a", "b", "c"])


def test_device_loader_holds_nested_subsets_and_pairs_images_with_labels():
    from torch.utils.data import Subset

    from vitlens.data.datasets import TransformedDataset
    from vitlens.data.device_loader import DeviceLoader

    base = _resident(10)
    inner = Subset(base, [9, 7, 5, 3, 1, 0])
    outer = Subset(inner, [4, 0, 2])  # -> base items 1, 9, 5
    loader = DeviceLoader(TransformedDataset(outer, None), 2, shuffle=False, ops=[])
    assert len(loader.images) == 3  # only the subset is held
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images[:, 0, 0, 0].tolist() == [1, 9, 5] and labels.tolist() == [1 % 3, 9 % 3, 5 % 3]
    assert [len(b[0]) for b in batches] == [2, 1]  # evaluation never drops a batch
    assert len(loader) == 2


def test_device_loader_length_and_repr_follow_drop_last():
    from vitlens.data.datasets import TransformedDataset
    from vitlens.data.device_loader import DeviceLoader

    ds = TransformedDataset(_resident(9), None)
    train = DeviceLoader(ds, 4, ops=[])  # 9 = 4 + 4 + 1: the batch of one is dropped
    assert train.drop_last and len(train) == 2 and len(list(train)) == 2
    keep = DeviceLoader(ds, 3, ops=[])
    assert not keep.drop_last and len(keep) == 3
    ev = DeviceLoader(ds, 4, shuffle=False, ops=[])
    assert not ev.drop_last and len(ev) == 3 and len(list(ev)) == 3
    forced = DeviceLoader(ds, 4, shuffle=False, drop_last=True, ops=[])
    assert len(forced) == 2 and [len(b) for b in forced.batch_indices()] == [4, 4]
    assert repr(forced) == (
        "DeviceLoader(9 images 3x4x4 on cpu, batch 4, rank 0/1, shuffle=False, drop_last=True)"
    )


def test_device_loader_refuses_data_it_cannot_hold_or_augment(tmp_path):
    from vitlens.data.datasets import TransformedDataset
    from vitlens.data.device_loader import DeviceLoader, fits_on_device, resolve_data_path
    from vitlens.errors import DataError

    root = _write_tree(tmp_path / "t", splits=("train",), per_class=1)
    lazy = TransformedDataset(LazyImageDataset(open_source(root, "train"), "warn"), None)
    with pytest.raises(
        DataError,
        match=r"TransformedDataset is not decoded in memory, so it cannot live on the device; "
        r"use data_path='dataloader' \(or 'auto', which picks it\)",
    ):
        DeviceLoader(lazy, 2)
    assert not fits_on_device(lazy, torch.device("cpu"))
    assert fits_on_device(TransformedDataset(_resident(), None), torch.device("cpu"))
    rrc = TransformedDataset(_resident(), v2.Compose([v2.RandomResizedCrop(4)]))
    with pytest.raises(
        DataError,
        match=r"the transform .*RandomResizedCrop.* has an op with no batched version \(e\.g\. "
        r"RandomResizedCrop\); use data_path='dataloader' \(or 'auto', which picks it\)",
    ):
        DeviceLoader(rrc, 2)
    with pytest.raises(
        DataError,
        match=r"data_path='device' needs data decoded in memory \(CIFAR, cifar10-mini, any same-size image "
        r"folder under the decode limit\) and pad-crop augmentation; this data has neither\. Use "
        r"data_path='auto' or 'dataloader'",
    ):
        resolve_data_path("device", lazy, torch.device("cpu"))
    assert resolve_data_path("auto", lazy, torch.device("cpu")) == "dataloader"


# ------------------------------------------------------------------------------------ probes
class _Tokens(nn.Module):
    num_prefix_tokens = 0

    def __init__(self):
        super().__init__()
        self.tokens = nn.Identity()

    def forward(self, x):
        return self.tokens(x[:, None, :].expand(-1, 2, -1))


def test_probes_on_empty_data_say_which_split_is_empty():
    from vitlens.analysis import localization_probes
    from vitlens.errors import DataError

    batch = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(DataError, match=r"^no images to fit probes on; the data iterable is empty$"):
        localization_probes(_Tokens(), [], batch, ["tokens"])
    with pytest.raises(
        DataError, match=r"^no test images to score the probes on; the test data iterable is empty$"
    ):
        localization_probes(_Tokens(), batch, [], ["tokens"])


def test_build_data_passes_every_augmentation_option_to_the_train_transform(tmp_path):
    root = _write_tree(tmp_path / "tree", size=8, per_class=2)
    kw = dict(cache_dir=tmp_path / "cache", img_size=8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    train_ds, test_ds, info = build_data(
        "imagefolder", root, crop_padding=2, hflip=False, randaugment="rand-m5-n3", random_erasing=0.3, **kw
    )
    ops = {type(op).__name__: op for op in train_ds.transform.transforms}
    assert list(ops["RandomCrop"].padding) == [2, 2, 2, 2] and "RandomHorizontalFlip" not in ops
    assert (ops["RandAugment"].num_ops, ops["RandAugment"].magnitude) == (3, 5)
    assert ops["RandomErasing"].p == 0.3
    assert ops["Normalize"].mean == [0.1, 0.2, 0.3] and ops["Normalize"].std == [0.5, 0.6, 0.7]
    assert (info.mean, info.std) == ((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    test_ops = [type(op).__name__ for op in test_ds.transform.transforms]
    assert test_ops == ["ToDtype", "Normalize"]  # native size: no resize, no augmentation
    plain, _, info2 = build_data("imagefolder", root, augment=False, crop="rrc", **kw)
    assert [type(op).__name__ for op in plain.transform.transforms] == test_ops
    assert info2.extra["augment"] is False
    rrc, _, _ = build_data("imagefolder", root, crop="rrc", **kw)
    assert "RandomResizedCrop" in {type(op).__name__ for op in rrc.transform.transforms}
    flip, _, _ = build_data("imagefolder", root, **kw)
    assert "RandomHorizontalFlip" in {type(op).__name__ for op in flip.transform.transforms}

"""The device data path of ``vitlens.data`` against hand-computed expectations (issue 15, round 2).

The GPU memory rule, the batched augmentations' defaults, shapes and device handling (run under a
``meta`` default device: a user who set a default device and passes CPU tensors must get CPU
results), the sampler order and seeds, and ``DeviceLoader``'s batches, compared with
torchvision's ops and ``DistributedSampler``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset
from torchvision.transforms import v2


# ------------------------------------------------------------------------------------ GPU memory rule
def test_fits_on_device_compares_the_subset_bytes_with_a_quarter_of_free_memory(monkeypatch):
    from vitlens.data.datasets import TensorImageDataset, TransformedDataset
    from vitlens.data.device_loader import fits_on_device

    base = TensorImageDataset(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), [0] * 10, ["a"])
    free = {"bytes": 0}
    seen = []

    def mem_get_info(device):
        seen.append(device)
        return free["bytes"], 10**12

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    cuda = torch.device("cuda", 1)
    full = TransformedDataset(base, None)
    need = 10 * 3 * 4 * 4  # bytes of the resident uint8 images
    for free_bytes, want in [(4 * need, True), (4 * need - 1, False), (0, False)]:
        free["bytes"] = free_bytes
        assert fits_on_device(full, cuda) is want
    assert seen[0] == cuda
    half = TransformedDataset(Subset(base, [0, 2, 4, 6, 8]), None)  # only the subset is copied
    free["bytes"] = 4 * (need // 2)
    assert fits_on_device(half, cuda) is True
    free["bytes"] -= 1
    assert fits_on_device(half, cuda) is False
    # auto picks the device path only when it fits
    from vitlens.data.device_loader import resolve_data_path

    free["bytes"] = 4 * need
    assert resolve_data_path("auto", full, cuda) == "device"
    assert resolve_data_path("auto", full, cuda, num_workers=2) == "dataloader"
    free["bytes"] = 10
    assert resolve_data_path("auto", full, cuda) == "dataloader"
    assert resolve_data_path("dataloader", full, cuda) == "dataloader"
    assert resolve_data_path("device", full, cuda) == "device"  # asked for explicitly: not checked


# ------------------------------------------------------------------------------------ batched ops
def test_batched_ops_keep_cpu_inputs_on_the_cpu_under_another_default_device():
    """A user with ``torch.set_default_device(...)`` passing CPU tensors: every index and random draw
    must be made on the input's device, giving the same CPU result as without the default device."""
    from vitlens.data.device_loader import normalize, random_crop, random_erasing, random_hflip

    x = torch.rand(6, 3, 8, 8)
    ops = [
        lambda g: random_erasing(x, g, p=0.7),
        lambda g: random_hflip(x, g),
        lambda g: random_crop(x, g, size=(6, 6), padding=(1, 2, 3, 0)),
        lambda g: normalize([0.5, 0.4, 0.3], [0.2, 0.3, 0.4])(x, g),
    ]
    for op in ops:
        want = op(torch.Generator().manual_seed(3))
        with torch.device("meta"):
            got = op(torch.Generator().manual_seed(3))
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_random_erasing_defaults_match_torchvision():
    """Defaults as v2.RandomErasing's: value 0, scale (0.02, 0.33), ratio (0.3, 3.3)."""
    from vitlens.data.device_loader import random_erasing

    ref = v2.RandomErasing()
    assert (ref.value, tuple(ref.scale), tuple(ref.ratio)) == ([0.0], (0.02, 0.33), (0.3, 3.3))
    x = torch.full((400, 1, 20, 20), 5.0)
    out = random_erasing(x, torch.Generator().manual_seed(0), p=1.0)
    erased = out == 0.0
    assert set(out.unique().tolist()) == {0.0, 5.0}  # erased to 0, the rest untouched
    frac = erased.flatten(1).float().mean(1)
    assert (frac > 0).float().mean() > 0.95  # nearly every image erased (a few may draw no fitting box)
    # each box's area share lies in the scale range (up to rounding of its sides)
    assert frac[frac > 0].min() >= 0.02 * 0.5 and frac.max() <= 0.33 * 1.3
    assert 0.14 < frac[frac > 0].mean() < 0.21  # uniform area share in [0.02, 0.33]: mean ~0.175


def test_random_erasing_boxes_are_rectangles_with_aspect_in_the_range():
    from vitlens.data.device_loader import random_erasing

    x = torch.ones(300, 1, 32, 32)
    out = random_erasing(x, torch.Generator().manual_seed(1), p=1.0, scale=(0.1, 0.2), ratio=(0.5, 2.0))
    aspects = []
    for img in out[:, 0]:
        ys, xs = (img == 0).nonzero(as_tuple=True)
        if len(ys) == 0:
            continue
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert h * w == len(ys)  # a filled rectangle
        assert 0.1 * 1024 * 0.8 <= h * w <= 0.2 * 1024 * 1.2
        aspects.append(h / w)
    aspects = torch.tensor(aspects)
    assert aspects.min() >= 0.5 * 0.75 and aspects.max() <= 2.0 / 0.75
    # log-uniform aspect in [0.5, 2]: tall and wide boxes equally often
    assert abs(float((aspects > 1).float().mean()) - float((aspects < 1).float().mean())) < 0.15
    # boxes anywhere: the union of boxes reaches every border
    covered = (out[:, 0] == 0).any(0)
    assert covered[0].any() and covered[-1].any() and covered[:, 0].any() and covered[:, -1].any()


def test_random_erasing_probability_p():
    from vitlens.data.device_loader import random_erasing

    x = torch.ones(1000, 1, 8, 8)
    out = random_erasing(x, torch.Generator().manual_seed(2), p=0.3)
    share = (out == 0).flatten(1).any(1).float().mean().item()
    assert share == pytest.approx(0.3, abs=0.05)
    assert torch.equal(random_erasing(x, torch.Generator().manual_seed(2), p=0.0), x)


def test_random_hflip_default_is_half():
    from vitlens.data.device_loader import random_hflip

    x = torch.arange(4.0).view(1, 1, 1, 4).expand(4000, 1, 1, 4).contiguous()
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 3).float().mean().item()
    assert flipped == pytest.approx(0.5, abs=0.03)
    assert torch.equal(out[out[:, 0, 0, 0] == 3], x[:1].flip(-1).expand_as(out[out[:, 0, 0, 0] == 3]))


# ------------------------------------------------------------------------------------ seeds
def test_augment_seed_gives_each_seed_epoch_rank_its_own_stream():
    from vitlens.data.device_loader import augment_seed

    grid = [(s, e, r) for s in range(4) for e in range(30) for r in range(8)]
    seeds = [augment_seed(*k) for k in grid]
    assert all(isinstance(v, int) and 0 <= v < 2**63 - 1 for v in seeds)
    assert len(set(seeds)) == len(grid)
    # never the order generator's seed (seed + epoch), so augmentation and order never share draws
    assert all(augment_seed(s, e, 0) != s + e for s in range(4) for e in range(30))
    big = augment_seed(2**62, 3, 1)
    assert 0 <= big < 2**63 - 1  # folded into manual_seed's range


def test_set_epoch_reseeds_the_augmentation_generator(tmp_path):
    from vitlens.data.datasets import TensorImageDataset
    from vitlens.data.device_loader import DeviceLoader, augment_seed

    ds = TensorImageDataset(torch.zeros(6, 3, 2, 2, dtype=torch.uint8), [0] * 6, ["a"])
    loader = DeviceLoader(ds, 2, ops=[], seed=5, rank=0)
    loader.set_epoch(3)
    assert loader.epoch == 3
    want = torch.Generator().manual_seed(augment_seed(5, 3, 0))
    assert torch.equal(torch.rand(5, generator=loader.generator), torch.rand(5, generator=want))


# ------------------------------------------------------------------------------------ DeviceLoader
def _coded(n):
    from vitlens.data.datasets import TensorImageDataset

    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 2, 2).contiguous()
    return TensorImageDataset(images, [i % 5 for i in range(n)], [str(c) for c in range(5)])


def test_device_loader_batches_follow_the_sampler_order_and_apply_ops_in_order():
    from vitlens.data.device_loader import DeviceLoader, epoch_order

    log = []

    def first(x, g):
        log.append(("first", g))
        return x.float() * 2

    def second(x, g):
        log.append(("second", g))
        return x + 1

    loader = DeviceLoader(_coded(13), 4, seed=7, world_size=2, rank=1, ops=[first, second])
    assert (loader.batch_size, loader.seed, loader.world_size, loader.rank) == (4, 7, 2, 1)
    order = epoch_order(13, seed=7, epoch=0, world_size=2, rank=1)  # 7 indices: 4 + 3, nothing dropped
    assert not loader.drop_last and len(loader) == 2
    batches = list(loader)
    got = torch.cat([x[:, 0, 0, 0] for x, _ in batches])
    assert got.tolist() == (order.float() * 2 + 1).tolist()
    assert torch.cat([y for _, y in batches]).tolist() == (order % 5).tolist()
    assert [name for name, _ in log] == ["first", "second"] * 2
    assert all(g is loader.generator for _, g in log)
    assert [b.tolist() for b in loader.batch_indices(epoch=2)] == [
        t.tolist() for t in epoch_order(13, seed=7, epoch=2, world_size=2, rank=1).split(4)
    ]
    loader.set_epoch(2)
    assert (
        torch.cat([y for _, y in loader]).tolist()
        == (epoch_order(13, seed=7, epoch=2, world_size=2, rank=1) % 5).tolist()
    )


def test_device_loader_explicit_drop_last_overrides_the_rule():
    from vitlens.data.device_loader import DeviceLoader

    keep = DeviceLoader(_coded(9), 4, ops=[], drop_last=False)  # 9 = 4 + 4 + 1, kept when asked
    assert not keep.drop_last and len(keep) == 3 and [len(b) for b in keep.batch_indices()] == [4, 4, 1]
    assert [len(x) for x, _ in keep] == [4, 4, 1]
    drop = DeviceLoader(_coded(10), 4, ops=[], drop_last=True)  # 10 = 4 + 4 + 2: dropped when asked
    assert drop.drop_last and len(drop) == 2 and [len(x) for x, _ in drop] == [4, 4]
    full = DeviceLoader(_coded(8), 4, ops=[], drop_last=True)  # nothing partial to drop
    assert len(full) == 2 and [len(x) for x, _ in full] == [4, 4]
    ev = DeviceLoader(_coded(9), 4, ops=[], shuffle=False)
    assert [b.tolist() for b in ev.batch_indices()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert [x[:, 0, 0, 0].tolist() for x, _ in ev] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert DeviceLoader(_coded(9), 4, ops=[], shuffle=False, world_size=3, rank=2).batch_indices()[
        0
    ].tolist() == [2, 5, 8]


def test_device_loader_uses_the_transforms_batched_pipeline_by_default():
    from vitlens.data.datasets import TransformedDataset
    from vitlens.data.device_loader import DeviceLoader

    tf = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.0] * 3, [2 / 255] * 3)])
    loader = DeviceLoader(TransformedDataset(_coded(6), tf), 3, shuffle=False, device="cpu")
    assert loader.device == torch.device("cpu") and loader.images.dtype == torch.uint8
    x, y = next(iter(loader))
    torch.testing.assert_close(x[:, 0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2]


def test_batched_pipeline_refuses_what_it_cannot_reproduce_and_translates_the_rest():
    from vitlens.data.device_loader import batched_pipeline

    for op in [
        v2.RandomCrop(4, padding=1, fill=1),
        v2.RandomCrop(4, padding=1, padding_mode="edge"),
        v2.RandomCrop(4, pad_if_needed=True),
        v2.RandomErasing(value="random"),
        v2.RandomErasing(value=[0.0, 0.5, 0.0]),
        v2.RandomResizedCrop(4),
        v2.ColorJitter(0.5),
    ]:
        assert batched_pipeline(v2.Compose([op])) is None, op
        assert batched_pipeline(op) is None, op  # a bare op, not in a Compose
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    g = torch.Generator()
    (crop,) = batched_pipeline(v2.Compose([v2.RandomCrop(4, fill=None)]))  # no padding: the image itself
    assert torch.equal(crop(x, g), x)
    (same_crop,) = batched_pipeline(v2.RandomCrop(4))
    assert torch.equal(same_crop(x, g), x)
    (flip,) = batched_pipeline(v2.Compose([v2.RandomHorizontalFlip(p=1.0)]))
    assert torch.equal(flip(x, g), x.flip(-1))
    (never,) = batched_pipeline(v2.Compose([v2.RandomHorizontalFlip(p=0.0)]))
    assert torch.equal(never(x, g), x)
    xf = torch.ones(50, 1, 8, 8)
    (erase,) = batched_pipeline(
        v2.Compose([v2.RandomErasing(p=1.0, value=[0.5, 0.5, 0.5], scale=(0.25, 0.25), ratio=(1.0, 1.0))])
    )
    out = erase(xf, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0.5, 1.0}
    assert ((out == 0.5).flatten(1).sum(1) == 16).all()  # a 4 x 4 square: scale 1/4, aspect 1
    (erase_int,) = batched_pipeline(v2.RandomErasing(p=1.0, value=3, scale=(0.25, 0.25), ratio=(1.0, 1.0)))
    assert ((erase_int(xf, g) == 3.0).flatten(1).sum(1) == 16).all()
    (erase_p0,) = batched_pipeline(v2.RandomErasing(p=0.0))
    assert torch.equal(erase_p0(xf, g), xf)
    resize, center = batched_pipeline(v2.Compose([v2.Resize(6, antialias=True), v2.CenterCrop(2)]))
    torch.testing.assert_close(center(resize(x, g), g), v2.CenterCrop(2)(v2.Resize(6, antialias=True)(x)))


@pytest.mark.parametrize("n, world", [(2, 5), (3, 8), (1, 3)])
def test_epoch_order_pads_like_the_sampler_even_when_padding_exceeds_the_data(n, world):
    from torch.utils.data import DistributedSampler

    from vitlens.data.device_loader import epoch_order

    for rank in range(world):
        s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3)
        s.set_epoch(1)
        assert epoch_order(n, seed=3, epoch=1, world_size=world, rank=rank).tolist() == list(s)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_batched_normalize_keeps_the_input_dtype_like_v2(dtype):
    from vitlens.data.device_loader import normalize

    x = torch.rand(4, 3, 5, 5, dtype=torch.float64).to(dtype)
    mean, std = [0.1, 0.2, 0.3], [0.7, 0.11, 0.13]
    op = normalize(mean, std)
    for _ in range(2):  # the second call uses the statistics kept for this device
        got = op(x.clone(), torch.Generator())
        assert got.dtype == dtype
        torch.testing.assert_close(got, v2.Normalize(mean, std)(x), rtol=0, atol=0)


def test_batched_randaugment_leaves_its_input_untouched():
    from vitlens.data.device_loader import batched_randaugment

    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    before = x.clone()
    out = batched_randaugment(v2.RandAugment(num_ops=2, magnitude=15))(x, torch.Generator().manual_seed(0))
    assert torch.equal(x, before) and not torch.equal(out, before)


def test_random_erasing_aspect_is_height_over_width_and_a_full_size_box_never_fits():
    """As torchvision: h = sqrt(area * aspect), w = sqrt(area / aspect), and a box must be strictly
    smaller than the image (h < H and w < W), else that attempt is void."""
    from vitlens.data.device_loader import random_erasing

    x = torch.ones(200, 1, 24, 24)
    out = random_erasing(x, torch.Generator().manual_seed(4), p=1.0, scale=(0.1, 0.15), ratio=(2.0, 3.0))
    n_tall = 0
    for img in out[:, 0]:
        ys, xs = (img == 0).nonzero(as_tuple=True)
        if len(ys):
            h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
            assert h > w, (h, w)  # aspect 2..3 means tall boxes
            n_tall += 1
    assert n_tall > 150
    whole = random_erasing(x, torch.Generator().manual_seed(0), p=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(whole, x)  # a box the size of the image never fits: nothing erased
    one_try = random_erasing(
        x, torch.Generator().manual_seed(0), p=1.0, scale=(0.25, 0.25), ratio=(1.0, 1.0), attempts=1
    )
    assert ((one_try == 0).flatten(1).sum(1) == 144).all()  # 12 x 12 boxes fit at the first attempt


def test_transformed_dataset_without_a_transform_yields_the_base_items():
    from vitlens.data.datasets import TransformedDataset

    base = _coded(4)
    tds = TransformedDataset(Subset(base, [3, 1]), None)
    img, label = tds[0]
    assert img is not None and torch.equal(img, base.images[3]) and label == 3
    assert tds.targets == [3, 1] and tds.classes == base.classes and len(tds) == 2


def test_batched_randaugment_fills_with_the_ops_fill_value():
    """A RandAugment with fill=200: rotated / sheared / translated images are filled with 200 as
    torchvision fills them (each image equals one of torchvision's own outcomes for it)."""
    from vitlens.data.device_loader import batched_randaugment

    op = v2.RandAugment(num_ops=1, magnitude=30, fill=200)
    imgs = torch.randint(0, 100, (40, 3, 8, 8), dtype=torch.uint8)
    out = batched_randaugment(op)(imgs, torch.Generator().manual_seed(1))
    refs = {}  # (op name, sign) -> torchvision's outcome for every image
    for name, (fn, signed) in op._AUGMENTATION_SPACE.items():
        mags = fn(op.num_magnitude_bins, 8, 8)
        m = float(mags[op.magnitude]) if mags is not None and mags.ndim > 0 else 0.0
        for sign in (-1, 1) if signed else (1,):
            refs[name, sign] = op._apply_image_or_video_transform(
                imgs, name, sign * m, interpolation=op.interpolation, fill=op._fill
            )
    geometric = 0
    for i in range(len(imgs)):
        hits = {name for (name, _), ref in refs.items() if torch.equal(ref[i], out[i])}
        assert hits, f"image {i} is no RandAugment outcome"
        geometric += bool({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"} & hits)
    assert geometric >= 5 and (out == 200).any()

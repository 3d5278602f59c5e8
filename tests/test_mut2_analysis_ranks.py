"""Mutation round 2, analysis core: the code paths only a multi-process run reaches, called in this
process: two ranks as two threads whose all-reduce meets at a barrier (each rank must return the
single-process result), and the launcher, progress bar and per-rank loader with fakes.

Test names avoid the words that the mutation run's ``-k`` filter drops (the launcher's name, the
process counts, the data-parallel abbreviation).
"""

from __future__ import annotations

import datetime
import importlib

import numpy as np
import pytest
import torch

from vitlens.analysis import cka_matrix
from vitlens.analysis import distributed as dist_module
from vitlens.analysis import probes as probes_module
from vitlens.analysis.distributed import RankBatches, init_from_torchrun
from vitlens.analysis.probes import localization_probes
from vitlens.errors import DataError

cka_module = importlib.import_module("vitlens.analysis.cka")  # the module; the package exports the function


# ----------------------------------------------------------------------------------------- distributed.py
def test_joining_the_launchers_group_uses_gloo_by_default(monkeypatch):
    import torch.distributed as tdist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: calls.append(kw))
    assert init_from_torchrun() is True  # no device given: CPU, gloo, the default timeout
    assert calls == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=600.0)}]


# ------------------------------------------------------------------ two ranks in one process (threads)
class _TwoRanks:
    """Two ranks of one analysis as two threads of this process: ``world()`` answers each thread's own
    rank, and the all-reduce (SUM or MAX) and broadcast exchange the threads' tensors at a barrier,
    as gloo would. Reaches every cross-rank code path in-process (the real two-process runs are in
    tests/test_distributed_analysis.py); each rank must return the single-process result."""

    def __init__(self, monkeypatch):
        import threading

        import torch.distributed as tdist

        self.local = threading.local()
        self.barrier = threading.Barrier(2, timeout=120)
        self.slots: list = [None, None]
        self.ops: list[str] = []
        world = lambda: (self.local.rank, 2)  # noqa: E731
        for module in (dist_module, probes_module, cka_module):
            monkeypatch.setattr(module, "world", world)
        monkeypatch.setattr(tdist, "get_backend", lambda: "gloo")
        monkeypatch.setattr(tdist, "get_rank", lambda: self.local.rank)
        monkeypatch.setattr(tdist, "all_reduce", self.all_reduce)
        monkeypatch.setattr(tdist, "broadcast_object_list", self.broadcast)

    def _exchange(self, value):
        r = self.local.rank
        self.slots[r] = value
        self.barrier.wait()
        both = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before both have read it
        return both

    def all_reduce(self, t, op=None):
        import torch.distributed as tdist

        op = tdist.ReduceOp.SUM if op is None else op  # torch.distributed's default
        if self.local.rank == 0:
            self.ops.append(f"{'sum' if op == tdist.ReduceOp.SUM else 'max'} {t.dtype} {t.device.type}")
        a, b = self._exchange(t.clone())
        t.copy_(a + b if op == tdist.ReduceOp.SUM else torch.maximum(a, b))

    def broadcast(self, box, src):
        box[0] = self._exchange(box[0])[src]

    def run(self, fn):
        import threading

        results, errors = [None, None], []

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("class_probe,train_batches", [("shared", 3), ("shared", 1), ("per_position", 3)])
def test_probes_split_over_two_ranks_equal_one_process(monkeypatch, class_probe, train_batches):
    """Rank 0 takes train batches 0 and 2, rank 1 batch 1 (or none); the one test batch is rank 0's,
    so rank 1 adds zeros of the right shapes: every rank returns the single-process result, whose
    class and position accuracies are neither 0 nor 1."""
    import copy

    from test_probes import OffsetMap, _noisy_planted

    model = OffsetMap()
    (xtr, ytr), (xte, yte) = _noisy_planted(32 * train_batches, 0), _noisy_planted(24, 1)
    # each batch drifts (input offset 0.5 x its index): the ranks' token means, so shifts, differ
    train = [(xtr[i : i + 32] + i / 64, ytr[i : i + 32]) for i in range(0, 32 * train_batches, 32)]
    kwargs = dict(layers=["map", "tokens"], class_probe=class_probe, max_images=None)
    ref = localization_probes(model, train, [(xte, yte)], **kwargs)
    ranks = _TwoRanks(monkeypatch)
    got = ranks.run(lambda r: localization_probes(copy.deepcopy(model), train, [(xte, yte)], **kwargs))
    # one MAX of the shapes, one SUM of the ridge statistics, one SUM of the correct counts
    assert ranks.ops == ["max torch.int64 cpu", "sum torch.float64 cpu", "sum torch.float64 cpu"]
    for res in got:
        assert list(res) == ["map", "tokens"]
        for layer in ("map", "tokens"):
            want, have = ref[layer], res[layer]
            assert sorted(have) == sorted(want)
            for key in (
                "grid_size",
                "num_positions",
                "num_classes",
                "train_tokens",
                "class_probe",
                "chance_class",
                "chance_position",
            ):
                assert have[key] == want[key], key
            np.testing.assert_array_equal(have["class_acc_map"], want["class_acc_map"])
            np.testing.assert_array_equal(have["position_acc_map"], want["position_acc_map"])
            assert have["class_acc"] == want["class_acc"] and have["position_acc"] == want["position_acc"]
    assert ref["tokens"]["train_tokens"] == 32 * train_batches * 16
    assert 0.05 < ref["map"]["class_acc"] < 0.95  # a non-trivial fit, so equality means something


@pytest.mark.filterwarnings("ignore:MinibatchCKA. skipping")
@pytest.mark.parametrize("two_models", [False, True])
@pytest.mark.parametrize("as_loader", [False, True])
def test_cka_matrix_split_over_two_ranks_equals_one_process(monkeypatch, two_models, as_loader):
    """5 batches (the last one too small, skipped by the rank that holds it): rank 0 takes 0, 2, 4 and
    rank 1 takes 1, 3; the HSIC sums are added once, and both ranks return the single-process matrix."""
    import copy

    from test_analysis_units import _TwoLayer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(35, 3, 2, 2, generator=g, dtype=torch.float64)
    if as_loader:
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)
    else:
        data = [x[i : i + 8] for i in range(0, 35, 8)]
    a, b = _TwoLayer(0).eval(), _TwoLayer(1).eval()

    def run(m_a, m_b):
        return cka_matrix(
            m_a,
            m_b,
            data,
            layers_a=["fc1", "fc2"],
            layers_b=["fc2"] if m_b else None,
            gram_dtype=torch.float64,
            progress=False,
        )

    ref = run(a, b if two_models else None)
    ranks = _TwoRanks(monkeypatch)
    got = ranks.run(lambda r: run(copy.deepcopy(a), copy.deepcopy(b) if two_models else None))
    assert ranks.ops == ["sum torch.float64 cpu"]  # one all-reduce of all the HSIC sums
    for m, names_a, names_b in got:
        assert (names_a, names_b) == ref[1:]
        np.testing.assert_allclose(m, ref[0], rtol=0, atol=1e-12)
    assert not np.allclose(ref[0], 1.0)


class _Bar:
    """Stands in for tqdm: records how it was opened, each update and whether it was closed."""

    opened: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.closed = kwargs, [], False
        _Bar.opened.append(self)

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("as_loader", [False, True])
def test_rank_batches_progress_counts_the_images_of_all_ranks(monkeypatch, rank, as_loader):
    """One bar, on rank 0 only, in images of all ranks: after each of its batches rank 0 advances by
    the whole round of W batches (a DataLoader's sizes are known) or by W times its own batch."""
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    monkeypatch.setattr(_Bar, "opened", [])
    monkeypatch.setattr(dist_module, "world", lambda: (rank, 2))
    x = torch.arange(12.0)
    if as_loader:
        data = torch.utils.data.DataLoader(x, batch_size=3)  # batches of 3, 3, 3, 3; cut to 3, 3, 3, 1
    else:
        data = [x[i : i + 3] for i in range(0, 12, 3)]
    rb = RankBatches(data, max_images=10, progress=True, desc="CKA")
    got = [b.tolist() for b in rb]
    want = [[0.0, 1.0, 2.0], [6.0, 7.0, 8.0]] if rank == 0 else [[3.0, 4.0, 5.0], [9.0]]
    assert got == want
    (bar,) = _Bar.opened
    assert bar.kwargs == {
        "total": 10 if as_loader else None,
        "desc": "CKA",
        "unit": "img",
        "disable": rank != 0,
        "leave": False,
    }
    if as_loader:
        assert bar.updates == ([6, 4] if rank == 0 else [6, 4])  # rounds (3 + 3) and (3 + 1)
    else:
        assert bar.updates == ([6, 6] if rank == 0 else [6, 2])  # W x its own batch
    assert bar.closed
    assert rb.images_per_rank == [6, 4] and rb.describe()["images"] == 10
    assert rb.describe()["world_size"] == 2


def test_rank_batches_without_progress_disable_the_bar(monkeypatch):
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    monkeypatch.setattr(_Bar, "opened", [])
    assert [b.tolist() for b in RankBatches([torch.zeros(2)], desc="probes: train")] == [[0.0, 0.0]]
    (bar,) = _Bar.opened
    assert bar.kwargs["disable"] is True and bar.kwargs["desc"] == "probes: train" and bar.closed


def test_localization_probes_label_their_progress_bars(monkeypatch):
    import tqdm.auto
    from test_probes import OffsetMap, _noisy_planted

    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    monkeypatch.setattr(_Bar, "opened", [])
    (xtr, ytr), (xte, yte) = _noisy_planted(16, 0), _noisy_planted(8, 1)
    localization_probes(OffsetMap(), [(xtr, ytr)], [(xte, yte)], ["map"], progress=True, max_images=12)
    assert [(b.kwargs["desc"], b.kwargs["disable"], b.updates) for b in _Bar.opened] == [
        ("probes: train", False, [12]),
        ("probes: test", False, [8]),
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_ranks_loader_keeps_every_setting_of_the_users_loader(monkeypatch, workers):
    """The per-rank DataLoader reads only the rank's batches but otherwise is the user's loader:
    workers, collate_fn, pinned memory, worker init, start method, generator, persistent workers."""
    import torch.utils.data as tud

    made = []

    class Spy:
        def __init__(self, dataset, **kwargs):
            made.append((dataset, kwargs))

        def __iter__(self):
            return iter(())

    def collate(items):
        return torch.stack(items)

    def init(worker_id):
        return None

    gen = torch.Generator().manual_seed(3)
    ds = list(torch.arange(10.0).view(5, 2))
    extra = {"multiprocessing_context": "spawn", "persistent_workers": True} if workers else {}
    loader = tud.DataLoader(
        ds,
        batch_size=2,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=True,
        worker_init_fn=init,
        generator=gen,
        **extra,
    )
    monkeypatch.setattr(dist_module, "world", lambda: (1, 2))
    rb = RankBatches(loader, max_images=5)
    monkeypatch.setattr(tud, "DataLoader", Spy)
    assert list(rb) == []
    ((dataset, kwargs),) = made
    assert dataset is ds
    assert kwargs == {
        "batch_sampler": [[2, 3]],  # rank 1 of 2: the second of the batches [0, 1], [2, 3], [4]
        "num_workers": workers,
        "collate_fn": collate,
        "pin_memory": True,
        "worker_init_fn": init,
        "multiprocessing_context": loader.multiprocessing_context if workers else None,
        "generator": gen,
        "persistent_workers": bool(workers),
    }


def test_cka_matrix_shows_a_cka_progress_bar_by_default(monkeypatch):
    import tqdm.auto
    from test_analysis_units import _TwoLayer

    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    monkeypatch.setattr(_Bar, "opened", [])
    m = _TwoLayer(0).eval()
    data = [
        torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s in range(3)
    ]
    cka_matrix(m, data, layers_a=["fc1", "fc2"], max_batches=2)
    cka_matrix(m, data, layers_a=["fc1", "fc2"], progress=False)
    assert [(b.kwargs["desc"], b.kwargs["disable"], b.updates) for b in _Bar.opened] == [
        ("CKA", False, [5, 5]),  # max_batches=2 of the 3 batches
        ("CKA", True, [5, 5, 5]),
    ]


def test_joining_the_launchers_group_on_cuda_uses_nccl_on_the_local_gpu(monkeypatch):
    """cuda: NCCL, each rank on cuda:LOCAL_RANK, the given timeout; a group already joined: nothing."""
    import torch.distributed as tdist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    assert init_from_torchrun(torch.device("cuda"), timeout_s=7.0) is True
    assert calls == [("set_device", 3), {"backend": "nccl", "timeout": datetime.timedelta(seconds=7.0)}]
    calls.clear()
    assert init_from_torchrun("cpu", timeout_s=3.0) is True
    assert calls == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=3.0)}]
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    assert init_from_torchrun("cuda") is False and len(calls) == 1
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_torchrun("cuda") is False and len(calls) == 1


def test_summing_nothing_across_two_ranks_is_nothing(monkeypatch):
    ranks = _TwoRanks(monkeypatch)
    assert ranks.run(lambda r: dist_module.sum_across_ranks([])) == [[], []]
    got = ranks.run(
        lambda r: dist_module.sum_across_ranks([torch.tensor([1.0, 2.0]) * (r + 1), torch.ones(2, 2)])
    )
    for out in got:
        assert out[0].tolist() == [3.0, 6.0] and out[1].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert ranks.run(lambda r: dist_module.max_across_ranks([r, 5 - r, 2])) == [[1, 5, 2], [1, 5, 2]]


def test_cross_rank_maxima_ignore_torchs_default_device(monkeypatch):
    def on_meta(values):
        with torch.device("meta"):
            return dist_module.max_across_ranks(values)

    ranks = _TwoRanks(monkeypatch)
    assert ranks.run(lambda r: on_meta([3 * r, 4])) == [[3, 4], [3, 4]]


def test_probes_on_empty_train_data_fail_on_every_rank(monkeypatch):
    import copy

    from test_probes import OffsetMap

    model = OffsetMap()
    ranks = _TwoRanks(monkeypatch)

    def run(rank):
        try:
            localization_probes(copy.deepcopy(model), [], [], ["map"])
        except DataError as e:
            return str(e)

    assert ranks.run(run) == ["no images to fit probes on; the data iterable is empty"] * 2

"""kill -9 at any instant cannot corrupt or change a run.

A real ``vitlens train`` process (embedded data, a tiny ViT, many short epochs) is SIGKILLed at
random instants, at least 20 times, a third of them inside the checkpoint write (after the
temporary file is written, before it is renamed over ``last.safetensors``), and resumed after
each kill. Checked: the last checkpoint always loads, the resumed run completes,
``metrics.jsonl`` holds epochs 1..N exactly once, no temporary file remains, and the final
weights equal those of an uninterrupted run.

The processes are forked from a ``multiprocessing`` fork server that imported vitlens once:
each one is a separate OS process running the command-line entry point, killed by the
kernel, without paying the seconds of Python + torch start-up twenty times.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from vitlens.io import load_checkpoint

EPOCHS = 24
KILLS = 21
RUN = [
    "train",
    "--model", "vit_micro_patch4_32",
    "--model-args", '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
    "--fraction", "0.02", "--batch-size", "16", "--epochs", str(EPOCHS),
    "--eval-every", str(EPOCHS), "--seed", "3", "--no-progress",
]  # fmt: skip


def _train_process(argv: list[str], marker: str | None) -> None:
    """The child: ``vitlens train ...``; with ``marker``, the k-th checkpoint write of this process
    pauses between writing its temporary file and renaming it, with ``{marker}.{k}`` present."""
    torch.set_num_threads(1)  # the same arithmetic in every process (the reference included)
    if marker:
        import vitlens.io.checkpoint as ck

        real_save_file, writes = ck.save_file, []

        def slow_save_file(tensors, path, metadata=None):
            real_save_file(tensors, path, metadata=metadata)
            writes.append(path)
            flag = Path(f"{marker}.{len(writes)}")
            flag.write_text(str(path))  # the temp file is complete, not yet renamed
            time.sleep(0.5)
            flag.unlink()

        ck.save_file = slow_save_file
    from vitlens.cli import main

    os._exit(main(argv))


@pytest.fixture(scope="module")
def fork_server():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "vitlens.cli", "vitlens.train", "vitlens.data", "vitlens.models"])
    warm = ctx.Process(target=time.sleep, args=(0,))  # start the server (imports) before any timing
    warm.start()
    warm.join(300)
    return ctx


def _start(ctx, out: Path, marker: Path | None = None):
    resume = ["--resume"] if (out / "checkpoints" / "last.safetensors").exists() else []
    p = ctx.Process(
        target=_train_process, args=([*RUN, "--out", str(out), *resume], str(marker) if marker else None)
    )
    p.start()
    return p


def _weights(run: Path) -> dict[str, torch.Tensor]:
    weights, _, state = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert state["epoch"] == EPOCHS
    return weights


def _epochs_logged(run: Path, since_ns: int = 0) -> int:
    """Lines in metrics.jsonl; -1 when it is missing or was last written before ``since_ns``."""
    path = run / "metrics.jsonl"
    try:
        if path.stat().st_mtime_ns < since_ns:
            return -1
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return -1


def _checkpoint_epoch(run: Path) -> int:
    last = run / "checkpoints" / "last.safetensors"
    return int(load_checkpoint(last)[2]["epoch"]) if last.exists() else 0


def _wait(p, until, deadline: float) -> None:
    """Until ``until()`` holds, the process ends or ``deadline`` (monotonic) passes."""
    while p.is_alive() and not until() and time.monotonic() < deadline:
        time.sleep(0.002)


def test_kill_9_at_random_instants_then_resume(fork_server, tmp_path):
    started = time.perf_counter()
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    why = f"(random seed {seed})"

    # The uninterrupted run: the reference, and the measure of a start-up and of an epoch.
    ref = tmp_path / "reference"
    t0 = time.monotonic()
    p = _start(fork_server, ref)
    _wait(p, lambda: _epochs_logged(ref) >= 1, t0 + 300)
    startup = time.monotonic() - t0  # data, model, first epoch, its metrics line
    p.join(300)
    assert p.exitcode == 0, why
    per_epoch = (time.monotonic() - t0 - startup) / (EPOCHS - 1)

    run, marker = tmp_path / "killed", tmp_path / "in_checkpoint_write"
    kills = in_write = attempts = 0
    progress: list[int] = []  # the checkpoint's epoch after each kill
    while kills < KILLS:
        attempts += 1
        assert attempts < 2 * KILLS, f"the run kept finishing before it could be killed {why}"
        done = _checkpoint_epoch(run)
        mode = ("write", "start-up", "epochs")[attempts % 3]
        p = _start(fork_server, run, marker if mode == "write" else None)
        t0 = time.monotonic()
        logged = functools.partial(_epochs_logged, run, since_ns=time.time_ns())  # by this start
        if mode == "write":  # inside this start's first or second checkpoint write
            flag = Path(f"{marker}.{rng.choice([1, 2])}")
            _wait(p, flag.exists, t0 + 300)
        elif mode == "start-up":  # a random instant of the start: data, model, files, first epoch
            _wait(p, lambda n=done + 1, f=logged: f() > n, t0 + rng.uniform(0.0, startup))
        else:  # a random instant of the epochs after the first: steps, metrics line, checkpoint
            _wait(p, lambda n=done, f=logged: f() > n, t0 + 300)
            _wait(p, lambda n=done + 3, f=logged: f() > n, time.monotonic() + rng.uniform(0, 2 * per_epoch))
        if not p.is_alive():
            p.join()
            assert p.exitcode == 0, f"start {attempts} failed on its own {why}"
            break  # it finished first: the run is complete, check it below
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        kills += 1
        if mode == "write":
            in_write += flag.exists()
            flag.unlink(missing_ok=True)
        progress.append(_checkpoint_epoch(run))  # whatever the instant, the last checkpoint loads whole

    # resume until done (normally one more start)
    for _ in range(3):
        if (run / "summary.json").exists():
            break
        p = _start(fork_server, run)
        p.join(300)
        assert p.exitcode == 0, why
    elapsed = time.perf_counter() - started

    assert kills >= 20, f"only {kills} kills landed before the run finished {why}"
    assert in_write >= 6, f"only {in_write} kills inside a checkpoint write {why}"
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, EPOCHS + 1)), f"{epochs} {why}"
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files remain: {leftovers} {why}"
    got, want = _weights(run), _weights(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs from the uninterrupted run {why}"
    assert json.loads((run / "summary.json").read_text())["finished"]
    print(
        f"reference: start-up {startup:.1f} s, {per_epoch:.2f} s/epoch; {kills} kills ({in_write} inside a "
        f"checkpoint write), {attempts} starts, {elapsed:.1f} s; checkpoint epoch after each kill: {progress}"
    )

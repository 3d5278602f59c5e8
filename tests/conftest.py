"""Shared fixtures. Real data lives in ../shared/data beside the project root (see its README)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"real data expected at {SHARED_DATA} (see the project README)"
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Under pytest-xdist each worker gets one core: more threads than cores makes torch spin and
    # slows every test several-fold on the 2-core CI machine.
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture
def hubs(tmp_path, monkeypatch):
    """Empty HF and torch caches, offline mode on, and any socket use an error."""
    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # huggingface_hub read its environment at import (other tests imported it): set what it read.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and far faster when other processes share the 2 cores
    (and a reference computed in-process matches spawned one-thread workers); the count is given back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def figures(monkeypatch):
    """Every Figure passed to ``vitlens.analysis.plots._save``, in order (the files are still written)."""
    import importlib

    plots = importlib.import_module("vitlens.analysis.plots")
    caught = []
    real = plots._save
    monkeypatch.setattr(
        plots, "_save", lambda fig, path, numbers: caught.append(fig) or real(fig, path, numbers)
    )
    return caught

"""Precision and kernel choices by default where the hardware has them (issue 13).

* ``amp="auto"``: bf16 autocast on a GPU that supports it, and on a CPU with native bf16 matrix units
  (Intel AMX, or AVX-512-BF16); fp32 elsewhere - without those units bf16 matrix products are emulated
  and slower than fp32 - with a one-line message saying why.
* channels_last for CNNs (convolutions run in NHWC on oneDNN and cuDNN); ViTs keep the default layout
  (their only convolution is the patch embedding).
* fused AdamW/SGD on CUDA and the CPU (one kernel for all parameters instead of a loop of small ones).

The hardware is read once by :func:`detect_capability`; every decision takes a
:class:`Capability` so tests can inject one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

AMP_MODES = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Capability:
    """What the machine offers for low-precision training."""

    cpu_amx_bf16: bool = False  # Intel AMX tiles with bf16 (Sapphire Rapids and later)
    cpu_avx512_bf16: bool = False  # AVX-512 BF16 dot products (Cooper Lake, Zen 4 and later)
    cuda_bf16: bool = False  # the current CUDA device computes in bf16 natively (Ampere and later)

    @property
    def cpu_bf16(self) -> bool:
        return self.cpu_amx_bf16 or self.cpu_avx512_bf16


def _cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def detect_capability(cpuinfo: str | Path = "/proc/cpuinfo") -> Capability:
    """Read the machine: torch's own CPU probes when present, else the kernel's cpuinfo flags."""
    flags = _cpu_flags(cpuinfo)
    amx = "amx_bf16" in flags
    avx512_bf16 = "avx512_bf16" in flags
    probe = getattr(torch, "cpu", None)
    if hasattr(probe, "_is_amx_tile_supported"):  # torch >= 2.3: cpuinfo-library probes (any OS)
        amx = amx or bool(probe._is_amx_tile_supported())
    if hasattr(probe, "_is_avx512_bf16_supported"):
        avx512_bf16 = avx512_bf16 or bool(probe._is_avx512_bf16_supported())
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return Capability(cpu_amx_bf16=amx, cpu_avx512_bf16=avx512_bf16, cuda_bf16=cuda_bf16)


_DETECTED: Capability | None = None


def capability() -> Capability:
    """:func:`detect_capability`, read once per process."""
    global _DETECTED
    if _DETECTED is None:
        _DETECTED = detect_capability()
    return _DETECTED


def resolve_amp(
    amp: str, device: torch.device | str, cap: Capability | None = None, log=print
) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (``None``: plain fp32).

    ``auto`` picks bf16 where the hardware computes it natively and says in one line when it falls
    back to fp32; an explicit ``bf16``/``fp16``/``fp32`` is obeyed as given.
    """
    if amp not in AMP_MODES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}; got {amp!r}")
    device = torch.device(device)
    if amp == "fp32":
        return None
    if amp != "auto":
        return torch.bfloat16 if amp == "bf16" else torch.float16
    cap = cap if cap is not None else capability()
    if device.type == "cuda":
        if cap.cuda_bf16:
            return torch.bfloat16
        log("amp=auto: this GPU has no native bf16; training in fp32 (pass --amp fp16 for half precision)")
        return None
    if device.type == "cpu":
        if cap.cpu_bf16:
            return torch.bfloat16
        log(
            "amp=auto: this CPU has no native bf16 matrix units (AMX or AVX-512-BF16), where bf16 would be "
            "slower than fp32; training in fp32"
        )
        return None
    log(f"amp=auto: no bf16 rule for device type {device.type!r}; training in fp32")
    return None


def is_cnn(model: nn.Module) -> bool:
    """A convolutional network (ResNet-like), as opposed to a ViT whose only conv is the patch embedding."""
    if hasattr(model, "blocks"):  # ViTs (and hybrid ViTs) keep their encoder in .blocks
        return False
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def want_channels_last(channels_last: bool | None, model: nn.Module) -> bool:
    """``None`` (the default) means: yes for CNNs, no for ViTs."""
    return is_cnn(model) if channels_last is None else bool(channels_last)


def optimizer_options(device: torch.device | str) -> dict:
    """Extra keyword arguments for torch.optim.AdamW/SGD: the fused kernels on CUDA and on the CPU.

    On the CPU the fused AdamW step is ~3.5x faster than the default (foreach) one for the small
    models' ~50 parameter tensors (vit_micro: 1.4 vs 4.7 ms a step) and equal up to rounding (1 ulp)."""
    return {"fused": True} if torch.device(device).type in ("cuda", "cpu") else {}


def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter's optimiser state (the moments) the parameter's own memory layout.

    A checkpoint stores tensors contiguous, so after ``load_state_dict`` a channels_last parameter has
    contiguous moments. The fused AdamW/SGD kernels (CPU and CUDA) walk parameter, gradient and moments
    as flat memory, so mismatched layouts pair the wrong elements and a resumed run silently drifts."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory(libc=None) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A training step frees and reallocates the same few-MB activation tensors every step. By default
    glibc serves each of them from freshly mmap'd pages (and trims the heap's top on free), so every
    step first-touches - page-faults - megabytes of new memory: in this VM an in-place ReLU on a
    freshly allocated tensor ran ~10x slower than on a reused one. Keeping allocations under 32 MB on
    the heap and not trimming it is what jemalloc/tcmalloc under ``LD_PRELOAD`` give (Intel's PyTorch
    CPU tuning guide); mallopt gets it without a preload. Process-wide, idempotent; the price is that
    the process keeps its peak heap until it exits. Returns whether glibc took both settings
    (False on other C libraries and platforms, where nothing changes)."""
    if libc is None:
        if not sys.platform.startswith("linux"):
            return False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # musl and others have no mallopt
        return False
    ok_mmap = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    ok_trim = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(ok_mmap) and bool(ok_trim)


def matmul_flops(
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    n: int | None = None,
    repeats: int = 5,
) -> float:
    """Measured FLOP/s of an ``n x n x n`` matrix product in ``dtype`` (best of ``repeats``): the ceiling
    that model FLOP utilisation (MFU) is quoted against. ``n`` defaults to 1024 on a CPU, 8192 on a GPU."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first product warms up (kernel choice, page faults)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best

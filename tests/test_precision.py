"""Precision defaults (issue 13): bf16 where the hardware has it, fp32 with a message elsewhere."""

from __future__ import annotations

import pytest
import torch

from vitlens.errors import ConfigError
from vitlens.models import create_model
from vitlens.train.precision import (
    Capability,
    _cpu_flags,
    detect_capability,
    is_cnn,
    matmul_flops,
    optimizer_options,
    resolve_amp,
    want_channels_last,
)

AMX = Capability(cpu_amx_bf16=True)
AVX512_BF16 = Capability(cpu_avx512_bf16=True)
NOTHING = Capability()
GPU_BF16 = Capability(cuda_bf16=True)


def _resolve(amp, device, cap):
    lines: list[str] = []
    return resolve_amp(amp, device, cap, log=lines.append), lines


@pytest.mark.parametrize(
    "cap,device,expected",
    [
        (AMX, "cpu", torch.bfloat16),
        (AVX512_BF16, "cpu", torch.bfloat16),
        (NOTHING, "cpu", None),
        (GPU_BF16, "cpu", None),  # a bf16 GPU says nothing about the CPU
        (GPU_BF16, "cuda", torch.bfloat16),
        (AMX, "cuda", None),  # nor the CPU about the GPU
    ],
)
def test_auto_takes_bf16_only_where_the_hardware_has_it(cap, device, expected):
    dtype, lines = _resolve("auto", device, cap)
    assert dtype == expected
    if expected is None:  # the fall-back is announced in exactly one line naming fp32
        assert len(lines) == 1 and "fp32" in lines[0] and "\n" not in lines[0]
    else:
        assert lines == []


def test_explicit_modes_are_obeyed_whatever_the_hardware():
    for cap in (NOTHING, AMX):
        assert _resolve("fp32", "cpu", cap) == (None, [])
        assert _resolve("bf16", "cpu", cap) == (torch.bfloat16, [])
        assert _resolve("fp16", "cuda", cap) == (torch.float16, [])
    with pytest.raises(ConfigError, match="auto, bf16, fp16, fp32"):
        resolve_amp("half", "cpu", AMX)


def test_cpuinfo_flags_are_read(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\nbugs\t\t: x\n")
    assert {"amx_bf16", "avx512f"} <= _cpu_flags(info) and "avx512_bf16" not in _cpu_flags(info)
    assert detect_capability(info).cpu_amx_bf16
    assert _cpu_flags(tmp_path / "missing") == set()
    # Without the file, the answer is torch's own probe of the CPU.
    cap = detect_capability(tmp_path / "missing")
    assert cap.cpu_amx_bf16 == bool(torch.cpu._is_amx_tile_supported())
    assert cap.cpu_avx512_bf16 == bool(torch.cpu._is_avx512_bf16_supported())


def test_channels_last_defaults_to_cnns_only():
    resnet = create_model("resnet8_cifar", num_classes=10)
    vit = create_model("vit_micro_patch4_32", num_classes=10)
    assert is_cnn(resnet) and not is_cnn(vit)
    assert want_channels_last(None, resnet) and not want_channels_last(None, vit)
    assert want_channels_last(True, vit) and not want_channels_last(False, resnet)


def test_fused_optimizer_on_cuda_and_cpu():
    assert optimizer_options("cuda") == {"fused": True}
    assert optimizer_options("cpu") == {"fused": True}
    assert optimizer_options("mps") == {}


def test_matmul_flops_counts_two_flops_per_multiply_add(monkeypatch):
    # A clock that advances 1 s per reading makes each product take exactly 1 s: FLOP/s = 2 n^3.
    ticks = iter(range(1000))
    monkeypatch.setattr("vitlens.train.precision.time.perf_counter", lambda: float(next(ticks)))
    assert matmul_flops(torch.float32, "cpu", n=16, repeats=2) == 2 * 16**3


def test_bf16_training_step_matches_fp32_closely():
    """Autocast bf16 changes the loss of one step by bf16 rounding only (a few 1e-3 relative)."""
    torch.manual_seed(0)
    model = create_model("resnet8_cifar", num_classes=10)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loss32 = torch.nn.functional.cross_entropy(model(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = torch.nn.functional.cross_entropy(model(x).float(), y)
    assert abs(loss16.item() - loss32.item()) / loss32.item() < 0.02

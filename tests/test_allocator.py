"""keep_freed_memory: glibc keeps freed tensors' memory, so a training step stops page-faulting."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from vitlens.train.precision import keep_freed_memory


class FakeLibc:
    def __init__(self, answers=(1, 1)):
        self.calls, self.answers = [], list(answers)

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answers[len(self.calls) - 1]


def test_sets_glibcs_mmap_and_trim_thresholds():
    libc = FakeLibc()
    assert keep_freed_memory(libc) is True
    # malloc.h: M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1; 32 MiB is glibc's largest mmap threshold
    assert libc.calls == [(-3, 32 * 1024 * 1024), (-1, 1024**3)]


@pytest.mark.parametrize("answers", [(0, 1), (1, 0), (0, 0)])
def test_reports_a_refused_setting(answers):
    assert keep_freed_memory(FakeLibc(answers)) is False


def test_a_c_library_without_mallopt_is_left_alone():
    assert keep_freed_memory(object()) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what is tuned")
def test_reallocating_a_freed_tensor_no_longer_faults_pages_in():
    # Count minor page faults of 20 allocations of an 8 MB tensor (first touched by ones()), in a
    # fresh process with the setting. glibc's default hands such blocks back and faults them in
    # again each time (hundreds of faults per allocation); kept, they are reused without a fault.
    code = textwrap.dedent(
        """
        import resource, torch
        from vitlens.train.precision import keep_freed_memory
        assert keep_freed_memory()
        for _ in range(3):
            t = torch.ones(1 << 21); del t
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            t = torch.ones(1 << 21); del t
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    faults_per_allocation = float(out.stdout.split()[-1])
    assert faults_per_allocation < 8  # 2,048 pages of 4 KiB if every allocation were fresh memory

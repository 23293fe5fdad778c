"""ddpm/training/cpu.py: the trainer's CPU process settings. glibc keeps the memory a training step frees inside
``reuse_freed_memory`` (checked with glibc's own mallinfo2 and the resident set), lets it go on leaving, and
leaves its thresholds where its own raising tops out; all of it only for CPU training with the kernels' switch on
and no allocator variables of the user's."""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import pytest
import torch

from ddpm import kernels
from ddpm.training import cpu as train_cpu


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo() -> _MallInfo2:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
BLOCK = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB): mapped, then unmapped, by default


def _mapped_while_held(size: int = BLOCK) -> int:
    """Bytes glibc holds in separate mappings while a tensor of ``size`` bytes lives, minus those before it."""
    before = _mallinfo().hblkhd
    block = torch.empty(size // 4)
    held = _mallinfo().hblkhd - before
    del block
    return held


def _beyond_free_heap() -> int:
    # more than all the free memory glibc's arenas hold, so that no free chunk can serve it
    return int(_mallinfo().fordblks) + BLOCK


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not GLIBC, reason="mallopt and mallinfo2 are glibc's (CI runs Linux with glibc)")
def test_reuse_freed_memory_serves_large_blocks_from_the_heap_and_keeps_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in train_cpu._ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    # glibc's behaviour outside: a block larger than all free heap gets its own mapping (unmapped on free)
    size = _beyond_free_heap()
    assert _mapped_while_held(size) >= size
    with train_cpu.reuse_freed_memory(torch.device("cpu")) as kept:
        assert kept
        assert _mapped_while_held() < BLOCK  # from the heap
        block = torch.ones(BLOCK // 4)  # its pages touched, so resident
        del block
        assert _mallinfo().fordblks >= BLOCK  # freed, and kept for the next step
        resident = _resident_bytes()
    assert _resident_bytes() < resident - BLOCK // 2  # malloc_trim gave the kept pages back to the system
    # the thresholds are where glibc's own raising tops out (32 MiB), not at its 128 KiB start, which would map
    # and unmap every block above that from then on: a block larger than all free heap (the kept 64 MiB may still
    # be a free chunk, its pages returned) gets its own mapping again; blocks of 16 MiB come from the heap
    size = _beyond_free_heap()
    assert _mapped_while_held(size) >= size
    medium = 16 << 20
    count = _beyond_free_heap() // medium + 1  # together more than all free heap: some must come from the system
    before = _mallinfo().hblkhd
    blocks = [torch.empty(medium // 4) for _ in range(count)]
    assert _mallinfo().hblkhd - before < medium  # none mapped on its own
    del blocks


def test_reuse_freed_memory_only_for_cpu_training_with_the_door_open(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in train_cpu._ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    cpu = torch.device("cpu")
    with train_cpu.reuse_freed_memory(torch.device("cuda", 0)) as kept:
        assert not kept
    with kernels.enabled(False), train_cpu.reuse_freed_memory(cpu) as kept:
        assert not kept
    assert train_cpu.training_on_cpu(cpu) and not train_cpu.training_on_cpu(torch.device("cuda"))
    with kernels.enabled(False):
        assert not train_cpu.training_on_cpu(cpu)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own allocator settings win
    with train_cpu.reuse_freed_memory(cpu) as kept:
        assert not kept
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    with train_cpu.reuse_freed_memory(cpu) as outer:
        assert outer == GLIBC
        with train_cpu.reuse_freed_memory(cpu) as inner:  # nested: the outermost block owns the setting
            assert not inner
        if GLIBC:
            assert _mapped_while_held() < BLOCK  # the inner block's exit did not restore the defaults

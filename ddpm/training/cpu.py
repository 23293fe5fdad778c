"""The trainer's settings for a CPU process, behind the same switch as the CPU kernels (``ddpm.kernels``):
torch's fused AdamW, and glibc's allocator told to keep the memory a training step frees instead of handing it
back and faulting it in again next step. ``DDPM_CPU_KERNELS=0`` turns both off with the kernels."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ddpm import kernels


def training_on_cpu(device: torch.device) -> bool:
    """Whether the trainer's CPU speed-ups apply to training on ``device``: a CPU device, kernels switched on.
    The trainer then uses the fused AdamW kernel (one pass per parameter instead of a dozen ops: 3.8 -> 1.3 ms a
    step for unet-small's 184 tensors, measured) and ``reuse_freed_memory``."""
    return kernels.switched_on() and device.type == "cpu"


# A training step frees its activations and allocates them again in the next step. glibc serves blocks above
# M_MMAP_THRESHOLD (128 KiB, raised as such blocks are freed, to 32 MiB at most) from fresh mappings that it unmaps
# on free, and trims the heap's free top beyond M_TRIM_THRESHOLD: either way the pages go back to the system and the
# next step faults them in again, zero-filled. unet-small at batch 64 took 13,000-16,000 minor page faults a step
# (211-224 ms a step); with both thresholds raised, 20-90 faults and 182-192 ms, the same peak RSS (one process per
# run, three runs each, 30 Nov 2026). M_TRIM_THRESHOLD and M_MMAP_THRESHOLD are mallopt's parameters in <malloc.h>.
# Setting either threshold ends glibc's raising of them for the rest of the process, so on leaving they are set to
# where that raising tops out (mmap: 32 MiB with 64-bit longs, trim: twice that), not to their 128 KiB starting
# values: fixed at 128 KiB, every block above it is mapped and unmapped on each use, and a diffusers training step
# run after the block took 372 ms against 249 ms in a fresh process; with the raised values 281 ms against 267 ms
# (unet-small RGB b64, one process per setting, 30 Nov 2026).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_MMAP_MAX = 32 << 20 if ctypes.sizeof(ctypes.c_long) == 8 else 512 << 10  # DEFAULT_MMAP_THRESHOLD_MAX
_KEEP_MMAP, _KEEP_TRIM = 1 << 30, 2**31 - 1  # blocks up to 1 GiB from the heap; trim only past 2 GiB of free top
_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_keeping = [False]


def _glibc() -> Any:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)  # the process's own symbols: glibc's mallopt and malloc_trim
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory(device: torch.device) -> Iterator[bool]:
    """Inside the block, glibc keeps the memory a training step frees for the next step (yields True), where
    ``training_on_cpu(device)`` holds, the C library is glibc and the user set no allocator variable of their own
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``GLIBC_TUNABLES``). On leaving it,
    both thresholds are set to the values glibc's own adjustment raises them to at most (32 MiB and 64 MiB; fixed
    from then on, as any mallopt call leaves them) and ``malloc_trim(0)`` returns what is free to the system.
    Process-wide; nested blocks leave it to the outermost."""
    libc = _glibc() if training_on_cpu(device) and not _keeping[0] else None
    if libc is None or any(name in os.environ for name in _ALLOCATOR_ENV):
        yield False
        return
    _keeping[0] = True
    try:
        kept_mmap = libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP) == 1  # mallopt returns 1 on success
        kept_trim = libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM) == 1
        yield kept_mmap and kept_trim
    finally:
        _keeping[0] = False
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_MAX)
        libc.malloc_trim(0)

"""Keeping freed C-heap memory for the next forward pass instead of giving it back to the kernel.

A forward pass on the CPU allocates and frees the same few-MB activation buffers hundreds of
times. glibc's malloc returns large freed blocks to the kernel (above its mmap threshold, or when
the free top of the heap exceeds its trim threshold) and the next pass faults every page back in:
scoring 300 CrowS-Pairs pairs on SmolLM2-135M took 550,000-700,000 minor page faults and 1.1 s of
system time in a 8 s run in some processes (glibc adjusts its thresholds as it goes, so how many
depends on what ran before). With the thresholds below: ~100 faults, 0.03 s, and the run ~12 %
faster. The setting changes only when memory goes back to the kernel, never what is computed.

`steady_heap()` sets them (they stay set: glibc has no call to read them back) and, when the
outermost block ends, hands the free heap back to the kernel with malloc_trim(0), so a process
holds no more memory after an evaluation than before. Other C libraries: nothing is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap (activations, logits blocks)
TRIM_THRESHOLD = 256 << 20  # free heap top kept between passes, up to this much
_depth = 0


@functools.cache
def _glibc():
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def steady_heap():
    """Within the block, freed memory stays in the heap for reuse; see the module docstring."""
    global _depth
    libc = _glibc()
    if libc is not None and _depth == 0:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if libc is not None and _depth == 0:
            libc.malloc_trim(0)

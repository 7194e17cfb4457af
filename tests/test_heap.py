"""heap.steady_heap: freed memory is reused instead of faulted back in, and given back afterwards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from unpatch.heap import _glibc

CHILD = r"""
import json, resource
import torch
from unpatch.heap import steady_heap

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

def churn():  # 40 MB blocks, above glibc's largest self-set mmap threshold (32 MB): page faults
    for _ in range(20):  # of the last 20 of 40 passes (the heap settles in the first few)
        torch.empty(10 << 20).fill_(1.0)
    before = faults()
    for _ in range(20):
        torch.empty(10 << 20).fill_(1.0)
    return faults() - before

plain = churn()
rss0 = rss_mb()
with steady_heap():
    steady = churn()
    rss_in = rss_mb()
print(json.dumps({"plain": plain, "steady": steady, "rss0": rss0, "rss_in": rss_in, "rss_after": rss_mb()}))
"""


@pytest.mark.skipif(_glibc() is None, reason="glibc only: other C libraries are left alone")
def test_steady_heap_reuses_freed_memory_and_gives_it_back():
    out = json.loads(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout)
    pages = (40 << 20) // 4096
    assert out["plain"] > 15 * pages  # every block faulted in afresh
    assert out["steady"] < 2 * pages  # reused
    assert out["rss_in"] > out["rss0"] + 30  # the freed block stayed in the heap inside the block
    assert out["rss_after"] < out["rss0"] + 10  # and went back to the kernel when it ended

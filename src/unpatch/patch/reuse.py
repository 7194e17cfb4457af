"""Reading safetensors tensors into reused buffers, for streaming merges.

A fresh tensor per read costs a page fault (and the kernel zeroing the page) for every 4 KB: on
the 538 MB SmolLM2-135M that is ~260k faults per pass, a visible share of `apply --out`. A
streaming merge holds each tensor only until it is written, so a few grown-once buffers do.
"""

from __future__ import annotations

import torch

from ..errors import UnpatchError
from ..safetensors_io import SafetensorsFile
from .update import LazyTensors


class Buffers:
    """A ring of `n` byte buffers, grown to the largest request, never shrunk. A tensor read
    into one is valid until `n` further reads: callers must be done with it by then."""

    def __init__(self, n: int = 2):
        self.ring: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8) for _ in range(n)]
        self.next = 0

    def read(self, st: SafetensorsFile, name: str) -> torch.Tensor:
        dtype, shape, begin, end = st.entries[name]
        size = end - begin
        k, self.next = self.next, (self.next + 1) % len(self.ring)
        if self.ring[k].numel() < size:
            self.ring[k] = torch.empty(size, dtype=torch.uint8)
        buf = self.ring[k][:size]
        with open(st.path, "rb", buffering=0) as f:
            f.seek(st.data_start + begin)
            got = f.readinto(memoryview(buf.numpy())) if size else 0
        if got != size:
            raise UnpatchError(f"{st.path}: tensor {name!r} is truncated; re-download or rebuild it")
        return buf.view(dtype).reshape(shape)


class ReusingTensors(LazyTensors):
    """LazyTensors whose reads land in a shared ring of buffers (an Update reads at most two
    parts at a time: B and A, or rows and values, and is done with them when add_to returns)."""

    def __init__(self, file: SafetensorsFile, buffers: Buffers):
        super().__init__(file)
        self.buffers = buffers

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.file.entries:
            raise KeyError(key)
        return self.buffers.read(self.file, key)
